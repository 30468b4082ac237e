"""Rewrite passes (installed as graphopt.passes)."""

from graphopt.passes import attention_to_linear  # noqa: F401
from graphopt.passes import attention_to_sparse  # noqa: F401
from graphopt.passes import canonicalize  # noqa: F401
from graphopt.passes import cast_bf16  # noqa: F401
from graphopt.passes import fold_batchnorm  # noqa: F401
from graphopt.passes import fold_repbn  # noqa: F401  (not registered: graphopt.finalize runs it)
from graphopt.passes import layernorm_to_repbn  # noqa: F401
from graphopt.passes import layernorm_to_rmsnorm  # noqa: F401
from graphopt.passes import merge_tokens  # noqa: F401
from graphopt.passes import prune_tokens  # noqa: F401
from graphopt.passes import quantize_int8  # noqa: F401
from graphopt.passes import quantize_weights  # noqa: F401
from graphopt.passes import remove_padding  # noqa: F401
from graphopt.passes import smooth_quant  # noqa: F401
