"""Attention kernels shared by HAT's window attention and overlapping cross-attention.

Two interchangeable paths compute ``softmax(q k^T * scale + mask) v``:

* fused: ``torch.nn.functional.scaled_dot_product_attention`` with the relative-position bias (and, for shifted
  windows, the shift mask) folded into one additive ``attn_mask``; never materialises the attention map on kernels
  that tile it, and is the default.
* reference: the explicit computation in the official order (scale q, matmul, add bias, add mask, softmax, matmul),
  kept selectable so that tests can prove the fused path computes the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, *, scale: float, fused: bool,
              dropout_p: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention with an additive bias and an optional additive mask.

    Args:
        q: [..., heads, Nq, d].
        k, v: [..., heads, Nk, d].
        bias: additive, broadcastable to [..., heads, Nq, Nk] (relative-position bias).
        scale: multiplier of ``q k^T``.
        fused: use ``scaled_dot_product_attention`` (bias and mask summed into one ``attn_mask``).
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode).
        mask: optional further additive term broadcastable like ``bias`` (shift mask).
    Returns:
        [..., heads, Nq, d].
    """
    if fused:
        attn_mask = bias if mask is None else bias + mask
        if attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)
        if q.ndim > 4:  # the tiled CPU/GPU kernels take [batch, heads, N, d]; other shapes fall back to the math path
            lead = q.shape[:-3]
            if attn_mask.ndim > 3:
                attn_mask = attn_mask.expand(*lead, *attn_mask.shape[-3:]).flatten(0, -4)
            out = F.scaled_dot_product_attention(q.flatten(0, -4), k.flatten(0, -4), v.flatten(0, -4),
                                                 attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
            return out.view(*lead, *out.shape[-3:])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    logits = (q * scale) @ k.transpose(-2, -1)
    logits = logits + bias
    if mask is not None:
        logits = logits + mask
    weights = torch.softmax(logits, dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v
