"""Self-distillation: train a rewritten model (the student) to reproduce the original (the teacher).

An approximate rewrite (PRepBN in place of LayerNorm today; linear attention, token pruning and
quantization next) changes a model's function; fine-tuning the rewritten graph against the original
model on unlabelled inputs recovers it. This module is the training loop those workflows share::

    config = DistillConfig(steps=400, lr=1e-4, match={"attn_0": "blocks.0.attn"})
    history = Distiller(student, teacher, batches, config, hooks=MyRewriteHooks()).run()

* **Teacher and student.** The teacher is the original model (any ``nn.Module``; it is only run, in
  eval mode and without gradients, see :func:`graphopt.frontends.capture.inference_view`); the
  student is the rewritten one, usually a :class:`torch.fx.GraphModule` or a module holding one.
  The student's parameters with ``requires_grad`` are trained by AdamW.
* **Objectives** (:func:`distillation_loss`, ``"cosine"`` or ``"mse"``): on the final outputs, and
  on matched intermediate values (``DistillConfig.match``: student name → teacher name), e.g. each
  attention block's output. A name is resolved by :func:`tap_points`: a node name of a graph
  module, else a module path, the value being what that module returns.
* **Hooks** (:class:`DistillHooks`): what a rewrite plugs in: calibration before the first step, a
  progress schedule that moves the rewrite from the original (p = 0) to its target (p = 1) over
  the steps (:func:`linear_ramp`), and entering/leaving training mode (e.g. frozen statistics).
* **Limits, seeds, checkpoints.** A run stops at ``steps`` or after ``max_seconds``; it runs under
  its own random state (``seed``), which checkpoints carry along with the student's state, the
  optimizer's and the step, so that a resumed run continues exactly as the uninterrupted one would.
* **Progress.** ``log`` receives a line every ``log_every`` steps; ``progress_bar`` redraws one
  line on stderr with the step, the loss and the fidelity (mean cosine of the student's output
  rows to the teacher's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.frontends.capture import inference_view, normalize_args
from graphopt.pipeline.verify import row_cosines

__all__ = [
    "CHECKPOINT_VERSION",
    "DistillConfig",
    "DistillHistory",
    "DistillHooks",
    "Distiller",
    "as_call",
    "constant_schedule",
    "distillation_loss",
    "fidelity",
    "linear_ramp",
    "tap_points",
]

CHECKPOINT_VERSION = 1
"""The format of :meth:`Distiller.state_dict`; a checkpoint of another version is refused."""

LOSSES = ("cosine", "mse")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DistillConfig:
    """The options of a :class:`Distiller` run.

    Attributes:
        steps: optimizer steps of the whole run (a resumed run counts the steps done before); the
            schedule of :meth:`DistillHooks.progress` spans them.
        lr: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        clip_grad_norm: the gradients' total norm is clipped to this before each step (None: no clipping).
        loss: the objective's distance, ``"cosine"`` or ``"mse"`` (see :func:`distillation_loss`).
        output_weight: weight of the objective on the final outputs (0: intermediate values only).
        match: intermediate values compared between student and teacher, as ``(student name,
            teacher name)`` pairs (see :func:`tap_points` for names); a mapping or a sequence of
            names (the same name on both sides) is accepted and stored as pairs.
        match_weight: weight of the mean objective over the matched pairs.
        calibration_batches: how many of the first batches :meth:`DistillHooks.calibrate` gets
            before the first step (0: no calibration).
        seed: the run's random state starts from ``torch.manual_seed(seed)`` (dropout and any other
            randomness in the student), in a forked state that leaves the caller's untouched; None
            runs on the caller's global random state (checkpoints still carry it).
        max_seconds: each :meth:`Distiller.run` call stops after the first step that ends this many
            seconds after the call started (None: no time limit); at least one step runs.
        checkpoint: a file :meth:`Distiller.run` saves the state to every ``checkpoint_every``
            steps and when it stops (None: no checkpoints).
        checkpoint_every: steps between checkpoints (None: only when the run stops).
        cache_teacher: run the teacher once per batch before training and keep its outputs
            (and matched values); False runs it again at every step (memory for time).
        log_every: steps between lines to ``log`` (the last step is always logged).
        progress_bar: redraw one status line on stderr at every step.
    """

    steps: int
    lr: float = 5e-5
    weight_decay: float = 0.0
    clip_grad_norm: float | None = 1.0
    loss: str = "cosine"
    output_weight: float = 1.0
    match: tuple[tuple[str, str], ...] = ()
    match_weight: float = 1.0
    calibration_batches: int = 0
    seed: int | None = 0
    max_seconds: float | None = None
    checkpoint: str | None = None
    checkpoint_every: int | None = None
    cache_teacher: bool = True
    log_every: int = 50
    progress_bar: bool = False

    def __post_init__(self):
        match = self.match
        if isinstance(match, Mapping):
            match = match.items()
        pairs = tuple((m, m) if isinstance(m, str) else tuple(m) for m in match)
        if not all(len(p) == 2 and all(isinstance(n, str) for n in p) for p in pairs):
            raise ValueError(f"match must be a mapping or a sequence of names or (student, teacher) name pairs, got {self.match!r}")
        object.__setattr__(self, "match", pairs)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be 'cosine' or 'mse', got {self.loss!r}")
        if self.output_weight < 0 or self.match_weight < 0 or (self.output_weight == 0 and not (pairs and self.match_weight)):
            raise ValueError("the objective is empty: output_weight and match_weight must be >= 0, and one of them > 0 with something to compare")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


# ----------------------------------------------------------------------------- schedules


def linear_ramp(steps: int, hold: int = 0) -> Callable[[int], float]:
    """``step -> p``: p rises linearly from 0 at step 0 to 1 at step ``steps − hold − 1``, then stays at 1.

    With ``steps − hold ≤ 1`` every step is at p = 1.
    """
    ramp = steps - hold
    if ramp > 1:
        return lambda step: min(1.0, step / (ramp - 1))
    return lambda step: 1.0


def constant_schedule(p: float) -> Callable[[int], float]:
    """``step -> p`` for every step."""
    return lambda step: p


# ----------------------------------------------------------------------------- hooks


class DistillHooks:
    """What a rewrite plugs into the engine; every method does nothing by default.

    The engine calls, in order: :meth:`calibrate` once before the first step (not when resuming
    from a checkpoint: the student's state already holds its result), then for each run
    :meth:`begin_training` after putting the student in training mode, at every step
    :meth:`progress` and, when it gives a value, :meth:`set_progress` before the forward pass,
    :meth:`extra_loss` after it, and
    :meth:`end_training` when the run stops (also on an exception), before the student is put in
    eval mode. :meth:`state_dict` / :meth:`load_state_dict` carry hook state that the student's
    ``state_dict`` does not hold through checkpoints.
    """

    def calibrate(self, student: nn.Module, calls: Sequence[tuple[tuple, dict]]) -> None:
        """Initialise the student's new parts from its own activations on ``calls`` (``(args, kwargs)`` pairs)."""

    def progress(self, step: int) -> float | None:
        """The rewrite's progress at ``step`` (0-based), or None when it has no progress knob."""
        return None

    def set_progress(self, p: float) -> None:
        """Move the student's rewrite to progress ``p``."""

    def extra_loss(self, student: nn.Module) -> torch.Tensor | None:
        """The rewrite's own objective for the step just run forward, added to the loss (None: nothing),
        e.g. attention transfer's per-layer error against softmax attention on the student's own inputs."""
        return None

    def begin_training(self, student: nn.Module) -> None:
        """Called after ``student.train()``: e.g. switch statistics to frozen."""

    def end_training(self, student: nn.Module) -> None:
        """Undo :meth:`begin_training`."""

    def state_dict(self) -> dict[str, Any]:
        """Hook state to put in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


# ----------------------------------------------------------------------------- objectives


def _float_leaves(outputs: Any) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(outputs) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def distillation_loss(outputs: Any, targets: Any, kind: str = "cosine") -> torch.Tensor:
    """Mean over the floating-point leaves of ``outputs`` (a pytree) of ``1 − cosine`` over the last dim's rows (``"cosine"``) or of the MSE (``"mse"``).

    ``targets`` must have as many floating-point leaves, of the same shapes, in the same order.
    """
    # Not verify.row_cosines (which measures, detached, in float64): a loss needs gradients in the model's dtype.
    terms = []
    for out, ref in zip(_float_leaves(outputs), _float_leaves(targets), strict=True):
        if kind == "cosine":
            rows = out.shape[-1] if out.dim() else 1
            terms.append(1 - F.cosine_similarity(out.reshape(-1, rows), ref.reshape(-1, rows), dim=-1).mean())
        elif kind == "mse":
            terms.append(F.mse_loss(out, ref))
        else:
            raise ValueError(f"loss must be 'cosine' or 'mse', got {kind!r}")
    return torch.stack(terms).mean()


def fidelity(outputs: Any, targets: Any) -> float:
    """Mean over the floating-point leaves of their mean row cosine (:func:`graphopt.pipeline.verify.row_cosines`; 1: same directions)."""
    pairs = list(zip(_float_leaves(outputs), _float_leaves(targets), strict=True))
    return sum(row_cosines(out, ref).mean().item() for out, ref in pairs) / len(pairs) if pairs else math.nan


# ----------------------------------------------------------------------------- intermediate values


class _Recorder(nn.Module):
    """Identity that keeps the last value it saw (a ``call_module`` tap inserted after a graph node)."""

    def __init__(self, store: dict[str, Any], key: str):
        super().__init__()
        self.store, self.key = store, key

    def forward(self, x):
        self.store[self.key] = x
        return x


def _graph_modules(model: nn.Module) -> list[tuple[str, GraphModule]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, GraphModule)]


def _module_output_node(gm: GraphModule, path: str) -> Node | None:
    """The last node (graph order) that ``nn_module_stack`` places inside the module at ``path``."""
    last = None
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op not in ("placeholder", "output", "get_attr") and any(entry[0] == path for entry in stack.values()):
            last = node
    return last


def tap_points(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, Any]]:
    """Where each of ``names`` is read in ``model``: ``name -> ("node", (graph module, node))`` or ``("module", submodule)``.

    A name is, in this order of preference:

    1. the name of a node of a :class:`torch.fx.GraphModule` in ``model`` (``model`` itself or a
       submodule; the first one in ``named_modules`` order that has it): its value;
    2. a module path recorded in such a graph's ``nn_module_stack`` metadata (e.g.
       ``encoder.layer.0.attention``, as the original model names it): the value of the last node
       in graph order inside that module, which is what it returns when it returns one tensor
       (nodes that a pass created may lack the metadata; name them by node name);
    3. the path of a submodule of ``model`` (``model.get_submodule``) that ``model`` calls: what
       it returns, recorded by a forward hook.

    Raises:
        KeyError: a name that is none of these.
    """
    graphs = _graph_modules(model)
    found: dict[str, tuple[str, Any]] = {}
    for name in names:
        spot = next(((gm, n) for _, gm in graphs for n in gm.graph.nodes if n.name == name), None)
        if spot is None:
            spot = next(((gm, n) for _, gm in graphs if (n := _module_output_node(gm, name)) is not None), None)
        if spot is not None:
            found[name] = ("node", spot)
            continue
        try:
            found[name] = ("module", model.get_submodule(name))
        except AttributeError:
            where = f"a node or module path of its graph ({', '.join(p or '<root>' for p, _ in graphs)})" if graphs else "a submodule path"
            raise KeyError(f"{name!r} is not {where} of {type(model).__name__}") from None
    return found


@contextlib.contextmanager
def _tapped(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Record the values at ``names`` (see :func:`tap_points`) in the yielded dict at every forward of ``model``.

    Graph nodes get a :class:`_Recorder` ``call_module`` node after them (the graph is recompiled);
    modules get a forward hook. Everything is removed on exit and the graphs recompiled as they were.
    """
    store: dict[str, Any] = {}
    if not names:
        yield store
        return
    inserted: list[tuple[GraphModule, Node, str]] = []
    hooks = []
    try:
        for i, (name, (kind, where)) in enumerate(tap_points(model, names).items()):
            if kind == "module":
                hooks.append(where.register_forward_hook(lambda _m, _a, out, key=name: store.__setitem__(key, out)))
                continue
            gm, node = where
            target = f"_distill_tap_{i}"
            while hasattr(gm, target):
                target += "_"
            gm.add_submodule(target, _Recorder(store, name))
            with gm.graph.inserting_after(node):
                inserted.append((gm, gm.graph.call_module(target, (node,)), target))
        for gm in {id(gm): gm for gm, _, _ in inserted}.values():
            gm.recompile()
        yield store
    finally:
        for hook in hooks:
            hook.remove()
        for gm, node, target in inserted:
            gm.graph.erase_node(node)
            delattr(gm, target)
        for gm in {id(gm): gm for gm, _, _ in inserted}.values():
            gm.recompile()


def as_call(batch: Any) -> tuple[tuple, dict]:
    """A batch as ``(args, kwargs)``: a dict is keyword inputs, a tuple or list positional ones, anything else one input."""
    if isinstance(batch, dict):
        return (), batch
    return normalize_args(batch), {}


# ----------------------------------------------------------------------------- the engine


@dataclass
class DistillHistory:
    """What a run did, one entry per step: the loss (before the step's update), the fidelity of the outputs, the progress.

    Attributes:
        loss: the objective at each step, computed before that step's update.
        progress: the progress each step ran at (:meth:`DistillHooks.progress`; NaN when there is none).
        fidelity: :func:`fidelity` of the student's outputs to the teacher's at each step.
        seconds: time spent in steps, over every run of a resumed training.
        stopped: why the last run stopped: ``"steps"`` or ``"time"``.
    """

    loss: list[float] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)
    fidelity: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""


class Distiller:
    """Trains ``student`` to reproduce ``teacher`` on ``batches`` (see the module docstring).

    Args:
        student: the rewritten model; its parameters with ``requires_grad`` are trained. Left in
            eval mode after each :meth:`run`.
        teacher: the original model; only run, in eval mode, without gradients.
        batches: inputs, cycled through in order (step ``i`` runs ``batches[i % len(batches)]``):
            a tuple or list of positional inputs, a dict of keyword inputs, or one input.
        config: the options (:class:`DistillConfig`).
        hooks: the rewrite's :class:`DistillHooks` (default: none).
        log: receives a progress line every ``config.log_every`` steps and on the last one.

    Attributes:
        step: steps done so far (restored by :meth:`load_state_dict`).
        history: the :class:`DistillHistory` so far.
        optimizer: the AdamW optimizer over the trainable parameters.

    Raises:
        ValueError: no batches, or no trainable parameter.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        batches: Sequence[Any],
        config: DistillConfig,
        *,
        hooks: DistillHooks | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if not batches:
            raise ValueError("distillation needs at least one batch")
        self.student, self.teacher, self.config = student, teacher, config
        self.hooks = hooks or DistillHooks()
        self.log = log
        self.calls = [as_call(b) for b in batches]
        self.params = [p for p in student.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.history = DistillHistory()
        # The random state to continue from: a seeded run's own state between runs, or a loaded
        # checkpoint's; None before the first run (a seeded run then starts from its seed).
        self._rng: dict[str, Any] | None = None
        self._running = False
        self._targets: list[tuple[Any, dict[str, Any]]] | None = None

    # -- state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the student's and the optimizer's state, the step, the random state, the history, the hooks' state."""
        live = self._running or self.config.seed is None
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self._rng_state() if live else self._rng,
            "history": dataclasses.asdict(self.history),
            "hooks": self.hooks.state_dict(),
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (of a distiller built with the same student structure, batches and config)."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')!r}, this engine reads version {CHECKPOINT_VERSION}")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self._rng = state["rng"]
        self.history = DistillHistory(**state["history"])
        self.hooks.load_state_dict(state["hooks"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` (through a temporary file, so a crash leaves the previous checkpoint whole)."""
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint that :meth:`save_checkpoint` wrote; the next :meth:`run` continues from it."""
        self.load_state_dict(torch.load(path, weights_only=True))

    # -- random state

    def _devices(self) -> list[torch.device]:
        return sorted({p.device for p in self.params if p.device.type == "cuda"}, key=str)

    def _rng_state(self) -> dict[str, Any]:
        return {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(d) for d in self._devices()]}

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        for device, cuda in zip(self._devices(), state["cuda"]):
            torch.cuda.set_rng_state(cuda, device)

    @contextlib.contextmanager
    def _random_state(self) -> Iterator[None]:
        """The run's random state: seeded on the first run, carried over between runs and through checkpoints.

        A seeded run works in a forked state (the caller's is restored afterwards); with
        ``seed=None`` the run uses the global state, set from a loaded checkpoint if there is one.
        """
        if self.config.seed is None:
            if self._rng is not None:
                self._set_rng_state(self._rng)
                self._rng = None
            yield
            return
        with torch.random.fork_rng(devices=self._devices()):
            if self._rng is None:
                torch.manual_seed(self.config.seed)
            else:
                self._set_rng_state(self._rng)
            try:
                yield
            finally:
                self._rng = self._rng_state()

    # -- objectives

    def _teacher(self, index: int, taps: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The teacher's outputs and matched values on batch ``index`` (``taps``: the teacher's tap store)."""
        if self._targets is not None:
            return self._targets[index]
        a, k = self.calls[index]
        taps.clear()
        with torch.no_grad():
            out = self.teacher(*a, **k)
        return out, dict(taps)

    def _objective(self, outputs: Any, student_taps: dict[str, Any], targets: tuple[Any, dict[str, Any]]) -> torch.Tensor:
        """``output_weight · loss(outputs) + match_weight · mean over matched pairs of loss(student value, teacher value)``."""
        cfg = self.config
        terms = []
        if cfg.output_weight:
            terms.append(cfg.output_weight * distillation_loss(outputs, targets[0], cfg.loss))
        if cfg.match and cfg.match_weight:
            missing = [s for s, _ in cfg.match if s not in student_taps] + [t for _, t in cfg.match if t not in targets[1]]
            if missing:
                raise RuntimeError(f"matched values the forward pass did not compute (a module that is never called?): {missing}")
            matched = torch.stack([distillation_loss(student_taps[s], targets[1][t], cfg.loss) for s, t in cfg.match])
            terms.append(cfg.match_weight * matched.mean())
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    # -- the loop

    def run(self) -> DistillHistory:
        """Train from the current step until ``config.steps`` or the time limit; return the history.

        On a fresh distiller (step 0) it first gives :meth:`DistillHooks.calibrate` the first
        ``config.calibration_batches`` batches. It saves a checkpoint (when ``config.checkpoint``
        is set) every ``config.checkpoint_every`` steps and when it stops. Calling it again after a
        time-limited stop, or on a new distiller after :meth:`load_checkpoint`, continues the
        training; the result is the uninterrupted run's (same steps, batches, random numbers and
        optimizer state).
        """
        cfg = self.config
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            stack.callback(setattr, self, "_running", False)
            stack.enter_context(self._random_state())
            if self.step == 0 and cfg.calibration_batches:
                self.hooks.calibrate(self.student, self.calls[: cfg.calibration_batches])
            stack.enter_context(inference_view(self.teacher))
            teacher_taps = stack.enter_context(_tapped(self.teacher, [t for _, t in cfg.match]))
            if cfg.cache_teacher and self._targets is None:
                self._targets = [self._teacher(i, teacher_taps) for i in range(len(self.calls))]
            student_taps = stack.enter_context(_tapped(self.student, [s for s, _ in cfg.match]))
            self.student.train()
            self.hooks.begin_training(self.student)
            self._running = True
            self.history.stopped = "steps" if self.step >= cfg.steps else ""
            try:
                while self.step < cfg.steps:
                    self._one_step(student_taps, teacher_taps)
                    if self.step == cfg.steps:
                        self.history.stopped = "steps"
                    elif cfg.max_seconds is not None and time.perf_counter() - started >= cfg.max_seconds:
                        self.history.stopped = "time"
                        break
                    elif cfg.checkpoint and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint(cfg.checkpoint)
            finally:
                self.hooks.end_training(self.student)
                self.student.eval()
                if cfg.progress_bar:
                    sys.stderr.write("\n")
            if cfg.checkpoint:
                self.save_checkpoint(cfg.checkpoint)
        return self.history

    def _one_step(self, student_taps: dict[str, Any], teacher_taps: dict[str, Any]) -> None:
        cfg, step = self.config, self.step
        step_started = time.perf_counter()
        p = self.hooks.progress(step)
        if p is not None:
            self.hooks.set_progress(p)
        index = step % len(self.calls)
        targets = self._teacher(index, teacher_taps)
        a, k = self.calls[index]
        student_taps.clear()
        outputs = self.student(*a, **k)
        value = self._objective(outputs, student_taps, targets)
        extra = self.hooks.extra_loss(self.student)
        if extra is not None:
            value = value + extra
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        if cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
        self.optimizer.step()
        student_taps.clear()
        loss, fid = value.item(), fidelity(outputs, targets[0])
        self.history.loss.append(loss)
        self.history.progress.append(math.nan if p is None else float(p))
        self.history.fidelity.append(fid)
        self.history.seconds += time.perf_counter() - step_started
        self.step += 1
        at = f"progress {p:.3f}, " if p is not None else ""
        if self.log and (step % cfg.log_every == 0 or self.step == cfg.steps):
            self.log(f"step {step}/{cfg.steps}: {at}loss {loss:.5f}, fidelity {fid:.4f}")
        if cfg.progress_bar:
            bar = "#" * int(20 * self.step / cfg.steps)
            sys.stderr.write(f"\r[{bar:<20}] {self.step}/{cfg.steps} {at}loss {loss:.5f} fidelity {fid:.4f} {self.history.seconds:.0f}s")
            sys.stderr.flush()
