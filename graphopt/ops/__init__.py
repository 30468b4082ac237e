"""graphopt's custom operators (``torch.ops.graphopt.*``), one folder per op or op family.

Importing this package registers every op with ``torch.library``.
"""

from graphopt.ops import norms  # noqa: F401  (graphopt::rms_norm, graphopt::crms_norm)
from graphopt.ops import varlen  # noqa: F401  (graphopt::pack_tokens, unpack_tokens, varlen_attention)
