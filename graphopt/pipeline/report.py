"""Per-pass records and the report that ``optimize`` and the CLI print.

A :class:`Report` is data first (``report.records``, ``report.to_dict()``) and a table when
printed (``str(report)`` uses tabulate; ``report.to_markdown()`` gives a GitHub table).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from tabulate import tabulate

__all__ = ["APPLIED", "NOT_APPLICABLE", "ROLLED_BACK", "UNCHANGED", "BudgetWarning", "PassRecord", "Report", "one_line"]

APPLIED = "applied"
UNCHANGED = "unchanged"
NOT_APPLICABLE = "not applicable"
ROLLED_BACK = "rolled back"


class BudgetWarning(UserWarning):
    """The end-to-end error of a pipeline is over the combined budget of its applied passes
    (each pass was within its own budget; together they drift). Also listed in ``Report.warnings``."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, prefixed by its type and clipped to ``limit``."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


@dataclass
class PassRecord:
    """What happened to one pass of a pipeline."""

    name: str
    exact: bool
    status: str
    reason: str = ""
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    param_bytes_before: int = 0
    param_bytes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    metric: str = ""
    error: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    """The pass's options (its ``Config`` fields) in this run."""
    output_masks: Callable[..., Any] | None = field(default=None, repr=False, compare=False)
    """An applied pass's ``output_masks(reference, ctx)`` (see :class:`graphopt.pipeline.pass_base.PassResult`):
    the output positions its verification compared; kept so that tests can ask again on other
    inputs (:func:`graphopt.testing.declared_masks`). Not data: left out of :meth:`Report.to_dict`."""


def _record_data(record: PassRecord) -> dict[str, Any]:
    # a function is no data (and asdict would deep-copy it); options that are not plain data are shown by name
    options = {k: v if isinstance(v, (bool, int, float, str, tuple, list, type(None))) else getattr(v, "__name__", repr(v)) for k, v in record.options.items()}
    data = dataclasses.asdict(dataclasses.replace(record, output_masks=None, options=options))
    del data["output_masks"]
    return data


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


@dataclass
class Report:
    """The records of one pipeline run, plus what was measured end to end."""

    model: str = ""
    records: list[PassRecord] = field(default_factory=list)
    capture: str = ""
    final: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """Problems of the run as a whole, one sentence each (e.g. an end-to-end error over the combined budget)."""

    def record(self, name: str) -> PassRecord:
        """The record of the pass called ``name`` (KeyError if it was not in the pipeline)."""
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def applied(self) -> list[str]:
        return [r.name for r in self.records if r.status == APPLIED]

    def rows(self) -> list[list[Any]]:
        rows = []
        for r in self.records:
            error = "" if r.error is None else f"{r.metric} {r.error:.2e}" if r.metric == "rel_err" else f"{r.metric} {r.error:.5f}"
            rows.append(
                [
                    r.name,
                    "exact" if r.exact else "approx",
                    r.status + (f": {r.reason}" if r.reason else ""),
                    f"{r.seconds * 1e3:.0f} ms",
                    f"{r.nodes_before} → {r.nodes_after}",
                    f"{_human(r.param_bytes_before, 'B')} → {_human(r.param_bytes_after, 'B')}",
                    f"{_human(r.flops_before)} → {_human(r.flops_after)}",
                    error,
                    ", ".join(f"{k}={v}" for k, v in r.stats.items()),
                ]
            )
        return rows

    headers = ["pass", "kind", "status", "time", "ops", "params", "FLOPs", "error", "stats"]

    def table(self, tablefmt: str = "simple") -> str:
        if not self.records:
            return "(no passes)"
        widths = None if tablefmt == "github" else [None, None, 60, None, None, None, None, None, 40]
        return tabulate(self.rows(), headers=self.headers, tablefmt=tablefmt, maxcolwidths=widths)

    def __str__(self) -> str:
        head = f"graphopt report{f' for {self.model}' if self.model else ''}"
        lines = [head, self.table()]
        if self.final:
            lines.append("end to end: " + ", ".join(f"{k}={v}" for k, v in self.final.items()))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        parts = [f"# graphopt report{f': {self.model}' if self.model else ''}", ""]
        if self.capture:
            parts += [f"Captured with {self.capture}.", ""]
        parts.append(self.table("github") if self.records else "(no passes)")
        if self.final:
            parts += ["", "End to end: " + ", ".join(f"{k} = {v}" for k, v in self.final.items())]
        if self.warnings:
            parts += ["", *(f"**Warning:** {w}" for w in self.warnings)]
        return "\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "capture": self.capture,
            "final": self.final,
            "warnings": list(self.warnings),
            "records": [_record_data(r) for r in self.records],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
