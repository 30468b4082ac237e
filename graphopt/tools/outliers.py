"""The per-layer outlier report: which linears read activations that per-token int8 cannot hold.

"Quantizable Transformers" (Bondarenko et al., NeurIPS 2023) traces transformers' quantization
trouble to a few activation channels with huge values, and measures them per layer by the
largest channel's max over the median channel's and by the activation's kurtosis; LLM.int8()
(Dettmers et al. 2022) calls a channel an outlier when its magnitude exceeds 6.0. This report gives
both for the input of every linear of the canonical graph, calibrated on real inputs, so one can see
before quantizing where ``smooth_quant`` or ``quantize_int8(outlier_threshold=6.0)`` will matter::

    report = graphopt.outliers.outlier_report(model, example_inputs, calibration=[batch, ...])
    print(report)            # a table, worst layer first; report.layers for data
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tabulate import tabulate

from graphopt.frontends.api import optimize
from graphopt.ir.calibrate import observe_channels
from graphopt.ir.linears import find_linears

__all__ = ["LayerOutliers", "OutlierReport", "outlier_report"]


@dataclass
class LayerOutliers:
    """One linear's input statistics over the calibration tokens."""

    layer: str
    channels: int
    tokens: int
    absmax: float
    max_over_median: float
    kurtosis: float
    outlier_channels: list[int]


@dataclass
class OutlierReport:
    """Per linear, worst first (by max over median)."""

    threshold: float
    layers: list[LayerOutliers] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "layers": [asdict(layer) for layer in self.layers]}

    def __str__(self) -> str:
        rows = [
            [
                layer.layer,
                f"{layer.absmax:.3g}",
                f"{layer.max_over_median:.1f}",
                f"{layer.kurtosis:.1f}",
                f"{len(layer.outlier_channels)} {layer.outlier_channels[:6]}{'...' if len(layer.outlier_channels) > 6 else ''}",
            ]
            for layer in self.layers
        ]
        headers = ["linear (input of)", "max |x|", "max/median channel", "kurtosis", f"channels > {self.threshold:g}"]
        return tabulate(rows, headers=headers)


def outlier_report(
    model: torch.nn.Module, example_inputs: Any, *, calibration: Sequence[Any] = (), threshold: float = 6.0, dynamic_shapes: Any = "auto"
) -> OutlierReport:
    """Capture ``model`` (canonical graph), run it on the example and ``calibration`` inputs
    (tuples of positional inputs) and report every linear's input channels. Linears that share an
    input (q, k, v) are reported once, under the first."""
    opt = optimize(model, ["canonicalize"], example_inputs, dynamic_shapes=dynamic_shapes, verify=False)
    gm = opt.graph_module
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    batches = [(args, {})] + [(b if isinstance(b, tuple) else (b,), {}) for b in calibration]
    first_reader: dict = {}
    for lin in find_linears(gm):
        first_reader.setdefault(lin.x, lin)
    stats = observe_channels(gm, first_reader, batches)
    report = OutlierReport(threshold)
    for x, lin in first_reader.items():
        s = stats.get(x)
        if s is None:
            continue
        report.layers.append(
            LayerOutliers(lin.name.removesuffix(".weight"), len(s.absmax), s.tokens, float(s.absmax.max()), s.max_over_median, s.kurtosis, s.outliers(threshold).tolist())
        )
    report.layers.sort(key=lambda layer: layer.max_over_median, reverse=True)
    return report
