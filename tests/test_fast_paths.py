"""The speed-ups of the HAT architecture compute the official function: window gathering, chunked low-precision
attention, the CPU linear layers and head-aligned projections, and bf16 on every golden case (fp32 golden tests of
both paths: test_hat_arch.py)."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import GOLDEN_CASES, golden_io, golden_net, output_and_grads, tiny_hat_config
from hat.archs import attention as attention_module
from hat.archs import hat_arch, onednn_graph
from hat.archs.attention import attention, chunked_attention, reference_attention
from hat.archs import linear as linear_module
from hat.archs.hat_arch import HAB, HAT, OCAB, HeadAttention, WindowAttention, pad_heads
from hat.archs.linear import Linear, Mlp
from hat.archs.window import (overlapping_window_index, relative_position_index_oca, relative_position_index_sa,
                              shift_mask_patterns, window_order, window_partition)


def official_windows(x: torch.Tensor, ws: int, shift: int) -> torch.Tensor:
    """Roll by -shift, then partition: [B, H, W, C] -> [B, nRows, nCols, N, C] (the official data flow)."""
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(x, ws)


@pytest.mark.parametrize('batch, h, w, shift', [(1, 8, 8, 2), (2, 12, 16, 2), (2, 16, 12, 0), (1, 4, 12, 2)])
def test_window_order_is_roll_and_partition_grouped_by_mask(batch, h, w, shift):
    ws = 4
    x = torch.randn(batch, h, w, 3)
    order = window_order(batch, h, w, ws, shift, torch.device('cpu'))
    gathered = x.reshape(-1, 3).index_select(0, order.gather).view(-1, ws * ws, 3)
    expected = official_windows(x, ws, shift)  # [B, nR, nC, N, C]
    n_rows, n_cols = h // ws, w // ws
    start = 0
    for count, last_row, last_col in order.groups:
        part = gathered[start:start + count]
        start += count
        if shift:
            rows = [r for r in range(n_rows) if (r == n_rows - 1) == bool(last_row)]
            cols = [c for c in range(n_cols) if (c == n_cols - 1) == bool(last_col)]
        else:
            rows, cols = list(range(n_rows)), list(range(n_cols))
        want = expected[:, rows][:, :, cols].reshape(-1, ws * ws, 3)  # batch, then rows, then columns
        assert torch.equal(part, want), (last_row, last_col)
    assert start == batch * n_rows * n_cols
    assert torch.equal(gathered.reshape(-1, 3).index_select(0, order.scatter), x.reshape(-1, 3))
    assert len(order.groups) == (1 if not shift else (1 + (n_rows > 1)) * (1 + (n_cols > 1)))


@pytest.mark.parametrize('ws, shift, run', [(4, 2, 2), (4, 0, 4), (6, 2, 2), (6, 3, 3), (8, 4, 4)])
def test_window_order_moves_whole_runs_as_the_token_gather_does(ws, shift, run):
    batch, h, w = 2, 3 * ws, 2 * ws
    tokens = torch.randn(batch * h * w, 5)
    order = window_order(batch, h, w, ws, shift, torch.device('cpu'))
    assert order.run == run
    windows = tokens.index_select(0, order.gather)
    assert torch.equal(order.take(tokens), windows)
    n = ws * ws
    assert torch.equal(order.take(tokens, 2 * n, 5 * n), windows[2 * n:5 * n])
    assert torch.equal(order.restore(windows), tokens)
    out = torch.full_like(tokens, 7.0)
    order.put(out, windows[n:4 * n], n)  # windows 1..3 back at their tokens' rows, nothing else written
    written = torch.zeros(tokens.shape[0], dtype=torch.bool)
    written[order.gather[n:4 * n]] = True
    assert torch.equal(out[written], tokens[written])
    assert torch.all(out[~written] == 7.0)


def _official_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    img = torch.zeros(1, h, w, 1)
    label = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = label
            label += 1
    windows = window_partition(img, ws).reshape(-1, ws * ws)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def test_shift_patterns_cover_every_window_of_the_official_mask():
    h, w, ws, shift = 12, 16, 4, 2
    official = _official_mask(h, w, ws, shift).view(h // ws, w // ws, ws * ws, ws * ws)
    patterns = shift_mask_patterns(ws, shift)
    for r in range(h // ws):
        for c in range(w // ws):
            assert torch.equal(official[r, c], patterns[int(r == h // ws - 1), int(c == w // ws - 1)])


@pytest.mark.parametrize('per_window_mask', [False, True])
def test_chunked_attention_equals_the_reference(monkeypatch, per_window_mask):
    monkeypatch.setattr(attention_module, 'LOGITS_CHUNK_ELEMENTS', 2 * 3 * 16 * 36)  # two windows per chunk
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 3, 16, 8), torch.randn(5, 3, 36, 8), torch.randn(5, 3, 36, 8)
    mask = torch.randn(5 if per_window_mask else 1, 3, 16, 36)
    out = chunked_attention(q, k, v, mask, scale=0.3)
    ref = reference_attention(q, k, v, mask, scale=0.3)
    assert out.shape == (5, 3, 16, 8)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('per_window_mask', [False, True])
def test_chunked_attention_gradients_equal_the_reference(monkeypatch, per_window_mask):
    """The chunked backward (its own autograd function) against autograd through the official computation."""
    monkeypatch.setattr(attention_module, 'LOGITS_CHUNK_ELEMENTS', 2 * 3 * 16 * 36)  # two windows per chunk
    torch.manual_seed(0)
    inputs = [torch.randn(5, 3, 16, 8), torch.randn(5, 3, 36, 8), torch.randn(5, 3, 36, 8),
              torch.randn(5 if per_window_mask else 1, 3, 16, 36)]
    grad_out = torch.randn(5, 3, 16, 8)
    grads = []
    for run in (chunked_attention, reference_attention):
        leaves = [t.clone().requires_grad_() for t in inputs]
        q, k, v, mask = leaves
        run(q, k, v, mask, scale=0.3).backward(grad_out)
        grads.append([t.grad for t in leaves])
    for name, got, want in zip('qkvm', *grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
    assert grads[0][3].abs().max() > 0.01  # the mask gradient is not trivially zero


def test_bf16_chunked_attention_gradient_of_a_shared_mask(monkeypatch):
    """In bf16 the shared mask's gradient (a sum over all windows, here 20 chunks) is accumulated in fp32: close to
    the fp32 computation on the same bf16 values, and returned in the mask's dtype."""
    monkeypatch.setattr(attention_module, 'LOGITS_CHUNK_ELEMENTS', 2 * 3 * 16 * 36)  # two windows per chunk
    torch.manual_seed(0)
    values = [torch.randn(40, 3, 16, 8), torch.randn(40, 3, 36, 8), torch.randn(40, 3, 36, 8),
              torch.randn(1, 3, 16, 36)]
    values = [t.bfloat16() for t in values]
    grad_out = torch.randn(40, 3, 16, 8).bfloat16()
    mask_grads = []
    for run, dtype in ((chunked_attention, torch.bfloat16), (reference_attention, torch.float32)):
        q, k, v, mask = [t.to(dtype, copy=True).requires_grad_() for t in values]
        run(q, k, v, mask, scale=0.3).backward(grad_out.to(dtype))
        mask_grads.append(mask.grad)
    got, want = mask_grads
    assert got.dtype == torch.bfloat16 and got.shape == want.shape == (1, 3, 16, 36)
    assert (got.float() - want).abs().max() < 0.01 * want.abs().max()


def test_fused_bf16_cpu_attention_uses_the_chunked_path(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module, 'chunked_attention',
                        lambda *a, **k: calls.append(a[0].shape) or torch.zeros(a[0].shape, dtype=a[0].dtype))
    q = torch.randn(2, 3, 4, 16, 8, dtype=torch.bfloat16)
    bias = torch.randn(4, 16, 16)
    out = attention(q, q, q, bias, scale=0.3, fused=True)
    assert calls == [(6, 4, 16, 8)] and out.shape == q.shape  # windows folded into the batch
    attention(q.float(), q.float(), q.float(), bias, scale=0.3, fused=True)
    assert len(calls) == 1  # fp32: scaled_dot_product_attention


def test_bf16_cpu_inference_takes_onednn_graph_where_bf16_products_are_native(monkeypatch):
    """With native bf16 products (mocked), bf16 attention without autograd runs as oneDNN Graph's fused kernel
    (windows folded into the batch, the mask in bf16); with autograd, in fp32, or when the fused kernel gives up
    (None), the chunked path."""
    monkeypatch.setattr(onednn_graph, 'native_bf16_products', lambda: True)
    monkeypatch.setattr(onednn_graph, 'onednn_fp32_products', lambda: False)  # fp32: PyTorch's flash kernel
    if not onednn_graph.available():
        pytest.skip('this PyTorch has no oneDNN or no TorchScript oneDNN fusion')
    fused_calls, chunked_calls, give_up = [], [], []

    def fused(q, k, v, attn_mask, *, scale):
        fused_calls.append((q.shape, attn_mask.shape, attn_mask.dtype))
        return None if give_up else torch.ones(q.shape, dtype=q.dtype)

    monkeypatch.setattr(onednn_graph, 'fused_attention', fused)
    monkeypatch.setattr(attention_module, 'chunked_attention',
                        lambda *a, **k: chunked_calls.append(a[0].shape) or torch.zeros(a[0].shape, dtype=a[0].dtype))
    q = torch.randn(2, 3, 4, 16, 8, dtype=torch.bfloat16)
    bias = torch.randn(4, 16, 16)
    with torch.no_grad():
        out = attention(q, q, q, bias, scale=0.3, fused=True)
    assert fused_calls == [((6, 4, 16, 8), (1, 4, 16, 16), torch.bfloat16)] and not chunked_calls
    assert out.shape == q.shape and torch.equal(out, torch.ones_like(q))
    attention(q.requires_grad_(), q, q, bias, scale=0.3, fused=True)  # autograd
    with torch.no_grad():
        attention(q.float(), q.float(), q.float(), bias, scale=0.3, fused=True)  # fp32: the flash kernel
        give_up.append(True)
        out = attention(q, q, q, bias, scale=0.3, fused=True)
    assert len(fused_calls) == 2 and chunked_calls == [(6, 4, 16, 8)] * 2 and torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize('onednn_products', [True, False])
def test_fp32_cpu_inference_takes_onednn_graph_where_fp32_products_run_on_onednn(monkeypatch, onednn_products):
    """Where the CPU's fp32 products run on oneDNN (AMD's AVX-512 CPUs, mocked), fp32 attention without autograd is
    oneDNN Graph's fused kernel, computing the reference to fp32 accuracy; elsewhere, with autograd, with
    ``FP32 = False`` or without oneDNN's fp32 products, PyTorch's kernels (flash, or chunked with autograd)."""
    monkeypatch.setattr(onednn_graph, 'onednn_fp32_products', lambda: onednn_products)
    monkeypatch.setattr(onednn_graph, 'native_bf16_products', lambda: False)
    real_kernel, calls = onednn_graph.fused_attention, []
    monkeypatch.setattr(onednn_graph, 'fused_attention',
                        lambda q, k, v, mask, **options: calls.append((q.shape, mask.dtype)) or real_kernel(
                            q, k, v, mask, **options))
    torch.manual_seed(0)
    qkv = torch.randn(5, 16, 3, 2, 8)  # [windows, tokens, q/k/v, heads, d], as HAT's qkv projection lays them out
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views [5, 2, 16, 8]
    bias, mask = torch.randn(2, 16, 16), torch.randn(16, 16)
    want = reference_attention(q, k, v, bias, scale=0.35, mask=mask)
    with torch.no_grad():
        got = attention(q, k, v, bias, scale=0.35, fused=True, mask=mask)
    if onednn_products and not onednn_graph.available(torch.float32):
        pytest.skip(f'this PyTorch has no oneDNN or no TorchScript oneDNN fusion ({onednn_graph._failed})')
    assert calls == ([((5, 2, 16, 8), torch.float32)] if onednn_products else [])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(onednn_graph, 'FP32', False)
    with torch.no_grad():
        attention(q, k, v, bias, scale=0.35, fused=True, mask=mask)
    attention(q, k, v, bias.requires_grad_(), scale=0.35, fused=True, mask=mask)
    assert len(calls) == (1 if onednn_products else 0)


def test_bf16_training_attention_runs_the_fused_forward_and_recomputes_the_weights(monkeypatch):
    """With native bf16 products (mocked), bf16 attention with autograd runs its forward as the fused kernel, once
    for all windows, and recomputes the weights chunk by chunk in the backward: output and gradients as those of
    the chunked forward that keeps the weights, to bf16 rounding, and the same to the bit when the fused kernel
    gives up (None)."""
    monkeypatch.setattr(onednn_graph, 'native_bf16_products', lambda: True)
    if not onednn_graph.available():
        pytest.skip('this PyTorch has no oneDNN or no TorchScript oneDNN fusion')
    monkeypatch.setattr(attention_module, 'LOGITS_CHUNK_ELEMENTS', 2 * 3 * 16 * 36)  # two windows per chunk
    torch.manual_seed(0)
    values = [torch.randn(10, 3, 16, 8), torch.randn(10, 3, 36, 8), torch.randn(10, 3, 36, 8),
              torch.randn(1, 3, 16, 36)]  # OCAB-like: 16 queries, 36 keys; one mask for all windows
    values = [t.bfloat16() for t in values]
    grad_out = torch.randn(10, 3, 16, 8).bfloat16()
    real_kernel, calls, give_up = onednn_graph.fused_attention, [], []

    def kernel(*args, **kwargs):
        calls.append(args[0].shape)
        return None if give_up else real_kernel(*args, **kwargs)

    monkeypatch.setattr(onednn_graph, 'fused_attention', kernel)

    def run(recompute: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(attention_module, 'RECOMPUTE_BF16', recompute)
        leaves = [t.clone().requires_grad_() for t in values]
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # e.g. the tracer's about reading .grad of non-leaf inputs
            out = chunked_attention(*(t * 1 for t in leaves), scale=0.3)  # non-leaf inputs, as in the model
        out.backward(grad_out)
        return [out] + [t.grad for t in leaves]

    kept = run(False)
    assert not calls
    recomputed = run(True)
    if onednn_graph._failed:
        pytest.skip(f'oneDNN Graph declined here: {onednn_graph._failed}')
    assert calls == [(10, 3, 16, 8)]
    for name, got, want in zip(('out', 'q', 'k', 'v', 'mask'), recomputed, kept):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, name
        assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max(), name
    give_up.append(True)
    assert all(torch.equal(got, want) for got, want in zip(run(True), kept))
    assert len(calls) == 2


def test_onednn_graph_attention_computes_the_reference_in_bf16():
    """The traced pattern (fused where the CPU has native bf16, TorchScript's own kernels elsewhere) on HAT-like
    strided q, k, v and a shared and a per-window mask: the reference computation to bf16 accuracy. Each set of
    shapes and strides is traced once; the process-wide oneDNN fusion setting is left as it was."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.jit, 'enable_onednn_fusion'):
        pytest.skip('this PyTorch has no oneDNN or no TorchScript oneDNN fusion')
    torch.manual_seed(0)
    qkv = torch.randn(5, 16, 3, 2, 8)  # [windows, tokens, q/k/v, heads, d], as HAT's qkv projection lays them out
    q, k, v = qkv.bfloat16().permute(2, 0, 3, 1, 4).unbind(0)  # strided views [5, 2, 16, 8]
    fusion_before = torch._C._jit_llga_enabled()
    for mask in (torch.randn(1, 2, 16, 16), torch.randn(5, 2, 16, 16)):
        want = reference_attention(q.float(), k.float(), v.float(), mask, scale=0.35)
        with torch.no_grad():
            got = onednn_graph.fused_attention(q, k, v, mask.bfloat16(), scale=0.35)
            if got is None:  # the callers' fallback, taken with a warning: a PyTorch whose TorchScript cannot
                pytest.skip(f'oneDNN Graph declined here: {onednn_graph._failed}')  # trace this any more
            again = onednn_graph.fused_attention(q, k, v, mask.bfloat16(), scale=0.35)
        assert got.dtype == torch.bfloat16 and got.shape == (5, 2, 16, 8) and torch.equal(got, again)
        assert (got.float() - want).abs().max() < 0.02 * want.abs().max()
    assert len(onednn_graph._specialisations) == 2  # one per mask shape, none for the repeated calls
    assert torch._C._jit_llga_enabled() == fusion_before


def test_onednn_graph_attention_turns_itself_off_after_a_failure(monkeypatch):
    monkeypatch.setattr(onednn_graph, 'native_bf16_products', lambda: True)
    if not onednn_graph.available():
        pytest.skip('this PyTorch has no oneDNN or no TorchScript oneDNN fusion')

    def broken_trace(*args, **kwargs):
        raise RuntimeError('tracing is gone')

    monkeypatch.setattr(torch.jit, 'trace', broken_trace)
    q = torch.randn(2, 2, 16, 8, dtype=torch.bfloat16)
    bias = torch.randn(2, 16, 16)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match='oneDNN Graph attention turned off.*tracing is gone'):
            out = attention(q, q, q, bias, scale=0.3, fused=True)
        want = chunked_attention(q, q, q, bias.unsqueeze(0), scale=0.3)
    assert torch.equal(out, want) and not onednn_graph.available()


def test_fused_attention_matches_reference_with_a_shared_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 16, 8), torch.randn(2, 3, 4, 25, 8), torch.randn(2, 3, 4, 25, 8)
    bias, mask = torch.randn(4, 16, 25), torch.randn(16, 25)
    fused = attention(q, k, v, bias, scale=0.3, fused=True, mask=mask)
    ref = attention(q, k, v, bias, scale=0.3, fused=False, mask=mask)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=['mkl', 'onednn'])
def product_library(request, monkeypatch):
    """Each CPU product library in turn, with row chunks of 5 so that small inputs span several chunks."""
    if request.param == 'onednn' and not torch.backends.mkldnn.is_available():
        pytest.skip('this PyTorch has no oneDNN')
    monkeypatch.setattr(linear_module, 'cpu_product_library', lambda: request.param)
    monkeypatch.setattr(linear_module, 'fresh_product_library', lambda: request.param)
    monkeypatch.setattr(linear_module, 'ROW_CHUNK', 5)
    return request.param


def test_row_chunks_are_larger_where_onednn_multiplies():
    """2048 rows per chunk where the fp32 products run on oneDNN (AMD's AVX-512 CPUs), 1024 elsewhere: a process
    whose PyTorch runs AVX2 kernels takes MKL and 1024 on any CPU."""
    assert linear_module.ROW_CHUNK == (2048 if linear_module.cpu_product_library() == 'onednn' else 1024)
    script = 'from hat.archs import linear; print(linear.cpu_product_library(), linear.ROW_CHUNK)'
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, check=True,
                            env={**os.environ, 'ATEN_CPU_CAPABILITY': 'avx2'})
    assert result.stdout.split() == ['mkl', '1024']


AVX512_FLAGS = 'avx2 avx512f avx512bw avx512vl'


@pytest.mark.parametrize('capability, vendor, flags, library', [
    ('AVX512', 'AuthenticAMD', AVX512_FLAGS, 'onednn'),  # Zen 4, Zen 5
    ('AVX512_BF16', 'AuthenticAMD', f'{AVX512_FLAGS} avx512_bf16', 'onednn'),
    ('AVX512', 'GenuineIntel', AVX512_FLAGS, 'onednn'),  # Ice Lake and earlier: oneDNN measured faster
    ('AVX512', 'GenuineIntel', f'{AVX512_FLAGS} avx512_bf16 avx512_fp16', 'mkl'),  # Sapphire Rapids: MKL
    ('AVX512_BF16', 'GenuineIntel', f'{AVX512_FLAGS} amx_bf16', 'mkl'),
    ('AVX512', 'GenuineIntel', '', 'mkl'),  # flags unknown (not Linux): PyTorch's own choice
    ('AVX2', 'AuthenticAMD', 'avx2', 'mkl'), ('AVX2', 'GenuineIntel', 'avx2', 'mkl'), ('DEFAULT', '', '', 'mkl'),
    ('AVX512', '', AVX512_FLAGS, 'mkl'),  # an unknown vendor: PyTorch's own choice
])
def test_product_library_follows_the_cpu(monkeypatch, capability, vendor, flags, library):
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: capability)
    monkeypatch.setattr(linear_module, 'cpu_vendor', lambda: vendor)
    monkeypatch.setattr(linear_module, 'cpu_flags', lambda: frozenset(flags.split()))
    monkeypatch.setattr(linear_module, '_ONEDNN_LINEAR', True)
    linear_module.detected_product_library.cache_clear()
    try:
        assert linear_module.cpu_product_library() == library
    finally:
        linear_module.detected_product_library.cache_clear()


@pytest.mark.parametrize('setting, capability, expected', [
    ('mkl', 'AVX512', 'mkl'), ('onednn', 'AVX512', 'onednn'), ('mkl', 'AVX2', 'mkl'),
    ('onednn', 'AVX2', "'onednn' needs a PyTorch running AVX-512"), ('blas', 'AVX512', "'blas': use 'auto'"),
])
def test_product_library_can_be_set_for_a_comparison(monkeypatch, setting, capability, expected):
    """PRODUCT_LIBRARY overrides the detection (whatever the vendor), at each call; oneDNN only where it runs
    AVX-512, and an unknown name is refused with the names to use."""
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: capability)
    monkeypatch.setattr(linear_module, 'cpu_vendor', lambda: 'GenuineIntel')
    monkeypatch.setattr(linear_module, '_ONEDNN_LINEAR', True)
    monkeypatch.setattr(linear_module, 'PRODUCT_LIBRARY', setting)
    if expected in ('mkl', 'onednn'):
        assert linear_module.cpu_product_library() == expected
    else:
        with pytest.raises(ValueError, match=expected):
            linear_module.cpu_product_library()


@pytest.mark.parametrize('capability, vendor, library', [
    ('AVX512', 'AuthenticAMD', 'onednn'), ('AVX512_BF16', 'GenuineIntel', 'onednn'), ('AVX512', '', 'onednn'),
    ('AVX2', 'AuthenticAMD', 'mkl'), ('AVX2', 'GenuineIntel', 'mkl'), ('DEFAULT', '', 'mkl'),
])
def test_fresh_products_take_onednn_wherever_it_runs_avx512(monkeypatch, capability, vendor, library):
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: capability)
    monkeypatch.setattr(linear_module, 'cpu_vendor', lambda: vendor)
    monkeypatch.setattr(linear_module, '_ONEDNN_LINEAR', True)
    for cached in (linear_module.detected_product_library, linear_module.fresh_product_library):
        cached.cache_clear()
    try:
        assert linear_module.fresh_product_library() == library
        monkeypatch.setattr(linear_module, '_ONEDNN_LINEAR', False)  # a PyTorch without oneDNN's linear
        linear_module.fresh_product_library.cache_clear()
        linear_module.detected_product_library.cache_clear()
        assert linear_module.fresh_product_library() == 'mkl'
    finally:
        for cached in (linear_module.detected_product_library, linear_module.fresh_product_library):
            cached.cache_clear()


@pytest.mark.parametrize('fields, processor, vendor', [
    ({'vendor_id': 'AuthenticAMD', 'model name': 'AMD EPYC 9B14'}, '', 'AuthenticAMD'),
    ({}, 'Intel64 Family 6 Model 85 Stepping 7, GenuineIntel', 'GenuineIntel'),  # Windows: no /proc/cpuinfo
    ({}, 'arm', ''),
])
def test_cpu_vendor_from_cpuinfo_or_platform(monkeypatch, fields, processor, vendor):
    from hat.utils import cpu
    monkeypatch.setattr(cpu, 'cpuinfo', lambda: fields)
    monkeypatch.setattr(cpu.platform, 'processor', lambda: processor)
    assert cpu.cpu_vendor() == vendor


def test_cpuinfo_reads_the_first_processor(monkeypatch, tmp_path):
    from hat.utils import cpu
    text = ('processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n'
            'model name\t: Intel(R) Xeon(R) Processor\n'
            'flags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nvendor_id\t: Other\n')
    (tmp_path / 'cpuinfo').write_text(text)
    real_path = cpu.Path
    monkeypatch.setattr(cpu, 'Path', lambda name: real_path(tmp_path / 'cpuinfo') if name == '/proc/cpuinfo' else
                        real_path(name))
    cpu.cpuinfo.cache_clear()
    try:
        assert cpu.cpu_vendor() == 'GenuineIntel' and cpu.cpu_model() == 'Intel(R) Xeon(R) Processor'
        assert cpu.cpu_flags() == {'fpu', 'avx2', 'avx512f', 'avx512_bf16'}
        assert cpu.cpu_family_model() == 'family 6, model 143'
    finally:
        cpu.cpuinfo.cache_clear()


def test_linear_equals_f_linear_on_each_library(product_library):
    torch.manual_seed(0)
    layer = Linear(12, 20)
    x = torch.randn(3, 7, 12)  # 21 rows: five chunks
    want = F.linear(x, layer.weight, layer.bias)
    assert layer.uses_cpu_kernels(x) and not layer.uses_cpu_kernels(x.double())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.forward_gelu(x), F.gelu(want), atol=1e-6, rtol=1e-6)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not layer.uses_cpu_kernels(x)
            assert layer(x).dtype == layer.forward_gelu(x).dtype == torch.bfloat16  # autocast still applies
    torch.testing.assert_close(layer.forward_gelu(x), F.gelu(want), atol=1e-6, rtol=1e-6)  # with autograd
    without_bias = Linear(12, 20, bias=False)
    with torch.no_grad():
        torch.testing.assert_close(without_bias(x), F.linear(x, without_bias.weight), atol=1e-6, rtol=1e-6)


def test_mlp_in_chunks_equals_the_layer_by_layer_computation(product_library):
    torch.manual_seed(0)
    mlp = Mlp(in_features=8, hidden_features=16).eval()
    norm = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 9, 8)
    want = mlp.fc2(F.gelu(mlp.fc1(norm(x)))).detach()
    with torch.no_grad():
        torch.testing.assert_close(mlp(norm(x)), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mlp.residual_forward(x, norm), x + want, atol=1e-6, rtol=1e-6)
        inputs = x.clone()
        out = mlp.residual_forward(inputs, norm, in_place=True)  # each chunk written over the rows it read
        assert out.data_ptr() == inputs.data_ptr()
        torch.testing.assert_close(out, x + want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mlp.residual_forward(x, norm), x + want, atol=1e-6, rtol=1e-6)  # with autograd
    inputs = x.clone().requires_grad_()
    torch.testing.assert_close(mlp.residual_forward(inputs, norm, in_place=True), x + want, atol=1e-6, rtol=1e-6)
    assert torch.equal(inputs, x)  # autograd: never in place


def test_head_aligned_projections_compute_the_same_attention(monkeypatch):
    """Head size 12 runs as 16 on the CPU fused path: zero-padded q, k, v and proj columns, same output."""
    monkeypatch.setattr(onednn_graph, 'onednn_fp32_products', lambda: False)  # fp32 inference: the flash kernel
    torch.manual_seed(0)
    attn = WindowAttention(dim=24, window_size=4, num_heads=2).eval()
    windows, rpi = torch.randn(3 * 16, 24), relative_position_index_sa(4)
    with torch.no_grad():
        qkv, head_dim = attn.project_qkv(windows)
        assert head_dim == 16 and qkv.shape == (48, 3 * 2 * 16)
        assert torch.count_nonzero(qkv.view(48, 3, 2, 16)[..., 12:]) == 0
        aligned = attn(windows, rpi, [(3, None)])
        attn.fused_attn = False
        assert attn.project_qkv(windows)[1] == 12
        reference = attn(windows, rpi, [(3, None)])
        torch.testing.assert_close(aligned, reference, atol=1e-5, rtol=1e-5)
        attn.fused_attn = True
        attn.proj.weight.mul_(2)  # the cached aligned weights must follow the update
        torch.testing.assert_close(attn(windows, rpi, [(3, None)]) - attn.proj.bias, 2 * (aligned - attn.proj.bias),
                                   atol=1e-5, rtol=1e-5)
    assert attn.project_qkv(windows.requires_grad_())[1] == 12  # autograd: the layers as they are


def test_heads_are_padded_for_the_cpu_flash_kernel_and_for_cuda(monkeypatch):
    """CUDA's masked fused kernels need heads of a multiple of 8 (bf16) or 4 (fp32): padded there in training too;
    on the CPU only for the flash kernel (fp32 inference), not where oneDNN Graph's kernel serves fp32 inference."""
    monkeypatch.setattr(onednn_graph, 'onednn_fp32_products', lambda: False)  # fp32 inference: the flash kernel
    attn = WindowAttention(dim=24, window_size=4, num_heads=2)  # heads of 12
    on_cuda = SimpleNamespace(device=torch.device('cuda'))  # only the device is read for CUDA
    assert attn.pads_heads(on_cuda)
    attn.train()
    assert attn.pads_heads(on_cuda)  # with autograd as well
    x = torch.randn(16, 24)
    assert attn.pads_heads(x) is False  # CPU with autograd: the chunked kernel, any head size
    with torch.no_grad():
        assert attn.pads_heads(x)
        assert not attn.pads_heads(x.bfloat16())
    monkeypatch.setattr(onednn_graph, 'onednn_fp32_products', lambda: True)  # AMD's AVX-512 CPUs
    with torch.no_grad():
        assert attn.pads_heads(x) is not onednn_graph.available(torch.float32)  # False where this PyTorch has it
        assert attn.pads_heads(on_cuda)
    attn.fused_attn = False  # the reference path: the layers as they are
    assert not attn.pads_heads(on_cuda)
    assert not WindowAttention(dim=32, window_size=4, num_heads=2).pads_heads(on_cuda)  # 16: aligned already


@pytest.mark.parametrize('compiled', [False, True])
def test_padded_heads_with_autograd_give_the_same_output_and_gradients(monkeypatch, compiled):
    """The path CUDA takes (heads padded from the parameters at each call), run on the CPU with autograd and in
    inference: same output, and the gradients of every parameter (those of the padded layers included) equal the
    unpadded ones. ``compiled``: the same under ``compile_blocks()`` (``train: {compile: true}``, gpu_check's
    compiled rows), where each block must trace into one graph (``fullgraph``: a graph break fails). ``aot_eager``
    traces as the default backend does (dynamo and AOT autograd) without generating code: no compiler needed.
    Two blocks: the second shifts its windows (four mask groups on the 3 x 3 windows of the input)."""
    torch._dynamo.reset()
    # Compiled inference runs PyTorch's attention kernels: so does the eager reference here, on any CPU (where fp32
    # products run on oneDNN, eager inference would take oneDNN Graph's kernel, about 1e-6 away).
    monkeypatch.setattr(onednn_graph, 'FP32', False)
    torch.manual_seed(0)
    net = HAT(**tiny_hat_config(depths=(2, ), drop_path_rate=0.0))  # no random branch drops
    assert net.layers[0].residual_group.blocks[1].shift_size > 0
    x = torch.rand(1, 3, 12, 12)
    want, want_grads = output_and_grads(net, x)
    with torch.no_grad():
        want_eval = copy.deepcopy(net).eval()(x)  # a copy: its inference fills its own caches, not net's
    monkeypatch.setattr(HeadAttention, 'pads_heads', lambda self, x: True)
    padded = net.layers[0].residual_group.blocks[0].attn
    assert padded.qkv_layout(torch.randn(2, 12, requires_grad=True))[2] == 8  # heads of 6 laid out as 8
    if compiled:
        net.compile_blocks(backend='aot_eager', fullgraph=True)
    try:
        got, got_grads = output_and_grads(net.train(), x)
        assert padded._aligned_cache is None  # nothing cached with autograd: the next step's weights are new
        with torch.no_grad():
            got_eval = net.eval()(x)  # inference (compiled: traced again, without autograd)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(got_eval, want_eval, atol=1e-6, rtol=1e-5)


def test_padded_heads_with_autograd_pad_the_qkv_projection_once(monkeypatch):
    """With autograd the padded projections are built from the parameters at each call: the qkv projection once
    per forward (the output projection pads only its own weight), and the gradients reach the parameters."""
    monkeypatch.setattr(HeadAttention, 'pads_heads', lambda self, x: True)
    padded_both, real_pad_heads = [], hat_arch.pad_heads
    monkeypatch.setattr(hat_arch, 'pad_heads', lambda *args: padded_both.append(args) or real_pad_heads(*args))
    attn = WindowAttention(dim=24, window_size=4, num_heads=2)  # heads of 12 laid out as 16
    windows = torch.randn(2 * 16, 24, requires_grad=True)
    out = attn(windows, relative_position_index_sa(4), [(2, None)])
    assert out.shape == (32, 24) and len(padded_both) == 1
    out.sum().backward()
    assert attn.proj.weight.grad.shape == (24, 24) and attn.qkv.weight.grad.shape == (72, 24)
    assert torch.count_nonzero(attn.proj.weight.grad) == 24 * 24


def test_compiled_blocks_follow_changing_input_sizes(monkeypatch):
    """Compiled blocks see other sizes (validation images, tiles): PyTorch compiles again, with dynamic shapes from the
    second size on, and each block must still trace into one graph (window indices, mask groups) and compute the
    eager network's output."""
    monkeypatch.setattr(onednn_graph, 'FP32', False)  # the eager network on PyTorch's kernels, as compiled
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = HAT(**tiny_hat_config(depths=(2, ), drop_path_rate=0.0)).eval()
    eager = copy.deepcopy(net)
    net.compile_blocks(backend='aot_eager', fullgraph=True)
    try:
        with torch.no_grad():
            for size in ((16, 16), (16, 24)):  # the second compiles with dynamic shapes
                x = torch.rand(1, 3, *size)
                torch.testing.assert_close(net(x), eager(x), atol=1e-6, rtol=1e-5)
    finally:
        torch._dynamo.reset()


def test_pad_heads_inserts_zeros_after_each_head():
    qkv_weight, qkv_bias, proj_weight = torch.randn(3 * 2 * 3, 6), torch.randn(3 * 2 * 3), torch.randn(6, 6)
    w, b, p = pad_heads(qkv_weight, qkv_bias, proj_weight, heads=2)  # heads of 3 -> 8
    assert w.shape == (3 * 2 * 8, 6) and b.shape == (3 * 2 * 8, ) and p.shape == (6, 2 * 8)
    assert torch.equal(w.view(3, 2, 8, 6)[:, :, :3], qkv_weight.view(3, 2, 3, 6))
    assert torch.count_nonzero(w.view(3, 2, 8, 6)[:, :, 3:]) == 0
    assert torch.equal(b.view(3, 2, 8)[..., :3], qkv_bias.view(3, 2, 3))
    assert torch.count_nonzero(b.view(3, 2, 8)[..., 3:]) == 0
    assert torch.equal(p.view(6, 2, 8)[..., :3], proj_weight.view(6, 2, 3))
    assert torch.count_nonzero(p.view(6, 2, 8)[..., 3:]) == 0
    assert pad_heads(qkv_weight, None, proj_weight, heads=2)[1] is None


def test_linear_of_one_chunk_and_into_an_output_equal_f_linear(product_library):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(20, 12), torch.randn(20), torch.randn(2, 2, 12)  # 4 rows: one chunk of 5
    want = F.linear(x, weight, bias)
    torch.testing.assert_close(linear_module.chunked_linear(x, weight, bias), want, atol=1e-6, rtol=1e-6)
    rows = torch.randn(13, 12)
    out = torch.full((14, 20), 7.0)
    linear_module.chunked_linear(rows, weight, bias, out=out[1:])
    torch.testing.assert_close(out[1:], F.linear(rows, weight, bias), atol=1e-6, rtol=1e-6)
    assert torch.all(out[0] == 7.0)  # nothing outside the given output is written


@pytest.mark.parametrize('batch, h, w', [(1, 8, 8), (2, 12, 16), (1, 4, 12)])
def test_overlapping_window_index_is_unfold_of_the_zero_padded_map(batch, h, w):
    ws, ows, channels = 4, 6, 3
    maps = torch.randn(batch, h, w, channels)
    rows = torch.cat([maps.reshape(-1, channels), maps.new_zeros(1, channels)])
    gathered = rows.index_select(0, overlapping_window_index(batch, h, w, ws, ows, torch.device('cpu')))
    unfold = torch.nn.Unfold(kernel_size=ows, stride=ws, padding=(ows - ws) // 2)
    want = unfold(maps.permute(0, 3, 1, 2))  # [B, C * ows * ows, windows]
    want = want.view(batch, channels, ows * ows, -1).permute(0, 3, 2, 1).reshape(-1, channels)
    assert torch.equal(gathered, want)


@pytest.mark.parametrize('shift', [0, 2])
def test_window_attention_in_chunks_equals_the_whole_maps(product_library, shift):
    """CPU inference attends a few windows at a time (here 1: chunks of 5 rows, 16 tokens per window), straight
    from the token maps to the output; autograd takes the whole maps. Both compute the same block."""
    torch.manual_seed(0)
    block = HAB(dim=12, num_heads=2, window_size=4, shift_size=shift, compress_ratio=3, squeeze_factor=3,
                conv_scale=0.01, mlp_ratio=2.0, qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0,
                drop_path=0.0).eval()
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    x, size = torch.randn(2, 12 * 8, 12), (12, 8)
    args = (x, size, relative_position_index_sa(4), shift_mask_patterns(4, 2))
    whole = block(*args)  # autograd: the weights need gradients
    assert block.attn.attends_in_chunks(x) is False
    x_before = x.clone()
    with torch.no_grad():
        assert block.attn.attends_in_chunks(x)
        torch.testing.assert_close(block(*args), whole.detach(), atol=1e-5, rtol=1e-5)
        with torch.autocast('cpu', dtype=torch.bfloat16):  # fp32 tokens, bf16 projections
            torch.testing.assert_close(block(*args).float(), whole.detach(), atol=0.05, rtol=0.05)
    assert torch.equal(x, x_before)  # the block writes over its own maps only, never its input


def test_overlapping_attention_in_chunks_equals_the_whole_maps(product_library):
    torch.manual_seed(0)
    block = OCAB(dim=12, window_size=4, overlap_ratio=0.5, num_heads=2, qkv_bias=True, qk_scale=None,
                 mlp_ratio=2.0).eval()
    torch.nn.init.normal_(block.relative_position_bias_table)
    x, size = torch.randn(2, 8 * 12, 12), (8, 12)
    args = (x, size, relative_position_index_oca(4, 0.5))
    whole = block(*args)
    x_before = x.clone()
    with torch.no_grad():
        assert block.attends_in_chunks(x)
        torch.testing.assert_close(block(*args), whole.detach(), atol=1e-5, rtol=1e-5)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            torch.testing.assert_close(block(*args).float(), whole.detach(), atol=0.05, rtol=0.05)
    assert torch.equal(x, x_before)


def _tiny_hab_and_ocab(shift: int) -> tuple[HAB, OCAB]:
    """A HAB (windows of 4, shifted by ``shift``) and an OCAB, both of 12 channels in 2 heads, in eval mode."""
    torch.manual_seed(0)
    hab = HAB(dim=12, num_heads=2, window_size=4, shift_size=shift, compress_ratio=3, squeeze_factor=3,
              conv_scale=0.01, mlp_ratio=2.0, qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0,
              drop_path=0.0).eval()
    ocab = OCAB(dim=12, window_size=4, overlap_ratio=0.5, num_heads=2, qkv_bias=True, qk_scale=None,
                mlp_ratio=2.0).eval()
    return hab, ocab


def _record_attention_calls(monkeypatch, record) -> None:
    """Call ``record(q, bias)`` at each attention call of the blocks, which then runs as usual."""
    kernel = hat_arch.attention
    monkeypatch.setattr(hat_arch, 'attention', lambda q, k, v, bias, **options: record(q, bias) or kernel(
        q, k, v, bias, **options))


def test_attention_in_chunks_under_bf16_autocast_casts_each_mask_once(monkeypatch):
    """Under bf16 autocast the fp32 bias (plus a shift mask) reaches the kernel in bf16, cast once per group of
    windows in HAB and once per block in OCAB rather than in every chunk: one tensor per group for all its chunks."""
    monkeypatch.setattr(linear_module, 'ROW_CHUNK', 16)  # one 4x4 window per chunk
    masks = []
    _record_attention_calls(monkeypatch, lambda q, bias: masks.append(bias))
    hab, ocab = _tiny_hab_and_ocab(shift=2)
    x, size = torch.randn(1, 12 * 8, 12), (12, 8)  # 3 x 2 windows
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        hab(x, size, relative_position_index_sa(4), shift_mask_patterns(4, 2))
        assert len(masks) == 6 and all(mask.dtype == torch.bfloat16 for mask in masks)
        # Shifted windows of a 3 x 2 grid: 2 unmasked, 2 with the last column's mask, 1 with the last row's, 1 both.
        assert len({mask.data_ptr() for mask in masks}) == 4
        masks.clear()
        ocab(x, size, relative_position_index_oca(4, 0.5))
        assert len(masks) == 6 and all(mask.dtype == torch.bfloat16 for mask in masks)
        assert len({mask.data_ptr() for mask in masks}) == 1


@pytest.mark.parametrize('fused_dtype', [None, torch.float32, torch.bfloat16])
def test_attention_chunks_are_larger_where_onednn_graph_serves(monkeypatch, fused_dtype):
    """CPU inference attends ROW_CHUNK query tokens per call, FUSED_CHUNK_ROWS where oneDNN Graph's kernel serves
    the dtype the projections run in (fp32 tokens under bf16 autocast: bf16). The blocks compute the same either way."""
    monkeypatch.setattr(linear_module, 'ROW_CHUNK', 16)  # one 4x4 window per chunk
    monkeypatch.setattr(hat_arch, 'FUSED_CHUNK_ROWS', 48)  # three
    monkeypatch.setattr(onednn_graph, 'available', lambda dtype=torch.bfloat16: dtype == fused_dtype)
    windows_per_call = []
    _record_attention_calls(monkeypatch, lambda q, bias: windows_per_call.append(q.shape[0]))
    hab, ocab = _tiny_hab_and_ocab(shift=0)
    x, size = torch.randn(1, 16 * 8, 12), (16, 8)  # 4 x 2 windows
    hab_args, ocab_args = (x, size, relative_position_index_sa(4), None), (x, size, relative_position_index_oca(4, 0.5))
    hab_whole, ocab_whole = hab(*hab_args).detach(), ocab(*ocab_args).detach()  # autograd: the whole maps
    windows_per_call.clear()
    for autocast in (False, True):
        fused = fused_dtype == (torch.bfloat16 if autocast else torch.float32)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            hab_out, ocab_out = hab(*hab_args).float(), ocab(*ocab_args).float()
        assert windows_per_call == ([3, 3, 2] * 2 if fused else [1] * 16)
        windows_per_call.clear()
        tolerance = 0.05 if autocast else 1e-5
        torch.testing.assert_close(hab_out, hab_whole, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(ocab_out, ocab_whole, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize('autocast', [False, True])
def test_attention_calls_keep_their_largest_buffer_under_the_bound(monkeypatch, autocast):
    """Where oneDNN Graph's kernel serves, a call's qkv (HAB) or gathered keys and values (OCAB) stays under
    CALL_BUFFER_BYTES, counted in the products' dtype (bf16 under autocast: half the bytes), in calls of one size,
    and never holds fewer windows than a product chunk."""
    monkeypatch.setattr(linear_module, 'ROW_CHUNK', 16)  # one window of 4x4
    monkeypatch.setattr(hat_arch, 'FUSED_CHUNK_ROWS', 48)  # three
    # Two windows' qkv in fp32 (16 tokens x 36 features x 4 bytes each); one window's keys and values (36 x 24 x 4).
    monkeypatch.setattr(hat_arch, 'CALL_BUFFER_BYTES', 2 * 16 * 36 * 4)
    monkeypatch.setattr(onednn_graph, 'available', lambda dtype=torch.bfloat16: True)
    windows_per_call = []
    _record_attention_calls(monkeypatch, lambda q, bias: windows_per_call.append(q.shape[0]))
    hab, ocab = _tiny_hab_and_ocab(shift=0)
    x, size = torch.randn(1, 16 * 8, 12), (16, 8)  # 4 x 2 windows
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        hab(x, size, relative_position_index_sa(4), None)
        assert windows_per_call == ([3, 3, 2] if autocast else [2, 2, 2, 2])
        windows_per_call.clear()
        ocab(x, size, relative_position_index_oca(4, 0.5))
        assert windows_per_call == ([2, 2, 2, 2] if autocast else [1] * 8)


def test_call_bounds_split_windows_into_calls_of_one_size():
    bounds = hat_arch.HeadAttention.call_bounds
    assert bounds(0, 64, 60) == [(0, 32), (32, 64)]
    assert bounds(0, 49, 60) == [(0, 49)]
    assert bounds(5, 7, 3) == [(5, 8), (8, 11), (11, 12)]
    assert bounds(2, 1, 8) == [(2, 3)]


def test_chunked_linear_is_one_product_where_onednn_multiplies(product_library, monkeypatch):
    """Without an output, oneDNN multiplies any number of rows in one call (no copy into an output); MKL multiplies
    them ROW_CHUNK (here 5) rows at a time."""
    calls = []
    products = {'onednn': '_onednn_linear', 'mkl': 'linear_into'}
    counted = getattr(linear_module, products[product_library])
    monkeypatch.setattr(linear_module, products[product_library], lambda *args, **kwargs: calls.append(1) or counted(
        *args, **kwargs))
    torch.manual_seed(0)
    weight, bias, x = torch.randn(20, 12), torch.randn(20), torch.randn(3, 7, 12)  # 21 rows
    with torch.no_grad():
        out = linear_module.chunked_linear(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-6, rtol=1e-6)
    assert len(calls) == (1 if product_library == 'onednn' else 5)


def test_mlp_keeps_dropout_after_the_fused_gelu():
    mlp = Mlp(in_features=8, hidden_features=16, drop=0.5).train()
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.manual_seed(0)
        a = mlp(x)
        mlp.eval()
        b = mlp(x)
        torch.testing.assert_close(b, mlp.fc2(F.gelu(mlp.fc1(x))), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a, b)  # dropout ran in training even without autograd


@pytest.mark.parametrize('bias', [True, False])
def test_linear_gradients_equal_those_of_f_linear(product_library, bias):
    torch.manual_seed(0)
    layer = Linear(12, 20, bias=bias)
    x = torch.randn(3, 7, 12, requires_grad=True)
    grad = torch.randn(3, 7, 20)
    layer(x).backward(grad)
    ours = [x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
    x2 = x.detach().clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_() if bias else None
    F.linear(x2, w2, b2).backward(grad)
    for got, want in zip(ours, [x2.grad, w2.grad] + ([b2.grad] if bias else [])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_input_gradient_only():
    layer = Linear(6, 4).requires_grad_(False)
    x = torch.randn(5, 6, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(5, 6), atol=1e-6, rtol=1e-6)


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (a.float() - ref).square().mean().item()
    return 10 * math.log10((ref.max() - ref.min()).item()**2 / mse)


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'reference'])
@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_golden_output_in_bf16_is_within_50_db(case, fused):
    """bf16 autocast on both attention paths stays within 50 dB PSNR of the golden fp32 output (54-60 dB measured)."""
    net = golden_net(case, fused_attn=fused)
    io = golden_io(case)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(io['input'])
    assert out.dtype == torch.float32 and out.shape == io['output'].shape
    assert psnr(out, io['output']) >= 50
