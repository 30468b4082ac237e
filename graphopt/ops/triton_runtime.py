"""What every Triton kernel of graphopt shares, the op folders' and the triton backend's templates alike.

Imports no Triton, so callers can ask these questions where Triton is not installed.
"""

from __future__ import annotations

import os

__all__ = ["NotLowerable", "interpreted"]


class NotLowerable(Exception):
    """A kernel cannot compute this region or these inputs; the caller runs ATen instead.

    Raised before anything launches. The triton backend's templates raise the same class
    (``graphopt.backends.triton_region.NotLowerable`` is this one), so one ``except`` covers a
    template's refusal and its kernel's.
    """


def interpreted() -> bool:
    """Whether Triton kernels run in the Triton interpreter (``TRITON_INTERPRET=1``) in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
