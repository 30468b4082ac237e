"""graphopt: verified graph rewrites for PyTorch models.

    import graphopt
    fast = graphopt.optimize(model, passes=["canonicalize", "fold_batchnorm"], example_inputs=(x,))
    print(fast.report)

See the README for the CLI (``graphopt``) and the ``torch.compile(backend="graphopt")`` backend.
"""

# Layers, each importing only from the ones before it (tests/test_layers.py checks it):
# ir <- pipeline <- ops <- passes <- backends <- frontends and tools. This facade sits on top.
from graphopt import ir  # noqa: F401
from graphopt.pipeline.manager import PassFailedError, PassManager, PassOrderError
from graphopt.pipeline.pass_base import (
    NotApplicable,
    Pass,
    PassContext,
    PassNameClashError,
    PassResult,
    UnknownPassError,
    available_passes,
    default_pass_names,
    get_pass,
    make_pass,
    pass_spec,
    register_pass,
)
from graphopt.pipeline.report import BudgetWarning, PassRecord, Report
from graphopt.pipeline.verify import Exact, MinAgreement, MinCosine
from graphopt import ops  # noqa: F401,E402  (registers the graphopt:: custom ops)
from graphopt import passes  # noqa: F401,E402  (registers the built-in passes)
from graphopt import backends  # noqa: F401,E402  (registers the built-in backends)
from graphopt.frontends.api import OptimizedModule, load, load_program, optimize, save
from graphopt.frontends.capture import CaptureError, capture
from graphopt.tools import outliers, repbn, zoo  # noqa: F401  (public: graphopt.zoo, graphopt.repbn, graphopt.outliers)
from graphopt.tools.repbn import finalize

__version__ = "0.1.0"

__all__ = [
    "BudgetWarning",
    "CaptureError",
    "Exact",
    "MinAgreement",
    "MinCosine",
    "NotApplicable",
    "OptimizedModule",
    "Pass",
    "PassContext",
    "PassFailedError",
    "PassNameClashError",
    "PassManager",
    "PassOrderError",
    "PassRecord",
    "PassResult",
    "Report",
    "UnknownPassError",
    "available_passes",
    "default_pass_names",
    "capture",
    "compile_backend",
    "finalize",
    "get_pass",
    "load",
    "load_program",
    "make_pass",
    "pass_spec",
    "optimize",
    "register_pass",
    "save",
]


def compile_backend(**options):
    """A ``torch.compile`` backend with options: ``torch.compile(m, backend=graphopt.compile_backend(passes=[...]))``."""
    from graphopt.frontends.dynamo_backend import compile_backend as make

    return make(**options)
