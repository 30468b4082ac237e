"""graphopt: verified graph rewrites for PyTorch models.

    import graphopt
    fast = graphopt.optimize(model, passes=["canonicalize", "fold_batchnorm"], example_inputs=(x,))
    print(fast.report)

See the README for the CLI (``graphopt``) and the ``torch.compile(backend="graphopt")`` backend.
"""

from graphopt import ops  # noqa: F401  (registers the graphopt:: custom ops)
from graphopt import varlen  # noqa: F401  (registers graphopt::pack_tokens, unpack_tokens, varlen_attention)
from graphopt.api import OptimizedModule, load, optimize, save
from graphopt.capture import CaptureError, capture
from graphopt.manager import PassFailedError, PassManager, PassOrderError
from graphopt.pass_base import (
    Pass,
    PassContext,
    PassResult,
    UnknownPassError,
    available_passes,
    get_pass,
    make_pass,
    register_pass,
)
from graphopt.report import PassRecord, Report
from graphopt.repbn import finalize
from graphopt.verify import Exact, MinCosine

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "Exact",
    "MinCosine",
    "OptimizedModule",
    "Pass",
    "PassContext",
    "PassFailedError",
    "PassManager",
    "PassOrderError",
    "PassRecord",
    "PassResult",
    "Report",
    "UnknownPassError",
    "available_passes",
    "capture",
    "compile_backend",
    "finalize",
    "get_pass",
    "load",
    "make_pass",
    "optimize",
    "register_pass",
    "save",
]


def compile_backend(**options):
    """A ``torch.compile`` backend with options: ``torch.compile(m, backend=graphopt.compile_backend(passes=[...]))``."""
    from graphopt.dynamo_backend import compile_backend as make

    return make(**options)
