"""Watching a graph's activations on calibration inputs: channel statistics, and runs with a few
nodes computed another way.

Quantization passes need two things from real data. *Statistics*: SmoothQuant's per-channel
``max |X_j|`` at a linear's input, LLM.int8()'s outlier channels (``max |X_j|`` above a threshold)
and the outlier report of "Quantizable Transformers" (Bondarenko et al. 2023: a channel's max over
the median channel's, and the kurtosis of the activation). *Sensitivity*: the graph's outputs when
one layer, or a chosen set, is computed quantized, to rank layers and fall back where one alone
breaks the budget. Both run the graph with a :class:`torch.fx.Interpreter` on the unchanged graph:
nothing is copied or rewritten to measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.experimental.symbolic_shapes import optimization_hint

__all__ = ["ChannelStats", "calibration_batches", "flat_inputs", "observe_channels", "record_arguments", "run_substituted"]


def flat_inputs(gm: GraphModule, example_inputs: Sequence[Any], example_kwargs: dict | None = None) -> list[Any]:
    """The graph's placeholder values for ``gm(*example_inputs, **example_kwargs)``."""
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    in_spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    if in_spec is None:
        return pytree.tree_leaves((args, kwargs))
    return torch.fx._pytree.tree_flatten_spec((args, kwargs), in_spec)


@dataclass
class ChannelStats:
    """Statistics of one activation ``[..., C]`` over every token it took on the calibration inputs.

    Attributes:
        absmax: ``max |x_j|`` per channel ``j`` (fp64 ``[C]``).
        tokens: how many rows (tokens) were seen.
        moments: the raw moments ``Σx, Σx², Σx³, Σx⁴`` over all elements, and their count.
        samples: up to ``keep_rows`` rows (tokens) of the activation, evenly spread over each batch.
    """

    absmax: Tensor
    tokens: int = 0
    moments: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
    keep_rows: int = 0
    samples: Tensor | None = None

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        if rows.numel() == 0:
            return
        self.absmax = torch.maximum(self.absmax, rows.abs().amax(0))
        self.tokens += rows.shape[0]
        flat = rows.reshape(-1)
        for i in range(4):
            self.moments[i] += float((flat ** (i + 1)).sum())
        self.moments[4] += flat.numel()
        room = self.keep_rows - (0 if self.samples is None else self.samples.shape[0])
        if room > 0:
            picked = rows[torch.linspace(0, rows.shape[0] - 1, min(room, rows.shape[0])).round().long()].float()
            self.samples = picked if self.samples is None else torch.cat([self.samples, picked])

    @property
    def max_over_median(self) -> float:
        """The largest channel's ``max |x|`` over the median channel's: >> 1 marks outlier channels."""
        median = float(self.absmax.median())
        return float(self.absmax.max()) / median if median > 0 else float("inf")

    @property
    def kurtosis(self) -> float:
        """``E[(x - μ)⁴] / σ⁴`` over all elements (3 for a Gaussian; outlier-heavy activations reach hundreds)."""
        s1, s2, s3, s4, n = self.moments
        if n == 0:
            return float("nan")
        m1, m2, m3, m4 = s1 / n, s2 / n, s3 / n, s4 / n
        var = m2 - m1 * m1
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        return central4 / (var * var) if var > 0 else float("nan")

    def outliers(self, threshold: float) -> Tensor:
        """The channels whose ``max |x|`` exceeds ``threshold`` (LLM.int8()'s outlier features), int64."""
        return torch.nonzero(self.absmax > threshold).flatten()


def calibration_batches(ctx) -> list[tuple[tuple, dict]]:
    """A pass context's example inputs followed by the pipeline's calibration batches
    (``ctx.state["calibration"]``, ``(args, kwargs)`` pairs: ``graphopt.optimize(calibration=...)``)."""
    return [(tuple(ctx.example_inputs), dict(ctx.example_kwargs)), *ctx.state.get("calibration", ())]


class _Watcher(Interpreter):
    def __init__(self, gm: GraphModule, watch: Mapping[Node, ChannelStats], substitutes: Mapping[Node, Callable[..., Any]]):
        super().__init__(gm)
        self.watch, self.substitutes = watch, substitutes

    def run_node(self, n: Node) -> Any:
        substitute = self.substitutes.get(n)
        if substitute is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = substitute(*args, **kwargs)
        else:
            result = super().run_node(n)
        stats = self.watch.get(n)
        if stats is not None and isinstance(result, Tensor) and result.is_floating_point():
            stats.add(result)
        return result


def observe_channels(gm: GraphModule, nodes: Iterable[Node], batches: Iterable[tuple[Sequence[Any], dict]], keep_rows: int = 0) -> dict[Node, ChannelStats]:
    """Per-channel statistics of the values of ``nodes`` over ``batches`` (``(args, kwargs)`` pairs),
    keeping up to ``keep_rows`` rows of each as samples."""
    watch: dict[Node, ChannelStats] = {}
    for node in nodes:
        val = node.meta.get("val")
        channels = val.shape[-1] if isinstance(val, Tensor) and val.dim() else None
        if isinstance(channels, torch.SymInt):  # read the hint without a guard: int() would specialize the graph
            channels = optimization_hint(channels)
        if channels is not None:
            watch[node] = ChannelStats(torch.zeros(int(channels), dtype=torch.float64), keep_rows=keep_rows)
    with torch.no_grad():
        for args, kwargs in batches:
            _Watcher(gm, watch, {}).run(*flat_inputs(gm, args, kwargs), enable_io_processing=False)
    return watch


def run_substituted(gm: GraphModule, substitutes: Mapping[Node, Callable[..., Any]], args: Sequence[Any], kwargs: dict | None = None) -> Any:
    """The graph's flat outputs on ``(args, kwargs)`` with each node of ``substitutes`` computed by its
    function instead (called with the node's argument values)."""
    with torch.no_grad():
        return _Watcher(gm, {}, substitutes).run(*flat_inputs(gm, args, kwargs), enable_io_processing=False)


class _ArgumentRecorder(Interpreter):
    def __init__(self, gm: GraphModule, nodes: Iterable[Node]):
        super().__init__(gm)
        self.record: dict[Node, list[dict[str, Any]]] = {n: [] for n in nodes}

    def run_node(self, n: Node) -> Any:
        if n in self.record:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            bound = torch.fx.operator_schemas.normalize_function(n.target, args, kwargs, normalize_to_only_use_kwargs=True)
            values = bound.kwargs if bound is not None else {"args": args, **kwargs}
            self.record[n].append(pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, dict(values)))
        return super().run_node(n)


def record_arguments(gm: GraphModule, nodes: Iterable[Node], batches: Iterable[tuple[Sequence[Any], dict]]) -> dict[Node, list[dict[str, Any]]]:
    """The arguments each of ``nodes`` received on each of ``batches`` (``(args, kwargs)`` pairs), by
    schema name: what a layer-local fit (attention transfer) trains on, the layer's inputs as the
    unchanged graph computes them."""
    recorder = _ArgumentRecorder(gm, nodes)
    with torch.no_grad():
        for args, kwargs in batches:
            recorder.run(*flat_inputs(gm, args, kwargs), enable_io_processing=False)
    return recorder.record
