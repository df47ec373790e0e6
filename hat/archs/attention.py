"""Attention kernels shared by HAT's window attention and overlapping cross-attention.

Two interchangeable paths compute ``softmax(q k^T * scale + mask) v``:

* fused (default): the relative-position bias and, for shifted windows, the shift mask are folded into one additive
  mask shared by all windows, and the kernel is chosen for the device and precision:
  ``scaled_dot_product_attention`` (on the CPU: its flash kernel, which never materialises the attention map) for
  fp32 inference and on CUDA; one fused oneDNN Graph kernel (:mod:`hat.archs.onednn_graph`) for bf16 inference on
  a CPU with native bf16 and for fp32 inference where the CPU's fp32 products run on oneDNN (AMD's AVX-512 CPUs,
  Intel's without bf16);
  :func:`chunked_attention` (explicit products over a few windows at a time) for the rest of bf16/fp16 and for
  training on the CPU, where it is the faster of the two (in bf16 training with native bf16, its forward is the
  fused kernel and its backward recomputes the weights).
* reference: the explicit computation in the official order (scale q, matmul, add bias, add mask, softmax, matmul),
  kept selectable so that tests can prove the fused path computes the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from hat.archs import onednn_graph
from hat.archs.window import compiling


# Upper bound on the elements of one chunk of attention logits in :func:`chunked_attention`: a few MB, so that a
# chunk's logits stay in cache between the two products and inference memory does not grow with the image.
LOGITS_CHUNK_ELEMENTS = 1 << 21
# bf16 training on CPUs with native bf16: the attention's forward as the fused oneDNN Graph kernel, P recomputed in
# the backward (see :class:`_ChunkedAttention`). False: P kept from a chunked forward, as in fp32.
RECOMPUTE_BF16 = True


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
    out = None
    if dropout_p == 0 and _takes_onednn_graph(q, k, v, attn_mask):
        out = onednn_graph.fused_attention(q, k, v, attn_mask.to(q.dtype), scale=scale)
    if out is None:
        # On the CPU the flash kernel is the fastest of the rest only in fp32 inference: it is not faster in bf16,
        # and when the bias needs a gradient (training) PyTorch falls back to an unfused kernel slower than the
        # chunked one.
        mask_needs_grad = torch.is_grad_enabled() and attn_mask.requires_grad
        if q.device.type == 'cpu' and dropout_p == 0 and (q.dtype in (torch.bfloat16, torch.float16)
                                                          or mask_needs_grad):
            out = chunked_attention(q, k, v, attn_mask, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout_p,
                                                 scale=scale)
    return out.view(*lead, *out.shape[-3:])


# How many Python dispatch modes are active (0 in a PyTorch without the counter: the fused path then relies on its
# own fallback).
_DISPATCH_MODES = getattr(torch._C, '_len_torch_dispatch_stack', lambda: 0)


def _takes_onednn_graph(q: Tensor, *others: Tensor) -> bool:
    """Whether attention of query ``q`` (and k, v, mask: ``others``) runs as one oneDNN Graph kernel: q a CPU tensor
    of a dtype that :func:`hat.archs.onednn_graph.available` says the kernel serves on this CPU (the mask is
    converted to it), without autograd (inference, or the forward of an autograd function), not while
    ``torch.compile`` or an exporter traces. Not under a Python dispatch mode (the memory measurement of
    ``tile='auto'``, fake tensors) nor on tensor subclasses either: TorchScript cannot trace through them."""
    # Tracing first: what follows would not trace (the dispatch-mode count is no tensor operation).
    if q.device.type != 'cpu' or compiling() or torch.jit.is_tracing():
        return False
    tensors = (q, *others)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if _DISPATCH_MODES() > 0 or any(type(t) is not Tensor for t in tensors):
        return False
    return onednn_graph.available(q.dtype)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, *, scale: float) -> Tensor:
    """Explicit attention over chunks of windows: the CPU path for bf16/fp16 and for training.

    PyTorch's CPU flash kernel is no faster in bf16 than in fp32 on HAT's windows (head size 30), while oneDNN's
    bf16 matrix products are about four times faster than fp32 ones; and when the mask needs a gradient, PyTorch
    replaces the flash kernel by a slower unfused one. Everything runs in the inputs' precision (the softmax
    accumulates in fp32 internally; an fp32 mask and softmax measured 6% slower for the same PSNR). Computing a few
    windows at a time keeps the logits in cache and bounds the memory. With autograd, :class:`_ChunkedAttention`
    computes the backward chunk by chunk as well (autograd through the slices would add a zero-filled full-size
    gradient per chunk and input).

    Args:
        q: [W, heads, Nq, d]; k, v: [W, heads, Nk, d]; attn_mask: [W or 1, heads, Nq, Nk].
    Returns:
        [W, heads, Nq, d].
    """
    attn_mask = attn_mask.to(q.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, attn_mask)):
        return _ChunkedAttention.apply(q, k, v, attn_mask, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = q.new_empty(q.shape)
    for part in _chunks(q, k):
        weights = _attention_weights(q[part], k[part], attn_mask, part, scale)
        torch.bmm(weights, _fold(v[part]), out=_fold(out[part]))
    return out


def _chunks(q: Tensor, k: Tensor) -> list[slice]:
    """Slices of the windows such that one slice's logits hold at most :data:`LOGITS_CHUNK_ELEMENTS`."""
    windows, heads, n_q, _ = q.shape
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // (heads * n_q * k.shape[-2]))
    return [slice(start, start + chunk) for start in range(0, windows, chunk)]


def _fold(t: Tensor) -> Tensor:
    """[w, heads, N, d] -> [w * heads, N, d]: a view of a contiguous tensor or of a slice of its windows."""
    return t.view(-1, *t.shape[-2:])


def _attention_weights(q: Tensor, k: Tensor, attn_mask: Tensor, part: slice, scale: float) -> Tensor:
    """softmax((q * scale) k^T + mask) of one chunk of contiguous q [w, heads, Nq, d], k: [w * heads, Nq, Nk]."""
    logits = torch.bmm(_fold(q) * scale, _fold(k).transpose(1, 2))  # the transposed view costs no copy in bmm
    # In place: one multi-MB buffer less to allocate, which costs page faults on the CPU.
    logits.view(*q.shape[:-1], -1).add_(attn_mask if attn_mask.shape[0] == 1 else attn_mask[part])
    return torch.softmax(logits, dim=-1)


class _ChunkedAttention(torch.autograd.Function):
    """:func:`chunked_attention` with a chunked backward; the attention weights are kept for it (first-order only).

    With P the weights of a chunk and dO the output gradient: dV = P^T dO, dS = P * (dO V^T - rowsum(...)) (the
    softmax backward), dQ = scale * dS K, dK = scale * dS^T Q, and the mask's gradient is dS (summed over the
    windows when one mask serves them all).

    In bf16 where the fused oneDNN Graph kernel serves (:func:`_takes_onednn_graph`; the forward runs without
    autograd), the forward is that kernel and the backward recomputes each chunk's P (:data:`RECOMPUTE_BF16`):
    the kernel keeps its logits in cache, and no P is written out and read back (over a GB per HAT-S iteration at
    batch 4, 48x48). P is then recomputed at bf16 rounding from the forward's own. In fp32 recomputing P made the
    iteration 7% slower (Zen 4; slower still with PyTorch's flash kernel as the forward), so fp32 keeps the weights.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, scale: float) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        ctx.scale = scale
        ctx.mask_shape = attn_mask.shape
        if RECOMPUTE_BF16 and q.dtype == torch.bfloat16 and _takes_onednn_graph(q, k, v, attn_mask):
            out = onednn_graph.fused_attention(q, k, v, attn_mask, scale=scale)
            if out is not None:
                ctx.save_for_backward(q, k, v, attn_mask)
                return out
        out = q.new_empty(q.shape)
        weights = []
        for part in _chunks(q, k):
            weights.append(_attention_weights(q[part], k[part], attn_mask, part, scale))
            torch.bmm(weights[-1], _fold(v[part]), out=_fold(out[part]))
        ctx.save_for_backward(q, k, v, None, *weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        q, k, v, attn_mask, *weights = ctx.saved_tensors
        scale, shared_mask = ctx.scale, ctx.mask_shape[0] == 1
        if attn_mask is not None:  # the forward was the fused kernel: recompute P chunk by chunk
            weights = (_attention_weights(q[part], k[part], attn_mask, part, scale) for part in _chunks(q, k))
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # A shared mask's gradient is the sum of every window's logit gradient, accumulated in fp32.
        grad_mask = (q.new_zeros(ctx.mask_shape[1:], dtype=torch.float32) if shared_mask
                     else q.new_empty(ctx.mask_shape))
        for part, p in zip(_chunks(q, k), weights):
            d_out = _fold(grad_out[part])
            # dV and dK are computed transposed (dO^T P and Q^T dS, [w * heads, d, Nk]) and copied into place: a
            # product whose first operand is the transposed [Nq, Nk] map ran 1.1-1.3x slower in fp32 and 1.5-1.6x in
            # bf16 (Zen 4, 2 threads, heads of 24), more than the copy of the small result costs.
            _fold(grad_v[part]).copy_(torch.bmm(d_out.transpose(1, 2), p).transpose(1, 2))
            # The softmax's backward in place over dP = dO V^T (row by row it reads all of a row before it writes
            # it): no second [w * heads, Nq, Nk] buffer, and the backward of HAT-S's window attention and of its OCAB
            # at batch 4, 48x48, ran 1.05x faster, the same results (Ice Lake, 2 threads, settled heap; the tests
            # compare the gradients with autograd's). In place in the forward, the softmax was slower (0.91-0.93x,
            # glibc's default heap).
            d_logits = torch.bmm(d_out, _fold(v[part]).transpose(1, 2))
            torch.ops.aten._softmax_backward_data.out(d_logits, p, -1, p.dtype, grad_input=d_logits)
            per_window = d_logits.view(*q[part].shape[:-1], -1)
            if shared_mask:
                _add_window_sum(grad_mask, per_window)
            else:
                grad_mask[part] = per_window
            torch.bmm(d_logits, _fold(k[part]), out=_fold(grad_q[part])).mul_(scale)
            torch.mul(torch.bmm(_fold(q[part]).transpose(1, 2), d_logits).transpose(1, 2), scale,
                      out=_fold(grad_k[part]))
        if shared_mask:
            grad_mask = grad_mask.to(q.dtype).view(ctx.mask_shape)
        return grad_q, grad_k, grad_v, grad_mask, None


def _add_window_sum(total: Tensor, per_window: Tensor) -> None:
    """``total += per_window.sum(0)``: a chunk's logit gradients [w, heads, Nq, Nk] summed over its windows into
    the fp32 gradient [heads, Nq, Nk] of a mask that all windows share.

    In fp32, one product with a row of ones, which reads ``total`` once per chunk instead of once per window (5
    windows of [6, 256, 256]: 0.29 against 0.49 ms; the backward of HAT-S's window attention and of its OCAB at
    batch 4, 48x48, both 1.04x faster, the same sums; Ice Lake, 2 threads, the heap settled as in training after its
    first iterations). In bf16 and fp16 one window at a time: PyTorch's sum over the windows (the outer dimension)
    ran 2-5x slower than these additions in bf16 (Zen 4, 2 threads) and rounded the sum to it at every chunk, and a
    product takes operands of one dtype.
    """
    if per_window.dtype == torch.float32:
        windows = per_window.shape[0]
        total.view(1, -1).addmm_(per_window.new_ones(1, windows), per_window.view(windows, -1))
    else:
        for window_grad in per_window:
            total.add_(window_grad)


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
