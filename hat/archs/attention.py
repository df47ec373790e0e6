"""Attention kernels shared by HAT's window attention and overlapping cross-attention.

Two interchangeable paths compute ``softmax(q k^T * scale + mask) v``:

* fused (default): the relative-position bias and, for shifted windows, the shift mask are folded into one additive
  mask shared by all windows, and the kernel is chosen for the device and precision:
  ``scaled_dot_product_attention`` (on the CPU: its flash kernel, which never materialises the attention map) for
  fp32 inference and on CUDA; :func:`chunked_attention` (explicit products over a few windows at a time) for bf16/fp16
  and for training on the CPU, where it is the faster of the two.
* reference: the explicit computation in the official order (scale q, matmul, add bias, add mask, softmax, matmul),
  kept selectable so that tests can prove the fused path computes the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# Upper bound on the elements of one chunk of attention logits in :func:`chunked_attention`: a few MB, so that a
# chunk's logits stay in cache between the two products and inference memory does not grow with the image.
LOGITS_CHUNK_ELEMENTS = 1 << 21


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, *, scale: float, fused: bool,
              dropout_p: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention with an additive bias and an optional additive mask.

    Args:
        q: [..., heads, Nq, d].
        k, v: [..., heads, Nk, d].
        bias: additive, broadcastable to [..., heads, Nq, Nk] (relative-position bias).
        scale: multiplier of ``q k^T``.
        fused: use the fast kernels (bias and mask summed into one additive mask), else the reference path.
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode).
        mask: optional further additive term broadcastable like ``bias`` (shift mask).
    Returns:
        [..., heads, Nq, d].
    """
    if not fused:
        return reference_attention(q, k, v, bias, scale=scale, dropout_p=dropout_p, mask=mask)
    attn_mask = bias if mask is None else bias + mask
    lead, tail = q.shape[:-3], attn_mask.shape[-3:]
    # The kernels take [batch, heads, N, d]; the window dimensions fold into the batch (views for HAT's layouts).
    q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    if attn_mask.ndim > 3:  # one mask per window
        attn_mask = attn_mask.expand(*lead, *tail).reshape(-1, *tail)
    else:
        # Shared by all windows. As [heads, Nq, Nk] the CPU dispatcher would take the unfused math kernel (4x slower
        # on HAT's windows); as [1, heads, Nq, Nk] it broadcasts inside the flash kernel.
        attn_mask = attn_mask.unsqueeze(0)
    # On the CPU the flash kernel is the fastest only in fp32 inference: it is not faster in bf16, and when the bias
    # needs a gradient (training) PyTorch falls back to an unfused kernel slower than the chunked one.
    mask_needs_grad = torch.is_grad_enabled() and attn_mask.requires_grad
    if q.device.type == 'cpu' and dropout_p == 0 and (q.dtype in (torch.bfloat16, torch.float16) or mask_needs_grad):
        out = chunked_attention(q, k, v, attn_mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout_p,
                                             scale=scale)
    return out.view(*lead, *out.shape[-3:])


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, *, scale: float) -> Tensor:
    """Explicit attention over chunks of windows: the CPU path for bf16/fp16 and for training.

    PyTorch's CPU flash kernel is no faster in bf16 than in fp32 on HAT's windows (head size 30), while oneDNN's
    bf16 matrix products are about four times faster than fp32 ones; and when the mask needs a gradient, PyTorch
    replaces the flash kernel by a slower unfused one. Everything runs in the inputs' precision (the softmax
    accumulates in fp32 internally; an fp32 mask and softmax measured 6% slower for the same PSNR). Computing a few
    windows at a time keeps the logits in cache and bounds the memory.

    Args:
        q: [W, heads, Nq, d]; k, v: [W, heads, Nk, d]; attn_mask: [W or 1, heads, Nq, Nk].
    Returns:
        [W, heads, Nq, d].
    """
    windows, heads, n_q, _ = q.shape
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // (heads * n_q * k.shape[-2]))
    attn_mask = attn_mask.to(q.dtype)
    outs = []
    for start in range(0, windows, chunk):
        part = slice(start, start + chunk)
        logits = torch.matmul(q[part] * scale, k[part].transpose(-2, -1))
        # In place (autograd allows it: the product's backward needs its inputs, not its output): one multi-MB
        # buffer less to allocate, which costs page faults on the CPU.
        logits.add_(attn_mask if attn_mask.shape[0] == 1 else attn_mask[part])
        outs.append(torch.matmul(torch.softmax(logits, dim=-1), v[part]))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, *, scale: float, dropout_p: float = 0.0,
                        mask: Tensor | None = None) -> Tensor:
    """The official computation, in its order: scale q, multiply, add the bias, add the mask, softmax, multiply.

    Shapes as in :func:`attention`.
    """
    logits = (q * scale) @ k.transpose(-2, -1)
    logits = logits + bias
    if mask is not None:
        logits = logits + mask
    weights = torch.softmax(logits, dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v
