"""Progressive re-parameterized BatchNorm (PRepBN), from SLAB (Guo et al., ICML 2024).

SLAB ("Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized
Batch Normalization") replaces a transformer's LayerNorms by

    RepBN(x) = BN(x) + η·x

over the channel (last) dim of token features ``[..., C]``, BatchNorm's statistics taken over every
token of the batch. In eval mode BatchNorm is a fixed per-channel affine map, so RepBN is one too,

    RepBN(x) = x·(s + η) + t,    s = w / sqrt(running_var + eps),    t = b − running_mean·s,

which folds into an adjacent linear layer: the norm then costs nothing at inference. Training with
BatchNorm in place of LayerNorm from the start is unstable, so SLAB switches *progressively*:

    PRepBN(x) = γ·LN(x) + (1 − γ)·RepBN(x),

with γ going from 1 to 0 during training (linearly in the paper: γ = 1 − p at progress p).

This module applies that to an already trained model without touching it:

* :func:`prepare` captures the model and runs the ``layernorm_to_repbn`` pass
  (``passes/layernorm_to_repbn.py``, which also defines :class:`PRepBN` and :class:`Progress`), which
  replaces chosen ``aten.layer_norm`` nodes by calls to :class:`PRepBN` modules; the result, a :class:`RepBNModel`, is trainable and has
  ``set_progress(p)``. At p = 0 it computes exactly what the model did.
* :func:`distill` recovers the function without labels: it fine-tunes the :class:`RepBNModel`
  against the original model (self-distillation on the outputs, with the shared engine of
  :mod:`graphopt.tools.distill`) while p goes from 0 to 1, after :func:`calibrate` has started each
  RepBN as the affine map closest to its LayerNorm.
* :func:`finalize` (exact; the ``fold_repbn`` pass, ``passes/fold_repbn.py``) turns a model at
  γ = 0 into an inference graph with no norm left where folding is possible: each RepBN's
  ``x·(s + η) + t`` goes into the linears that read its output when every reader is a linear, else
  into the linear that computes its input when the norm is that linear's only reader, else it stays
  as one multiply and one add, ``x·(s + η) + t``.

Choices the paper leaves open or makes differently. η is one scalar initialised to 1 and BatchNorm
starts as ``nn.BatchNorm1d`` does (weight 1, bias 0, mean 0, var 1), both as in SLAB's code; SLAB
trains from scratch, and for a trained model :func:`distill` first calibrates BatchNorm (η kept)
and by default keeps its statistics frozen while training (see there: with a few small batches,
batch statistics ruined the recovery). SLAB evaluates with RepBN alone whatever γ is; here eval
mode blends like training does, so that p = 0 reproduces the original model and intermediate p can
be measured. Batch statistics include every token position, padding included (SLAB is for images).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from graphopt import ir
from graphopt.frontends.api import OptimizedModule, optimize
from graphopt.frontends.capture import inference_view, normalize_args
from graphopt.passes.fold_repbn import FoldRepBN
from graphopt.passes.layernorm_to_repbn import (
    ARGUMENTS,
    LEARNABLE,
    PRepBN,
    Progress,
    as_parameter,
    linear_schedule,
    prepbn_nodes,
    repbn_scale_shift,
)
from graphopt.pipeline.manager import PassManager, run_graph
from graphopt.pipeline.pass_base import make_pass
from graphopt.pipeline.report import APPLIED, Report
from graphopt.pipeline.verify import Exact, MinCosine, compare
from graphopt.tools.distill import (
    DistillConfig,
    DistillHistory,
    DistillHooks,
    Distiller,
    as_call,
    distillation_loss,
    linear_ramp,
)

__all__ = [
    "ARGUMENTS",
    "DistillHistory",
    "FoldRepBN",
    "LEARNABLE",
    "PRepBN",
    "Progress",
    "RepBNModel",
    "as_parameter",
    "calibrate",
    "distill",
    "distillation_loss",
    "finalize",
    "linear_schedule",
    "prepare",
    "prepbn_nodes",
    "repbn_scale_shift",
]

# ARGUMENTS, LEARNABLE, linear_schedule, Progress, PRepBN, repbn_scale_shift, as_parameter and
# prepbn_nodes live with the pass that builds PRepBN graphs (passes may not import tools); they are
# re-exported here, where the workflow's users have always found them.


class RepBNModel(nn.Module):
    """A model whose LayerNorms are PRepBN: trainable, with ``set_progress(p)``; made by :func:`prepare`.

    It takes and returns what the original model does. ``train()`` / ``eval()`` switch the
    BatchNorms; the parameters :func:`prepare` made trainable have ``requires_grad``.

    Attributes:
        graph_module: the rewritten graph (PRepBN nodes are ``call_module`` nodes).
        report: the report of :func:`graphopt.optimize` that built it.
        example_inputs, example_kwargs: the capture's example, reused by :func:`finalize` to verify.
        original_outputs: the original model's outputs on that example (taken by :func:`prepare`),
            against which :func:`finalize` reports the end-to-end error; None when not known.
    """

    def __init__(self, graph_module: GraphModule, report: Report, example_inputs: tuple, example_kwargs: dict, original_outputs: Any = None):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.example_inputs = example_inputs
        self.example_kwargs = example_kwargs
        self.original_outputs = original_outputs
        self.train(graph_module.training)

    def norms(self) -> dict[str, PRepBN]:
        """The PRepBN modules by node name, in graph order."""
        return {n.name: self.graph_module.get_submodule(n.target) for n in prepbn_nodes(self.graph_module)}

    def _progresses(self) -> list[Progress]:
        return list({id(m.progress): m.progress for m in self.norms().values()}.values())

    def set_progress(self, p: float) -> None:
        """Set the progress of every PRepBN: p = 0 is the original LayerNorm (γ = 1), p = 1 RepBN alone (γ = 0)."""
        for progress in self._progresses():
            progress.set(p)

    @property
    def progress(self) -> float:
        return self._progresses()[0].p

    @property
    def gamma(self) -> float:
        """The largest γ over the PRepBN modules (they share one progress unless built by several passes)."""
        return max(progress.gamma for progress in self._progresses())

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)


def prepare(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: dict | None = None,
    dynamic_shapes: Any = "auto",
    layers: Sequence[int] | None = None,
    pattern: str | None = None,
    schedule: Callable[[float], float] = linear_schedule,
    eta: float = 1.0,
    trainable: str = "all",
    frozen: str | None = None,
    canonicalize: bool = True,
    log: Callable[[str], None] | None = None,
) -> RepBNModel:
    """Capture ``model`` and replace its LayerNorms by PRepBN; ``model`` itself is left as it was.

    Args:
        model, example_inputs, example_kwargs, dynamic_shapes: as for :func:`graphopt.optimize`.
            By default batch and sequence dims are dynamic where the model allows it, so
            :func:`distill` may train on batches of other sizes than the example's.
        layers: indices of the ``aten.layer_norm`` nodes to replace, in graph order (negative
            indices count from the end); None for all.
        pattern: a regular expression searched in each LayerNorm's weight name, module path
            (e.g. ``encoder.layer.0.output.LayerNorm``) and node name; only matches are replaced.
        schedule: γ as a function of progress p (default γ = 1 − p).
        eta: the initial η.
        trainable: ``"all"`` (every parameter of the model and of the PRepBNs) or ``"norms"`` (only
            the PRepBNs' LayerNorm gains and biases, BatchNorm weights and biases and η).
        frozen: a regular expression; parameters whose name it matches (``re.search``) stay
            frozen, e.g. ``r"word_embeddings"`` (a large embedding table adds optimizer time and
            little to recovery).
        canonicalize: run the ``canonicalize`` pass first, so that LayerNorms written as formulas
            are found too (it also fuses explicit attention, exactly).
        log: progress messages.

    Raises:
        ValueError: the pass found nothing to replace (the message says why) or bad arguments.
    """
    if trainable not in ("all", "norms"):
        raise ValueError(f"trainable must be 'all' or 'norms', got {trainable!r}")
    repbn_pass = make_pass("layernorm_to_repbn", layers=layers, pattern=pattern, schedule=schedule, eta=eta)
    passes = (["canonicalize"] if canonicalize else []) + [repbn_pass]
    args, kwargs = normalize_args(example_inputs), dict(example_kwargs or {})
    opt = optimize(model, passes, args, example_kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=True, log=log, name=type(model).__name__)
    record = opt.report.record(repbn_pass.name)
    if record.status != APPLIED:
        raise ValueError(f"no LayerNorm was replaced: {record.reason or record.status}")
    gm = opt.graph_module
    learnable = {arg.target for node in prepbn_nodes(gm) for role, arg in zip(ARGUMENTS, node.args) if role in LEARNABLE and isinstance(arg, Node)}
    for target in learnable:
        as_parameter(gm, target, requires_grad=True)
    if trainable == "all":
        gm.requires_grad_(True)
    if frozen is not None:
        for name, param in gm.named_parameters():
            if re.search(frozen, name):
                param.requires_grad_(False)
    # finalize reports the error of the inference graph against *this* model, which it never sees:
    # keep its outputs on the example (computed as capture sees the model: eval mode, no cache)
    with inference_view(model), torch.no_grad():
        original_outputs = pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, model(*args, **kwargs))
    return RepBNModel(gm, opt.report, args, kwargs, original_outputs)


# ----------------------------------------------------------------------------- recovery


class _Moments:
    """Per-channel sums over tokens of x, x², y and x·y (float64), for a least-squares fit y ≈ a·x + b."""

    def __init__(self):
        self.n = 0
        self.sums: list[torch.Tensor] | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().double().reshape(-1, x.shape[-1]), y.detach().double().reshape(-1, y.shape[-1])
        sums = [x.sum(0), (x * x).sum(0), y.sum(0), (x * y).sum(0)]
        self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums)]
        self.n += x.shape[0]

    def fit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, var, a, b)`` per channel: the statistics of x and the best affine ``a·x + b`` for y."""
        sx, sxx, sy, sxy = (s / self.n for s in self.sums)
        var = (sxx - sx * sx).clamp_min(0)
        a = torch.where(var > 0, (sxy - sx * sy) / var.clamp_min(1e-30), torch.zeros_like(var))
        return sx, var, a, sy - a * sx


def calibrate(student: RepBNModel, batches: Sequence[Any]) -> None:
    """Start every RepBN as the per-channel affine map closest to its LayerNorm on ``batches``.

    In eval mode RepBN is ``x·a + b`` per channel; this sets BatchNorm's running statistics to the
    channels' mean and variance over all tokens of ``batches`` and its weight and bias so that
    ``a, b`` is the least-squares fit of the LayerNorm's output from its input (η kept). A trained
    model's LayerNorm is thereby replaced, at the start, by the best map RepBN can express, rather
    than by BatchNorm's default (SLAB trains from scratch; converting a trained model is not its
    setting). Runs the student at progress 0 in eval mode; leaves its progress as it was.
    ``batches`` are as for :func:`distill`.
    """
    _calibrate(student, [as_call(b) for b in batches])


def _calibrate(student: RepBNModel, calls: Sequence[tuple[tuple, dict]]) -> None:
    """:func:`calibrate` on ``(args, kwargs)`` pairs."""
    nodes = prepbn_nodes(student.graph_module)
    moments = {node.name: _Moments() for node in nodes}
    modules = {node.name: student.graph_module.get_submodule(node.target) for node in nodes}
    hooks = [module.register_forward_hook(lambda _, args, out, m=moments[name]: m.add(args[0], out)) for name, module in modules.items()]
    p, was_training = student.progress, student.training
    student.eval()
    student.set_progress(0.0)
    try:
        with torch.no_grad():
            for a, k in calls:
                student(*a, **k)
    finally:
        for hook in hooks:
            hook.remove()
        student.set_progress(p)
        student.train(was_training)
    for node in nodes:
        args = dict(zip(ARGUMENTS, node.args))
        weight, bias, mean, var, eta = (ir.get_tensor(student.graph_module, args[r]) for r in ("bn_weight", "bn_bias", "running_mean", "running_var", "eta"))
        x_mean, x_var, a, b = moments[node.name].fit()
        s = a - eta.double()  # BatchNorm's share of the slope, η·x supplies the rest
        with torch.no_grad():
            mean.copy_(x_mean)
            var.copy_(x_var)
            weight.copy_(s * torch.sqrt(x_var + modules[node.name].bn_eps))
            bias.copy_(b + s * x_mean)


class _PRepBNHooks(DistillHooks):
    """PRepBN's part of a distillation run: calibration, the progress schedule, frozen BatchNorm statistics."""

    def __init__(self, student: RepBNModel, schedule: Callable[[int], float], batch_statistics: bool):
        self.student, self.schedule, self.batch_statistics = student, schedule, batch_statistics

    def calibrate(self, student: nn.Module, calls: Sequence[tuple[tuple, dict]]) -> None:
        _calibrate(self.student, calls)

    def progress(self, step: int) -> float:
        return self.schedule(step)

    def set_progress(self, p: float) -> None:
        self.student.set_progress(p)

    def begin_training(self, student: nn.Module) -> None:
        for norm in self.student.norms().values():
            norm.batch_statistics = self.batch_statistics

    def end_training(self, student: nn.Module) -> None:
        for norm in self.student.norms().values():
            norm.batch_statistics = True


def distill(
    student: RepBNModel,
    teacher: nn.Module,
    batches: Sequence[Any],
    steps: int,
    *,
    lr: float = 5e-5,
    loss: str = "cosine",
    hold_steps: int | None = None,
    schedule: Callable[[int], float] | None = None,
    calibration_batches: int = 16,
    batch_statistics: bool = False,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    match: Mapping[str, str] | Sequence[str] = (),
    seed: int | None = 0,
    max_seconds: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress_bar: bool = False,
) -> DistillHistory:
    """Fine-tune ``student`` to reproduce ``teacher`` (the original model) on unlabelled inputs.

    First :func:`calibrate` starts each RepBN as the affine map closest to its LayerNorm on the
    first ``calibration_batches`` batches. Then every step runs one batch (cycling through
    ``batches``) at the step's progress and takes an AdamW step (gradients clipped to norm 1) on the
    student's trainable parameters against :func:`distillation_loss` between the student's outputs
    and the teacher's (e.g. sentence embeddings or hidden states). The teacher runs once per batch,
    in eval mode, without gradients. The loop is :class:`graphopt.tools.distill.Distiller`'s.

    By default BatchNorm keeps the calibrated statistics during training (``batch_statistics=False``:
    frozen BatchNorm, as in small-batch fine-tuning); its weight, bias and η still learn, and at
    inference RepBN is the same per-channel affine map either way. SLAB's batch statistics
    (``batch_statistics=True``) suit training from scratch with large batches; on a trained
    model's features, small batches and a few hundred steps, their noise dominates. Measured on
    all-MiniLM-L6-v2, all 13 LayerNorms, 200 steps of 8 sentences at lr 1e-4: mean embedding cosine 0.24 to
    the original with batch statistics, 0.96 with frozen ones.

    Args:
        student: a :class:`RepBNModel` from :func:`prepare`; left in eval mode at the last progress.
        teacher: the original model (only run, never changed).
        batches: positional input tuples (a lone tensor is one input; a dict is keyword inputs).
        steps: optimizer steps.
        lr: AdamW's learning rate.
        loss: ``"cosine"`` or ``"mse"``.
        hold_steps: with the default schedule, steps at p = 1 after the ramp (default: a tenth).
        schedule: ``schedule(step) -> p`` for step 0 .. steps−1, replacing the default: p rising
            linearly from 0 at step 0 to 1 at step ``steps − hold_steps − 1``, then staying at 1
            (:func:`graphopt.tools.distill.linear_ramp`).
        calibration_batches: how many of ``batches`` :func:`calibrate` uses (0: no calibration).
        batch_statistics: normalise with batch statistics while training (see above).
        log: receives a line every ``log_every`` steps (and on the last one).
        match: intermediate values to distil as well, student name → teacher name (see
            :func:`graphopt.tools.distill.tap_points`), weighted like the outputs.
        seed: the seed of the run's random state (None: the global one).
        max_seconds: stop after the first step that ends this late (the progress may then be
            below 1: resume from ``checkpoint`` to finish).
        checkpoint: a file for the training state (student, optimizer, step, random state),
            written when the run stops and, with ``checkpoint_every``, every that many steps.
        resume: continue from ``checkpoint`` when that file exists (no calibration then: the
            checkpoint holds the student's calibrated state); the result equals an uninterrupted
            run's. The student must come from the same :func:`prepare` call arguments.
        progress_bar: redraw a status line on stderr at every step (step, progress, loss, fidelity).

    Returns:
        the :class:`DistillHistory`: loss, progress and output fidelity per step, training seconds.
    """
    if steps < 1 or not batches:
        raise ValueError("distill needs steps >= 1 and at least one batch")
    if schedule is None:
        schedule = linear_ramp(steps, steps // 10 if hold_steps is None else hold_steps)
    if resume and checkpoint is None:
        raise ValueError("resume needs a checkpoint file")
    config = DistillConfig(
        steps=steps,
        lr=lr,
        loss=loss,
        match=match,
        calibration_batches=calibration_batches,
        seed=seed,
        max_seconds=max_seconds,
        checkpoint=None if checkpoint is None else os.fspath(checkpoint),
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        progress_bar=progress_bar,
    )
    engine = Distiller(student, teacher, batches, config, hooks=_PRepBNHooks(student, schedule, batch_statistics), log=log)
    if resume and os.path.exists(checkpoint):
        engine.load_checkpoint(checkpoint)
    return engine.run()


# ----------------------------------------------------------------------------- finalize


def finalize(model: RepBNModel) -> OptimizedModule:
    """The inference graph of a :class:`RepBNModel` at γ = 0: every RepBN folded, or reduced to a multiply and an add; exact.

    Each PRepBN becomes its eval-mode affine map ``x·(s + η) + t`` (:func:`repbn_scale_shift`),
    folded into every linear that reads its output when all its readers are linears (each gets
    its own folded weights), else into the linear that computes its input when the norm is that
    linear's only reader, else kept as ``x·(s + η) + t`` (one ``mul``, one ``add``). Runs as an
    exact pass under :class:`graphopt.PassManager`, so the result is checked against the model on
    its example inputs; ``report.record("fold_repbn")`` counts each outcome and names the norms
    kept, with why. ``report.final`` gives the end-to-end error against the original model (the one
    given to :func:`prepare`, on its example inputs: ``"error vs original"``, ``"cosine vs original"``)
    and against the student (``"error vs RepBN student"``, the fold's own exactness).

    The model is not changed (the result holds copies of its tensors, without gradients).

    Raises:
        ValueError: some PRepBN still has γ > 0 (progress < 1): LayerNorm is still part of the function.
    """
    if not isinstance(model, RepBNModel):
        raise TypeError(f"finalize expects a RepBNModel from graphopt.tools.repbn.prepare, got {type(model).__name__}")
    if model.gamma != 0:
        raise ValueError(
            f"finalize needs progress 1 (gamma = 0), the model is at progress {model.progress:g} (gamma = {model.gamma:g}): "
            "LayerNorm is still part of its function; train to the end (distill) or call set_progress(1.0) first"
        )
    with warnings.catch_warnings():  # deep-copying export's pytree specs warns about a deprecated check
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(model.graph_module).eval()
    gm.requires_grad_(False)
    report = Report(model=model.report.model, capture=model.report.capture)
    gm, report = PassManager([FoldRepBN()], strict=True).run(gm, model.example_inputs, model.example_kwargs, report)
    gm.delete_all_unused_submodules()
    gm.recompile()
    # the manager compared with the graph it was given, the RepBN student; what the user wants to
    # know is the error against their original model (what prepare was given)
    vs_student = report.final.pop("error vs original", None)
    if model.original_outputs is not None:
        cpu = lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731 - the student may have moved
        outputs = pytree.tree_map(cpu, run_graph(gm, model.example_inputs, model.example_kwargs))
        original = pytree.tree_map(cpu, model.original_outputs)
        error, cosine = compare(outputs, original, Exact()), compare(outputs, original, MinCosine(0.0))
        report.final["error vs original"] = f"{error.metric} {error.value:.2e} (against the model given to prepare)"
        report.final["cosine vs original"] = f"{cosine.value:.5f} (mean row cosine, worst output)"
    if vs_student is not None:
        report.final["error vs RepBN student"] = vs_student
    return OptimizedModule(gm, gm, report, "eager")
