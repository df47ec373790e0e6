"""HAT's token-wise linear layers and MLP, with the matrix-product library and row chunking chosen for the CPU.

Every HAT linear layer multiplies a long list of tokens ([B * H * W, C], tens of thousands of rows) by a small
weight (C = 144 or 180). On the CPU, in fp32, two things decide the speed of such products:

* the library. PyTorch sends fp32 products to MKL, which on AMD processors takes a code path that reaches under half
  of what oneDNN's AVX-512 kernels reach (one Zen 5 core, [4096, 180] x [180, 540]: 95 against 225 GFLOP/s; two Zen 4
  cores: 117 against 192). Where PyTorch runs AVX2 kernels, MKL is as fast or faster (Zen 3, 2 threads: 135 against
  117 GFLOP/s for row chunks of the qkv product), and on Intel's AVX-512 processors with bf16 instructions (a
  Sapphire Rapids Xeon, 2 threads) it was too: forward products alike, and a HAT-S training iteration 25% faster,
  as MKL takes the transposed operands of the weight gradients in place where oneDNN's linear needed them copied.
  On an Ice Lake Xeon (AVX-512 without bf16, 2 threads) oneDNN, with its chunks of 2048 rows and its fused fp32
  attention, made HAT x4's forward at 128x128 8.5-9.5% faster (17 of 18 alternated rounds) and training the same
  (0.995). :func:`cpu_product_library` picks oneDNN for AMD's AVX-512 CPUs and Intel's without bf16 (their weight
  gradients excepted, see :class:`_OneDNNLinear`) and MKL otherwise. Products into
  a new tensor without autograd (the qkv, q and output projections, fc1 with its GELU) go to oneDNN on every AVX-512
  CPU (:func:`fresh_product_library`): it adds the bias and applies the GELU while the product is in registers,
  where MKL's addmm first copies the bias into the output and GELU takes one more pass (Xeon, 2 threads, row chunks:
  [1024, 180] x [180, 540] 8-20% faster, fc1 + GELU 10%, bit-identical results).
* the size of one call. One call over all rows of a 128x128 map ran the [16384, 180] x [180, 540] qkv product at
  80-86 GFLOP/s on a Zen 3 (2 threads) with either library, the same product in chunks of 1024 rows at 135: a
  chunk's input and output stay in cache. Without autograd the products run in chunks of :data:`ROW_CHUNK` rows
  (except a product into a new tensor where oneDNN multiplies: one call, see :func:`chunked_linear`), and the MLP
  runs fc1, GELU and fc2 on one chunk before the next, so that its hidden map (twice the width of the tokens) never
  exists in full. Where oneDNN multiplies chunks of 2048 rows were the faster:
  HAT x4's forward at 128x128 on a Zen 4 (2 threads), against 1024, fp32 2.6% faster (all 8 alternated rounds, each
  setting in a process of its own), bf16 2.9% (median of 8); 4096 no faster than 2048 (0.993). Re-checked in one
  process once attention calls had grown beyond one chunk (fp32, 10 rounds each): 1024 3.5% slower, 4096 the same.

The results agree with ``F.linear`` to fp32 rounding (the sum over the input features runs in the same order).
The oneDNN operator is not covered by autocast and Inductor lowers it only for frozen weights, so all of this applies
on the CPU, in fp32, outside autocast and outside ``torch.compile``; everything else goes through ``F.linear``.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from hat.archs.window import compiling
from hat.utils.cpu import X86_BF16_FLAGS, cpu_flags, cpu_vendor

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


def _onednn_avx512() -> bool:
    """Whether PyTorch runs AVX-512 kernels on this CPU and has oneDNN's linear operator."""
    return _ONEDNN_LINEAR and torch.backends.cpu.get_cpu_capability().startswith('AVX512')


# The fp32 product library: 'auto' (:func:`detected_product_library`), or 'onednn' / 'mkl' to compare the two on a
# new machine (benchmarks/alternate.py --set; 'onednn' needs AVX-512 and oneDNN's linear operator). Read at each call;
# :data:`ROW_CHUNK` follows the library at import only, so a comparison sets it too (2048 for oneDNN, 1024 for MKL).
PRODUCT_LIBRARY = 'auto'


@functools.lru_cache(maxsize=1)
def detected_product_library() -> str:
    """Where PyTorch runs AVX-512 kernels (and has oneDNN): ``'onednn'`` on AMD CPUs and on Intel CPUs whose flags
    are known and show no bf16 instructions (Ice Lake and earlier), else ``'mkl'`` (PyTorch's own choice): on
    Intel CPUs with bf16 instructions (a Sapphire Rapids) MKL was measured as fast or faster."""
    if not _onednn_avx512():
        return 'mkl'
    vendor, flags = cpu_vendor(), cpu_flags()
    if vendor == 'AuthenticAMD' or (vendor == 'GenuineIntel' and flags and flags.isdisjoint(X86_BF16_FLAGS)):
        return 'onednn'
    return 'mkl'


def cpu_product_library() -> str:
    """The library of fp32 products on the CPU: :data:`PRODUCT_LIBRARY` where set, else the detected one."""
    if PRODUCT_LIBRARY == 'auto':
        return detected_product_library()
    if PRODUCT_LIBRARY == 'onednn' and not _onednn_avx512():
        raise ValueError("PRODUCT_LIBRARY = 'onednn' needs a PyTorch running AVX-512 kernels with oneDNN's linear")
    if PRODUCT_LIBRARY not in ('onednn', 'mkl'):
        raise ValueError(f"PRODUCT_LIBRARY = {PRODUCT_LIBRARY!r}: use 'auto', 'onednn' or 'mkl'")
    return PRODUCT_LIBRARY


# Rows per product without autograd (see the module doc); also the query tokens of one chunk of window attention
# where oneDNN Graph's kernel does not serve it (hat.archs.hat_arch.HeadAttention.windows_per_call).
ROW_CHUNK = 2048 if cpu_product_library() == 'onednn' else 1024


@functools.lru_cache(maxsize=1)
def fresh_product_library() -> str:
    """The library of products into a new tensor without autograd (:func:`fresh_linear`): ``'onednn'`` wherever
    PyTorch runs AVX-512 kernels (and has oneDNN), whatever the vendor; else ``'mkl'``."""
    return 'onednn' if _onednn_avx512() else 'mkl'


def _autocast_on_cpu() -> bool:
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def product_dtype(x: Tensor) -> torch.dtype:
    """The dtype that products of CPU tensor ``x`` run in: CPU autocast's (bf16 unless set otherwise) under it, else
    x's."""
    if not _autocast_on_cpu():
        return x.dtype
    try:
        return torch.get_autocast_dtype('cpu')
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype()


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, gelu: bool = False) -> Tensor:
    # The post-op's one string argument is its algorithm: 'none' is the erf form of GELU, as nn.GELU.
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu' if gelu else 'none', [], 'none' if gelu else '')


def linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, *, gelu: bool = False,
                residual: Tensor | None = None) -> Tensor:
    """``out = x @ weight^T + bias`` (then exact GELU if ``gelu``, or plus ``residual``) on the CPU's product library,
    without autograd.

    Args:
        out: [R, out_features], written; x: [R, in_features]; weight: [out_features, in_features];
        residual: [R, out_features] added to the product (not with ``gelu``).
    """
    if cpu_product_library() == 'onednn':  # oneDNN has no out= form: its product is copied (from cache)
        product = _onednn_linear(x, weight, bias, gelu=gelu)
        return out.copy_(product) if residual is None else torch.add(residual, product, out=out)
    if residual is not None:  # residual + bias first, then the product accumulated into it: one pass over out less
        if bias is None:
            out.copy_(residual)
        else:
            torch.add(residual, bias, out=out)
        return out.addmm_(x, weight.t())
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)
    return torch.ops.aten.gelu_(out) if gelu else out


def fresh_linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, gelu: bool = False) -> Tensor:
    """``x @ weight^T + bias`` (then exact GELU if ``gelu``) as a new tensor, without autograd, on
    :func:`fresh_product_library`. x: [R, in_features] -> [R, out_features]."""
    if fresh_product_library() == 'onednn':
        return _onednn_linear(x, weight, bias, gelu=gelu)
    return linear_into(x.new_empty(x.shape[0], weight.shape[0]), x, weight, bias, gelu=gelu)


def map_row_chunks(x: Tensor, out_features: int, fill: Callable[[Tensor, Tensor], object],
                   out: Tensor | None = None) -> Tensor:
    """Apply a token-wise computation :data:`ROW_CHUNK` rows at a time.

    Args:
        x: [..., in_features].
        fill: called as ``fill(rows, out_rows)`` with [r, in_features] rows of ``x`` and the [r, out_features] rows of
            the result that it must write.
        out: [R, out_features] (R rows in ``x``) to write the result into; a new tensor if None.
    Returns:
        [..., out_features] (a view of ``out`` when given).
    """
    rows = x.reshape(-1, x.shape[-1])
    if out is None:
        out = rows.new_empty(rows.shape[0], out_features)
    for chunk, out_chunk in zip(rows.split(ROW_CHUNK), out.split(ROW_CHUNK)):
        fill(chunk, out_chunk)
    return out.view(*x.shape[:-1], out_features)


def chunked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, gelu: bool = False,
                   out: Tensor | None = None) -> Tensor:
    """``F.linear`` (then GELU) without autograd, in row chunks on the CPU's library. x: [..., in] -> [..., out].

    ``out``: as in :func:`map_row_chunks`. Without ``out``, inputs of at most :data:`ROW_CHUNK` rows, and inputs of
    any size where oneDNN multiplies (:func:`cpu_product_library`), are one product whose result is returned as it is:
    oneDNN has no ``out=`` form, and its one call over 16384 rows ran [16384, 180] x [180, 540] 1.2x faster than
    chunks of 2048 copied into an output (Zen 4, 2 threads; the attention chunks of oneDNN Graph's kernel).
    """
    if out is None and (x.numel() <= ROW_CHUNK * x.shape[-1] or cpu_product_library() == 'onednn'):
        return fresh_linear(x.reshape(-1, x.shape[-1]), weight, bias, gelu=gelu).view(*x.shape[:-1], weight.shape[0])
    return map_row_chunks(x, weight.shape[0], lambda rows, out: linear_into(out, rows, weight, bias, gelu=gelu),
                          out=out)


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` for fp32 CPU tensors with the forward and the input's gradient on oneDNN.

    The weight's gradient, ``grad^T @ x``, sums over the tokens: as a oneDNN linear layer both operands ([R, C] and
    [R, out], R tokens) would first be copied transposed, and those copies cost more than the product (Zen 4, 2
    threads, HAT-S at batch 4 and 48x48: 13.4 against 7.7 ms for the qkv layer, a tenth of the iteration in all);
    ``torch.mm`` (MKL) reads them transposed in place.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # grad @ W, as a linear layer of weight W^T
            grad_x = _onednn_linear(grad, weight.t().contiguous(), None)
        if ctx.needs_input_grad[1]:
            grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose fp32 CPU products follow the module doc.

    With autograd: :class:`_OneDNNLinear` where :func:`cpu_product_library` says so (first-order only), else
    ``F.linear``. Without: :func:`chunked_linear`. x: [..., in_features] -> [..., out_features].
    """

    def uses_cpu_kernels(self, x: Tensor) -> bool:
        """Whether ``x`` takes the CPU paths of the module doc (fp32 CPU tensors outside autocast and compile)."""
        return (x.device.type == 'cpu' and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not _autocast_on_cpu() and not compiling())

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This layer's computation (library, chunks, autograd) with ``weight`` and ``bias`` in place of its own:
        slices of them or a copy laid out otherwise (same dtype and device). weight: [out, in]; bias: [out] or None.
        """
        if not self.uses_cpu_kernels(x):
            return F.linear(x, weight, bias)
        if not self._needs_grad(x):
            return chunked_linear(x, weight, bias)
        if cpu_product_library() == 'onednn':
            return _OneDNNLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)

    def forward_gelu(self, x: Tensor) -> Tensor:
        """``gelu(self(x))`` (exact, erf-based GELU), applied chunk by chunk where the products run in chunks."""
        if self.uses_cpu_kernels(x) and not self._needs_grad(x):
            return chunked_linear(x, self.weight, self.bias, gelu=True)
        return F.gelu(self(x))

    def _needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)


class Mlp(nn.Module):
    """Token-wise feed-forward network: fc1 -> GELU -> dropout -> fc2 -> dropout. x: [..., C] -> [..., C].

    Without autograd on the CPU (and with dropout inactive) the steps run on one chunk of rows before the next
    (:meth:`residual_forward` includes the norm before and the residual connection after).
    """

    def __init__(self, *, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if self._runs_in_chunks(x):
            return map_row_chunks(x, self.fc2.out_features, lambda rows, out: self._fill_chunk(out, rows))
        return self.drop(self.fc2(self.drop(self.fc1.forward_gelu(x))))

    def residual_forward(self, x: Tensor, norm: nn.Module, *, in_place: bool = False) -> Tensor:
        """``x + self(norm(x))``. x: [..., C] -> [..., C].

        ``in_place``: where the MLP runs in chunks, write the result over x (contiguous), each chunk over the rows it
        has just read (for callers done with x): no fresh map.
        """
        if not self._runs_in_chunks(x):
            return x + self(norm(x))
        out = x.view(-1, x.shape[-1]) if in_place else None
        return map_row_chunks(x, self.fc2.out_features, lambda rows, out: self._fill_chunk(out, norm(rows), rows),
                              out=out)

    def _runs_in_chunks(self, x: Tensor) -> bool:
        dropout_active = self.training and self.drop.p > 0
        return self.fc1.uses_cpu_kernels(x) and not dropout_active and not self.fc1._needs_grad(x)

    def _fill_chunk(self, out: Tensor, rows: Tensor, residual: Tensor | None = None) -> None:
        hidden = fresh_linear(rows, self.fc1.weight, self.fc1.bias, gelu=True)
        linear_into(out, hidden, self.fc2.weight, self.fc2.bias, residual=residual)
