"""Attention on the CPU as one fused oneDNN Graph partition: bf16 inference and the forward of bf16 training where
bf16 is native, and fp32 inference on AMD's AVX-512 CPUs and Intel's without bf16.

oneDNN's graph API recognises ``softmax(q k^T * scale + mask) v`` and runs it as one kernel that keeps each block
of logits in cache between its two products and runs them on the CPU's bf16 instructions (AVX512-BF16, AMX).
PyTorch reaches it through TorchScript: a traced and frozen module of exactly that pattern, run with oneDNN fusion
on, is rewritten into one fusion group. On a Zen 4 (2 threads), HAT x4's forward at 128x128 under bf16 autocast took
4.00 s with it against 4.37 s with :func:`~hat.archs.attention.chunked_attention` (eight alternated rounds), one
chunk of 4 windows alone 1.3-1.6x less; with HAT-demo's small heads (12 channels, windows of 8) it was neither
faster nor slower. bf16 takes this path only where the CPU computes bf16 natively (where torch emulates it, oneDNN
would too). bf16 training runs its attention's forward here too, its backward recomputing the weights
(:class:`~hat.archs.attention._ChunkedAttention`).

fp32 inference takes it where the CPU's fp32 products run on oneDNN (:func:`hat.archs.linear.cpu_product_library`: AMD's
AVX-512 CPUs, Intel's without bf16): PyTorch's flash kernel multiplies its blocks with MKL, which takes a slower code
path on AMD processors. Zen 4 (2 threads), 4 windows x 6 heads of 32 channels: 126-131 against 93-99 GFLOP/s for the
flash kernel; HAT x4's fp32 forward at 128x128 5.89 against 6.24 s (medians of 12 alternated rounds, each setting in a
process of its own; outputs within 4.8e-7). oneDNN's fp32 softmax rounds differently: about 1e-6 from the flash kernel
per attention with random inputs.

TorchScript is deprecated: the path is feature-detected, its FutureWarnings are silenced, and any failure (tracing,
an API gone from a later PyTorch) turns it off for the process with one warning; callers then run the chunked
attention. One traced module serves one set of input shapes and strides (TorchScript specialises on them): the
most recent :data:`MAX_SPECIALISATIONS` are kept.
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
from torch import Tensor

from hat.utils.cpu import X86_BF16_FLAGS

MAX_SPECIALISATIONS = 32
# False: bf16 attention runs chunked everywhere (to compare the two: ``benchmarks/alternate.py --precision bf16
# --set hat.archs.onednn_graph.ENABLED=False``) and fp32 attention on PyTorch's flash kernel.
ENABLED = True
# False: fp32 inference keeps PyTorch's flash kernel (``benchmarks/alternate.py --processes --set
# hat.archs.onednn_graph.FP32=False``).
FP32 = True

_specialisations: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()
_failed: list[str] = []  # the reason, once the path has been turned off
# Guards the cache and the builds: one build at a time, as each switches the process-wide fusion setting.
_lock = threading.Lock()


class _AttentionPattern(nn.Module):
    """The computation as oneDNN's fusion pass recognises it (the scale a constant of the frozen module)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor) -> Tensor:
        logits = torch.matmul(q, k.transpose(-2, -1)) * self.scale + attn_mask
        return torch.matmul(torch.softmax(logits, -1), v)


def native_bf16_products() -> bool:
    """Whether oneDNN runs bf16 products on this CPU's own bf16 instructions: the precision policy's detection
    (:func:`hat.inference.precision.native_cpu_bf16`), x86's AVX512-BF16 or AMX only (the fused kernel is x86's)."""
    from hat.inference.precision import native_cpu_bf16  # here: hat.inference imports hat.archs
    return native_cpu_bf16() in X86_BF16_FLAGS


def onednn_fp32_products() -> bool:
    """Whether this CPU's fp32 products run on oneDNN rather than MKL (:func:`hat.archs.linear.cpu_product_library`:
    AMD's AVX-512 CPUs, Intel's without bf16)."""
    from hat.archs.linear import cpu_product_library
    return cpu_product_library() == 'onednn'


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether :func:`fused_attention` can serve inputs of ``dtype``: :data:`ENABLED`, a PyTorch with oneDNN and
    TorchScript's oneDNN fusion, no failure so far, and for bf16 a CPU with native bf16 products, for fp32
    (:data:`FP32`) a CPU whose fp32 products run on oneDNN."""
    if not (ENABLED and not _failed and torch.backends.mkldnn.is_available()
            and hasattr(torch.jit, 'enable_onednn_fusion')):
        return False
    if dtype == torch.bfloat16:
        return native_bf16_products()
    return dtype == torch.float32 and FP32 and onednn_fp32_products()


def fused_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, *, scale: float) -> Tensor | None:
    """``softmax(q k^T * scale + attn_mask) v`` as one oneDNN Graph kernel, without autograd; None (after one
    warning, the first time) where the path fails, for the caller to compute it otherwise.

    Args:
        q: [W, heads, Nq, d]; k, v: [W, heads, Nk, d] (any strides); attn_mask: [1 or W, heads, Nq, Nk], q's dtype.
    Returns:
        [W, heads, Nq, d], or None.
    """
    key = (scale, *((t.shape, t.stride(), t.dtype) for t in (q, k, v, attn_mask)))
    try:
        with _lock:
            module = _specialisations.get(key)
            if module is None:
                module = _specialisations[key] = _build(q, k, v, attn_mask, scale)
                while len(_specialisations) > MAX_SPECIALISATIONS:
                    _specialisations.popitem(last=False)
            else:
                _specialisations.move_to_end(key)
        with torch.autocast('cpu', enabled=False):  # the inputs have their dtype already: autocast would add casts
            return module(q, k, v, attn_mask)
    except Exception as error:  # noqa: BLE001 - any failure of the deprecated machinery: fall back, never break
        _failed.append(f'{type(error).__name__}: {error}')
        with _lock:
            _specialisations.clear()
        warnings.warn(f'oneDNN Graph attention turned off, the chunked attention serves instead ({_failed[-1]})',
                      RuntimeWarning, stacklevel=2)
        return None


def _build(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, scale: float) -> torch.jit.ScriptModule:
    """Trace, freeze and run the pattern twice with oneDNN fusion on: TorchScript's profiling executor records the
    shapes in the first run and fuses in the second; the fused plan is kept by the module. The process-wide fusion
    setting is restored afterwards. Called with :data:`_lock` held."""
    previous = torch._C._jit_llga_enabled()
    # Traced detached: from an autograd function's forward (training) the inputs may be non-leaf tensors that need
    # a gradient, whose .grad the tracer reads with a warning.
    q, k, v, attn_mask = (t.detach() for t in (q, k, v, attn_mask))
    try:
        with warnings.catch_warnings(), torch.autocast('cpu', enabled=False):
            # TorchScript's deprecation notices: a FutureWarning in torch 2.14, a DeprecationWarning in 2.11 (which
            # under an 'error' filter would turn this path off).
            warnings.simplefilter('ignore', FutureWarning)
            warnings.simplefilter('ignore', DeprecationWarning)
            torch.jit.enable_onednn_fusion(True)
            module = torch.jit.freeze(torch.jit.trace(_AttentionPattern(scale).eval(), (q, k, v, attn_mask)))
            for _ in range(2):
                module(q, k, v, attn_mask)
    finally:
        torch.jit.enable_onednn_fusion(previous)
    return module


def reset() -> None:
    """Forget the traced modules and any failure (tests)."""
    _specialisations.clear()
    _failed.clear()
