"""graphopt's custom operators (``torch.ops.graphopt.*``), one folder per op or op family.

Each folder holds everything about its ops: the reference (``reference.py``, the definition the
kernels are tested against), its kernels beside it (``cpu.c``/``cpu.py``, ``triton.py``), and in its
``__init__.py`` the ``torch.library.custom_op`` definitions and one
:class:`~graphopt.ir.oprecord.OpRecord` per op (fake, kernels, FLOP rule, fusion kind, token-wise
rule, inductor decomposition, eager fast path, Triton lowering), entered with
:func:`~graphopt.ir.oprecord.register_op`. Analyses, passes and backends read the records
(:func:`~graphopt.ir.oprecord.op_record`) and never name an op's module, so adding an op means
adding one folder and importing it here.

Importing this package registers every op with ``torch.library`` and fills the registry.
"""

from graphopt.ops import norms  # noqa: F401  (graphopt::rms_norm, graphopt::crms_norm)
from graphopt.ops import varlen  # noqa: F401  (graphopt::pack_tokens, unpack_tokens, varlen_attention, sum_tokens, select_token)
from graphopt.ops import quant  # noqa: F401  (graphopt::int8_linear, weight_only_linear)
from graphopt.ops import linear_attention  # noqa: F401  (graphopt::linear_attention, hybrid_attention and their varlen forms)
from graphopt.ops import sparse_attention  # noqa: F401  (graphopt::window_attention, block_sparse_attention, varlen_window_attention)
