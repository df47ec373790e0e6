"""The model on a CUDA device: the golden outputs, and attention on the fused kernel that takes HAT's masks.

Skipped without CUDA (``benchmarks/gpu_check.py`` runs them on a GPU). TF32 is off in these tests, so that fp32 on
the GPU is fp32 and can be held to the golden outputs.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import GOLDEN_CASES, golden_io, golden_net, output_and_grads, tiny_hat_config
from hat.archs.hat_arch import HAT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

FP32_MAX_DIFF = 1e-4  # GPU kernels order their sums differently from the CPU's


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off for the test, as it was before."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_golden_outputs_on_cuda(case):
    io = golden_io(case)
    net = golden_net(case).cuda()
    with torch.no_grad():
        out = net(io['input'].cuda()).cpu()
    assert out.shape == io['output'].shape
    assert (out - io['output']).abs().max().item() <= FP32_MAX_DIFF


def test_attention_runs_on_the_memory_efficient_kernel_in_inference_and_training():
    """Heads of 6 (tiny HAT) are padded to 8 on CUDA: with only the memory-efficient kernel allowed, which takes a
    mask but no head size that is not a multiple of 4 (fp32) or 8 (bf16), the forward and backward run (an unpadded
    head raises "No available kernel") and give the CPU's output and gradients."""
    torch.manual_seed(0)
    # Windows of 8: 64 queries, 144 keys in the OCAB, so that the masks are aligned as the released models' are
    # (256, 576); no stochastic depth, whose random draws differ between the devices.
    net = HAT(**tiny_hat_config(depths=(1, 1), window_size=8, drop_path_rate=0.0))
    x = torch.rand(2, 3, 16, 24)
    want, want_grads = output_and_grads(net, x)
    net.cuda()
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        got, got_grads = output_and_grads(net, x.cuda())
        net.eval()
        with torch.no_grad():
            inferred = net(x.cuda()).cpu()
            with torch.autocast('cuda', dtype=torch.bfloat16):
                inferred_bf16 = net(x.cuda()).float().cpu()
    torch.testing.assert_close(got, want, atol=FP32_MAX_DIFF, rtol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
    net.cpu()
    with torch.no_grad():
        want_inferred = net(x)
    torch.testing.assert_close(inferred, want_inferred, atol=FP32_MAX_DIFF, rtol=0)
    assert (inferred_bf16 - want_inferred).abs().max().item() < 0.02  # bf16 products (CPU: 0.002 off), same function
