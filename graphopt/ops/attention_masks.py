"""What an SDPA ``attn_mask`` says about the keys, for the attention ops that replace SDPA.

Linear, hybrid and sliding-window attention are fast when the mask factors per key: a key-padding
mask (the same row for every query), or a causal mask times one (a Hugging Face decoder passes that
materialized, with ``is_causal=False``). These helpers decide it on the mask's values, reading a
materialized ``[.., L, S]`` mask ``CHECK_ROWS`` rows at a time in its own dtype, so that the check
never builds ``[L, S]`` float temporaries. ``graphopt.ops.linear_attention`` and
``graphopt.ops.sparse_attention`` both use them; they import nothing of graphopt.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CHECK_ROWS", "causal_keep", "causal_key_row", "hides_later_keys", "key_row", "mask_block", "mask_weights"]

CHECK_ROWS = 512
"""Rows of a mask the checks read at a time (their temporaries are ``O(CHECK_ROWS · S)``)."""


def mask_weights(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """SDPA's ``attn_mask`` as the multiplicative weight softmax gives each key: a boolean mask as
    1 (attend) / 0, an additive mask ``m`` as ``exp(m)`` (0 -> 1, -inf or dtype-min -> 0)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return attn_mask.to(dtype)
    return torch.exp(attn_mask.to(dtype))


def causal_keep(length_q: int, length_k: int, device=None) -> Tensor:
    """SDPA's ``is_causal`` mask: True where ``j <= i``, aligned at the top-left corner."""
    return torch.ones(length_q, length_k, dtype=torch.bool, device=device).tril()


def mask_block(mask: Tensor, row_start: int, row_end: int, col_start: int, col_end: int) -> Tensor:
    """Rows ``row_start:row_end`` and columns ``col_start:col_end`` of a mask broadcastable to ``[.., L, S]``,
    broadcast dims (size 1) left as they are: a view, never the expanded mask."""
    rows = mask if mask.shape[-2] == 1 else mask[..., row_start:row_end, :]
    return rows if rows.shape[-1] == 1 else rows[..., col_start:col_end]


def hides_later_keys(attn_mask: Tensor | None, length_q: int, length_k: int) -> bool:
    """Whether ``attn_mask`` gives every key after its query weight 0 (a causal mask, perhaps with padding).

    Read ``CHECK_ROWS`` rows at a time, first rows first (a bidirectional mask answers at once)."""
    if attn_mask is None or length_q != length_k or length_q < 2:
        return False
    mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask.dim() < 2 else attn_mask
    for start in range(0, length_q, CHECK_ROWS):
        end = min(start + CHECK_ROWS, length_q)
        rows = mask_block(mask, start, end, 0, length_k)
        square = mask_block(rows, 0, end - start, start, end)  # the block's square on the diagonal
        later = ~causal_keep(end - start, end - start, mask.device)
        if bool((mask_weights(square, torch.float32) * later).any()):
            return False
        if end < length_k and bool(mask_weights(mask_block(rows, 0, end - start, end, length_k), torch.float32).any()):
            return False
    return True


def key_row(attn_mask: Tensor | None) -> Tensor | None | bool:
    """SDPA's mask as a per-key mask ``[B|1, H|1, S]`` when it is one (the same for every query),
    None when there is no mask, False when it depends on the query."""
    if attn_mask is None:
        return None
    if attn_mask.dim() > 4:
        return False
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.shape[2] == 1 or mask.stride(2) == 0:
        return mask[:, :, 0]
    first = mask[:, :, :1]
    if torch.equal(mask, first.expand_as(mask)):  # materialised from a [B, 1, 1, S] padding mask
        return first[:, :, 0]
    return False


def causal_key_row(attn_mask: Tensor, length_q: int, length_k: int) -> Tensor | bool:
    """A mask that, at or before each query (``j <= i``), is one per-key mask: that mask ``[B|1, H|1, S]``
    (its last row), else False. Where only those keys are read (causal attention), a decoder's
    ``tril ∧ keys`` mask is its key-padding row."""
    if attn_mask.dim() < 2 or attn_mask.dim() > 4 or length_q != length_k:
        return False
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    last = mask_block(mask, length_q - 1, length_q, 0, length_k)  # [B', H', 1, S|1]
    for start in range(0, length_q, CHECK_ROWS):
        end = min(start + CHECK_ROWS, length_q)
        later = torch.arange(end, device=mask.device) > torch.arange(start, end, device=mask.device)[:, None]  # j > i
        if not bool(((mask_block(mask, start, end, 0, end) == mask_block(last, 0, 1, 0, end)) | later).all()):
            return False
    return last[:, :, 0].expand(*last.shape[:2], length_k)
