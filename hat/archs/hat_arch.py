"""HAT: Hybrid Attention Transformer (Chen et al., "Activating More Pixels in Image Super-Resolution Transformer").

Structure (state-dict names in brackets, identical to the released checkpoints):

    HAT
      conv_first                              shallow features
      patch_embed.norm                        LayerNorm on the flattened map
      layers[i]: RHAG                         residual hybrid attention group
        residual_group.blocks[j]: HAB         (shifted) window MSA + CAB * conv_scale, then MLP
        residual_group.overlap_attn: OCAB     overlapping cross-attention, then MLP
        conv                                  3x3 conv of the group's residual
      norm, conv_after_body                   end of the deep features, global residual
      conv_before_upsample, upsample, conv_last   pixel-shuffle reconstruction

Buffers ``relative_position_index_SA`` and ``relative_position_index_OCA`` are persistent (the released files carry
them); the RGB mean and the shift masks are not.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from hat.archs import onednn_graph
from hat.archs.attention import attention
from hat.archs import linear as token_linear
from hat.archs.linear import Linear, Mlp, chunked_linear
from hat.archs.window import (compiling, overlapping_window_index, overlapping_window_size, pad_to_multiple,
                              relative_position_index_oca, relative_position_index_sa, shift_mask_patterns,
                              WindowOrder, window_order)
from hat.utils.heap import largest_reused_block

SUPPORTED_UPSAMPLERS = ('pixelshuffle', )
SUPPORTED_RESI_CONNECTIONS = ('1conv', 'identity')
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
# Inference runs the upsampling head in bands of this many LR rows (see HAT.reconstruct), with this much context.
RECONSTRUCTION_BAND = 64
RECONSTRUCTION_HALO = 3
# Head sizes that are not a multiple of this are padded with zeros for the fused attention kernels that want it
# (see HeadAttention.pads_heads).
HEAD_ALIGNMENT = 8
# Query tokens per attention call where CPU inference attends in chunks and oneDNN Graph's fused kernel serves (see
# HeadAttention.windows_per_call); elsewhere a chunk is linear.ROW_CHUNK tokens.
FUSED_CHUNK_ROWS = 16384
# Bytes that the largest buffer of one such call (HAB's qkv, OCAB's gathered keys and values) stays within; 0: the
# largest block the C library's heap serves again once freed (hat.utils.heap.largest_reused_block: 32 MiB under
# glibc's defaults), as a larger one is mapped afresh at every call and faulted in page by page.
CALL_BUFFER_BYTES = 0


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p`` in training.

    The keep probability is used as a (non-persistent) tensor: torch.compile takes a module's float attributes for
    constants and would compile every block again for its own drop rate, while a tensor is an input of the graph.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p
        self.active = p > 0.0
        self.register_buffer('keep_prob', torch.tensor(1.0 - p), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active or not self.training:
            return x
        keep = self.keep_prob.to(x.dtype)
        # The per-sample factor (0 or 1 / keep) is formed first: one pass over x, forward and backward, not two.
        scale = x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * scale


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention. x: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, *, num_feat: int, squeeze_factor: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)

    def weights(self, x: Tensor) -> Tensor:
        """The per-channel weights that :meth:`forward` multiplies x by: [B, C, H, W] -> [B, C, 1, 1]."""
        return self.attention(x)


class CAB(nn.Module):
    """Channel attention block: conv (compress) -> GELU -> conv (expand) -> channel attention.

    x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, *, num_feat: int, compress_ratio: int, squeeze_factor: int) -> None:
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat=num_feat, squeeze_factor=squeeze_factor),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.cab(x)

    def features_and_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two factors of :meth:`forward`, unmultiplied, so that a caller can fold the product into a sum.

        x: [B, C, H, W] -> (features [B, C, H, W] in x's memory format, channel weights [B, C, 1, 1]).
        """
        features = self.cab[:3](x)
        return features, self.cab[3].weights(features)


class HeadAttention(nn.Module):
    """Base of the two attentions: a relative-position bias table, ``qkv`` and ``proj`` projections, ``num_heads``.

    Two inference-only caches, refreshed when their source tensors change (a version counter moves on every in-place
    update, e.g. an optimiser step or a state-dict load) and dropped when the module moves (``_apply``):

    * the [heads, Nq, Nk] bias gathered from the table;
    * head-aligned projections (:meth:`pads_heads`). Zero rows appended to each head's rows of the qkv weight and
      bias, and zero columns to the matching columns of the proj weight, give q, k, v with zeros in the extra
      dimensions: the logits and the output are unchanged (the extra products are exact zeros).

    With autograd or under torch.compile neither is cached: both are computed from the parameters at each call
    (differentiably: the aligned projections are ``F.pad`` of the parameters, so gradients reach them as they are).
    """

    relative_position_bias_table: nn.Parameter
    qkv: Linear
    proj: Linear
    num_heads: int
    fused_attn: bool

    def __init__(self) -> None:
        super().__init__()
        self._bias_cache: tuple | None = None
        self._aligned_cache: tuple | None = None

    def gathered_bias(self, rpi: Tensor, num_queries: int, num_keys: int) -> Tensor:
        """Args: rpi: [Nq, Nk] int64 index into the table. Returns: [heads, Nq, Nk]."""
        table = self.relative_position_bias_table
        # Under torch.compile the gather is part of the graph (and a cache keyed on tensor versions would recompile).
        if (torch.is_grad_enabled() and table.requires_grad) or compiling():
            return self._gather(table, rpi, num_queries, num_keys)
        key = _versions(table, rpi)
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, self._gather(table, rpi, num_queries, num_keys))
        return self._bias_cache[1]

    @staticmethod
    def _gather(table: Tensor, rpi: Tensor, num_queries: int, num_keys: int) -> Tensor:
        # index_select, not indexing: its backward (index_add) is several times faster on the CPU than indexing's
        # (an accumulating index_put). It takes no negative indices (the OCA index has some, counting from the end of
        # the table as Python indexing does), hence the remainder.
        index = rpi.view(-1).remainder(table.shape[0])
        return table.index_select(0, index).view(num_queries, num_keys, -1).permute(2, 0, 1).contiguous()

    def pads_heads(self, x: Tensor) -> bool:
        """Whether q, k and v of input ``x`` [..., C] are laid out in heads padded to a multiple of
        :data:`HEAD_ALIGNMENT` (HAT's 30 -> 32), for the fused attention kernels that want such heads:

        * PyTorch's CPU flash kernel (fp32 inference): about 20% faster (Zen 3, 2 threads). Not where oneDNN Graph's
          fused kernel serves fp32 inference instead (:func:`hat.archs.onednn_graph.available`; AMD's AVX-512 CPUs,
          Intel's without bf16):
          there HAT x4's forward at 128x128 was 3.2% faster with heads of 30 (Zen 4, 2 threads, 11 of 12 alternated
          rounds), the extra channels being work that this kernel does not recover.
        * CUDA: the kernels that take an additive mask (memory-efficient attention, cuDNN) need a head size that is a
          multiple of 8 in bf16/fp16 and of 4 in fp32; with 30, ``scaled_dot_product_attention`` falls back to its
          unfused kernel, which materialises the [windows, heads, Nq, Nk] map of every window at once (HAT-L's OCAB
          at a 480x640 input: 2.1 GB per copy in bf16) and runs several times slower.
        """
        head_dim = self.qkv.in_features // self.num_heads
        if head_dim % HEAD_ALIGNMENT == 0 or not self.fused_attn:
            return False
        if x.device.type == 'cuda':
            return True
        return (self.qkv.uses_cpu_kernels(x) and not self.qkv._needs_grad(x)
                and not onednn_graph.available(torch.float32))

    def qkv_layout(self, x: Tensor) -> tuple[Tensor, Tensor | None, int]:
        """The qkv projection to apply to ``x`` and the head size it lays q, k and v out in.

        Args:
            x: [..., C].
        Returns:
            (weight [3 * heads * d, C], bias [3 * heads * d] or None, d): ``d`` is C / heads, or that rounded up
            with zero-filled rows where :meth:`pads_heads` says so.
        """
        if not self.pads_heads(x):
            return self.qkv.weight, self.qkv.bias, self.qkv.in_features // self.num_heads
        qkv_weight, qkv_bias, _ = self._aligned_projections()
        return qkv_weight, qkv_bias, qkv_weight.shape[0] // (3 * self.num_heads)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, int]:
        """(qkv [..., 3 * heads * d], d): the projection of :meth:`qkv_layout` applied to x [..., C]."""
        weight, bias, head_dim = self.qkv_layout(x)
        return self.qkv.forward_with(x, weight, bias), head_dim

    def project_out(self, out: Tensor) -> Tensor:
        """The output projection of attention outputs laid out as :meth:`qkv_layout` said.

        Args:
            out: [..., heads * d] with ``d`` of :meth:`qkv_layout`.
        Returns:
            [..., C].
        """
        if out.shape[-1] == self.proj.in_features:
            return self.proj(out)
        if self._pads_at_each_call():  # only the proj weight: qkv_layout padded the qkv projection already
            proj_weight = pad_proj_heads(self.proj.weight, self.num_heads)
        else:
            _, _, proj_weight = self._aligned_projections()
        return self.proj.forward_with(out, proj_weight, self.proj.bias)

    def attends_in_chunks(self, x: Tensor) -> bool:
        """Whether attention runs a chunk of windows at a time, from the projections to the output (CPU inference).

        Each chunk of query tokens (:meth:`windows_per_call`) is gathered, projected, attended and projected back
        while it is in cache, and no map of q, k and v (3x the tokens, or 9x for OCAB's enlarged windows) is
        allocated: on the CPU a fresh multi-MB buffer costs a page fault per 4 KiB on its first write, which on some
        machines took as long as the products that filled it. Autograd and torch.compile take the whole maps.
        """
        return x.device.type == 'cpu' and not self.qkv._needs_grad(x) and not compiling()

    def windows_per_call(self, x: Tensor, tokens_per_window: int, buffer_per_window: int) -> int:
        """How many windows of queries one chunk of :meth:`attends_in_chunks` holds, for input tokens ``x``.

        :data:`~hat.archs.linear.ROW_CHUNK` query tokens, the rows of one product chunk, except where oneDNN Graph's
        fused kernel serves the chunks' dtype (:func:`hat.archs.onednn_graph.available`; fp32 where oneDNN multiplies,
        bf16 where it is native): there up to :data:`FUSED_CHUNK_ROWS`, as long as the call's largest buffer
        (``buffer_per_window`` elements per window in the products' dtype) stays within :data:`CALL_BUFFER_BYTES`.
        That kernel ran the same 64 windows of HAT's attention 1.16-1.19x faster in calls of 32 or 64 windows than in
        calls of 8, and HAT x4's whole forward at 128x128 was 4.6% faster in fp32 (11 of 12 alternated rounds) and
        4.7% in bf16 (10 of 10) with chunks of 16384 tokens than with 2048 (Zen 4, 2 threads). Where PyTorch's
        kernels serve instead, larger chunks were slower (the AVX2 path on the same machine: 0.94). The buffer bound:
        under glibc's defaults HAT's fp32 qkv of 64 windows (35 MB) was mapped afresh at every call and its product
        ran at 121 GFLOP/s against 179 for 60 windows (in the forward at 128x128, 263K page faults against 17K with
        calls of 32 windows); the whole forward moved by less than the machine's noise (median ratios 0.954 and 1.005
        over 6 and 8 pairs of fresh processes), its peak at 256x256 fell from 394 to 341 MiB. Where the heap keeps
        freed memory (``hat-upscale``) calls of 64 windows stay (Zen 4, 2 threads).
        """
        dtype = token_linear.product_dtype(x)
        per_call = max(1, token_linear.ROW_CHUNK // tokens_per_window)
        if not onednn_graph.available(dtype):
            return per_call
        bound = CALL_BUFFER_BYTES or largest_reused_block()
        return max(per_call, min(FUSED_CHUNK_ROWS // tokens_per_window, bound // (buffer_per_window * dtype.itemsize)))

    @staticmethod
    def call_bounds(first: int, count: int, per_call: int) -> list[tuple[int, int]]:
        """(start, stop) of each call over windows ``first`` to ``first + count``, at most ``per_call`` windows each,
        in calls of one size but the last (64 windows at most 60 per call: two calls of 32, not 60 and 4)."""
        calls = -(-count // per_call)
        size = -(-count // calls)
        return [(start, min(start + size, first + count)) for start in range(first, first + count, size)]

    @staticmethod
    def _chunk_output(tokens: Tensor, first_chunk: Tensor, in_place: bool) -> Tensor:
        """Where attention in chunks writes its output: over ``tokens`` [B * H * W, C] when the caller is done with
        them and the first chunk's output [r, C] has their dtype (not under bf16 autocast), else a new map in the
        chunk's dtype."""
        if in_place and first_chunk.dtype == tokens.dtype:
            return tokens
        return first_chunk.new_empty(tokens.shape[0], first_chunk.shape[-1])

    def _aligned_projections(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """(qkv weight [3 * heads * d8, C], qkv bias [3 * heads * d8] or None, proj weight [C, heads * d8]): cached
        for inference, padded from the parameters at each call with autograd or under torch.compile."""
        if self._pads_at_each_call():
            return pad_heads(self.qkv.weight, self.qkv.bias, self.proj.weight, self.num_heads)
        key = _versions(*self._projection_tensors())
        if self._aligned_cache is None or self._aligned_cache[0] != key:
            self._aligned_cache = (key, pad_heads(self.qkv.weight.detach(), _detached(self.qkv.bias),
                                                  self.proj.weight.detach(), self.num_heads))
        return self._aligned_cache[1]

    def _projection_tensors(self) -> tuple[Tensor, ...]:
        return (self.qkv.weight, self.proj.weight, *([self.qkv.bias] if self.qkv.bias is not None else []))

    def _pads_at_each_call(self) -> bool:
        """Whether the aligned projections are padded from the parameters at each call (autograd, torch.compile)
        rather than cached."""
        return compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in self._projection_tensors()))

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() move the tensors: drop the caches of the old device/dtype
        self._bias_cache = self._aligned_cache = None
        return super()._apply(fn, *args, **kwargs)


def pad_heads(qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
              heads: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """The projections of :class:`HeadAttention` with each head's size d rounded up to a multiple of
    :data:`HEAD_ALIGNMENT` (d8): zero rows after each head's rows of the qkv weight and bias, zero columns after its
    columns of the proj weight (``F.pad``: differentiable).

    Args:
        qkv_weight: [3 * heads * d, C]; qkv_bias: [3 * heads * d] or None; proj_weight: [C, heads * d].
    Returns:
        (qkv weight [3 * heads * d8, C], qkv bias [3 * heads * d8] or None, proj weight [C, heads * d8]).
    """
    channels = qkv_weight.shape[1]
    head_dim = channels // heads
    extra = -head_dim % HEAD_ALIGNMENT
    qkv_weight = F.pad(qkv_weight.view(3, heads, head_dim, channels), (0, 0, 0, extra)).view(-1, channels)
    if qkv_bias is not None:
        qkv_bias = F.pad(qkv_bias.view(3, heads, head_dim), (0, extra)).view(-1)
    return qkv_weight, qkv_bias, pad_proj_heads(proj_weight, heads)


def pad_proj_heads(proj_weight: Tensor, heads: int) -> Tensor:
    """The proj weight of :func:`pad_heads` alone: [C, heads * d] -> [C, heads * d8]."""
    channels = proj_weight.shape[0]
    head_dim = proj_weight.shape[1] // heads
    extra = -head_dim % HEAD_ALIGNMENT
    return F.pad(proj_weight.view(channels, heads, head_dim), (0, extra)).view(channels, -1)


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _versions(*tensors: Tensor) -> tuple:
    """What identifies the contents of tensors for the caches of :class:`HeadAttention`."""
    return tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in tensors)


class WindowAttention(HeadAttention):
    """Multi-head self-attention inside (shifted) windows with relative-position bias.

    Attributes keep the official names: ``qkv``, ``proj``, ``relative_position_bias_table``.
    """

    def __init__(self, *, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads)**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1)**2, num_heads))
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: Tensor, rpi: Tensor, groups: Sequence[tuple[int, Tensor | None]]) -> Tensor:
        """Args:
            windows: [W * N, C] tokens of W windows (N = ws * ws), window after window, tokens row-major.
            rpi: [N, N] relative position index.
            groups: consecutive runs of windows that share an additive [N, N] mask (or None): (count, mask), the
                counts summing to W.
        Returns:
            [W * N, C].
        """
        n, heads = self.window_size * self.window_size, self.num_heads
        qkv, d = self.project_qkv(windows)
        bias = self.gathered_bias(rpi, n, n)
        dropout_p = self.attn_drop if self.training else 0.0
        outs = []
        # split, not slicing: its backward writes each group's gradient into one tensor, where slices would each
        # add a zero-filled gradient of the whole qkv map (one per group and per q, k and v) and sum them up.
        group_qkv = qkv.view(-1, n, 3, heads, d).split([count for count, _ in groups])
        for (_, mask), part in zip(groups, group_qkv):
            q, k, v = part.permute(2, 0, 3, 1, 4).unbind(0)  # each [count, heads, N, d]
            out = attention(q, k, v, bias, scale=self.scale, fused=self.fused_attn, dropout_p=dropout_p, mask=mask)
            outs.append(out.transpose(1, 2))  # [count, N, heads, d]: free for the flash kernel's output layout
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return self.proj_drop(self.project_out(out.reshape(-1, heads * d)))

    def attend_map(self, tokens: Tensor, order: WindowOrder, rpi: Tensor,
                   groups: Sequence[tuple[int, Tensor | None]], *, in_place: bool = False) -> Tensor:
        """Attention over the (shifted) windows of whole maps, each output at its token's place in the maps.

        Args:
            tokens: [B * H * W, C] of the maps, flat (unshifted), contiguous.
            order: the maps' :func:`~hat.archs.window.window_order`.
            rpi: [N, N] relative position index.
            groups: the windows of ``order`` by mask, as in :meth:`forward`.
            in_place: where attention runs in chunks (:meth:`attends_in_chunks`), write each chunk's output over
                the rows of ``tokens`` it has just read (for callers done with ``tokens``): no fresh map.
        Returns:
            [B * H * W, C] (``tokens`` itself when written in place).
        """
        if not self.attends_in_chunks(tokens):
            return order.restore(self(order.take(tokens), rpi, groups))
        n, heads = self.window_size * self.window_size, self.num_heads
        bias = self.gathered_bias(rpi, n, n)
        per_chunk = self.windows_per_call(tokens, n, n * self.qkv_layout(tokens)[0].shape[0])
        out = None  # chosen at the first chunk, in the dtype of its projection (bf16 under autocast)
        first = 0
        for count, mask in groups:
            group_mask = bias if mask is None else bias + mask  # one sum per group instead of one per chunk
            for start, stop in self.call_bounds(first, count, per_chunk):
                qkv, d = self.project_qkv(order.take(tokens, start * n, stop * n))
                group_mask = group_mask.to(qkv.dtype)  # bf16 under autocast: cast once per group, not per chunk
                q, k, v = qkv.view(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
                attended = attention(q, k, v, group_mask, scale=self.scale, fused=self.fused_attn)
                attended = self.proj_drop(self.project_out(attended.transpose(1, 2).reshape(-1, heads * d)))
                if out is None:
                    out = self._chunk_output(tokens, attended, in_place)
                order.put(out, attended, start * n)
            first += count
        return out


class HAB(nn.Module):
    """Hybrid attention block: (shifted) window MSA in parallel with a CAB scaled by ``conv_scale``, then an MLP.

    x: [B, H*W, C] -> [B, H*W, C].
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, shift_size: int, compress_ratio: int,
                 squeeze_factor: int, conv_scale: float, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                 drop: float, attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.conv_scale = conv_scale
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, window_size=window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.conv_block = CAB(num_feat=dim, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, x_size: tuple, rpi_sa: Tensor, shift_patterns: Tensor) -> Tensor:
        """x: [B, H*W, C]; shift_patterns: [2, 2, N, N] from :func:`shift_mask_patterns` (used when shifting)."""
        h, w = x_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x)

        # The conv reads the tokens as a channels-last map (a view) and writes the same layout.
        conv_features, channel_weights = self.conv_block.features_and_weights(x.view(b, h, w, c).permute(0, 3, 1, 2))

        # Cyclic shift and window partition in one gather; windows grouped by the shift mask they need.
        order = window_order(b, h, w, self.window_size, self.shift_size, x.device)
        groups = [(count, shift_patterns[last_row, last_col] if (last_row or last_col) else None)
                  for count, last_row, last_col in order.groups]
        # The normalised tokens are done with once the CAB has read them: attention may write over them.
        attn_x = self.attn.attend_map(x.reshape(b * h * w, c), order, rpi_sa, groups, in_place=True).view(b, h * w, c)

        # In place on the branch outputs, which nothing needs again: no fresh map for the sums (commutative, so the
        # values are those of shortcut + attn_x), and the CAB's channel weighting and conv_scale join the sum in one
        # pass (x + conv_scale * features * weights: the official conv_scale * (features * weights) up to rounding).
        x = self.drop_path(attn_x).add_(shortcut)
        x.view(b, h, w, c).addcmul_(conv_features.permute(0, 2, 3, 1), channel_weights.view(b, 1, 1, c),
                                    value=self.conv_scale)
        # Locals live until the return: free the branch outputs before the MLP, whose hidden map is the widest
        # tensor of the block (lower inference peak; autograd keeps what backward needs anyway).
        del shortcut, conv_features, attn_x
        if self.drop_path.active and self.training:
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return self.mlp.residual_forward(x, self.norm2, in_place=True)  # x is this block's own sum


class OCAB(HeadAttention):
    """Overlapping cross-attention block: queries from each window, keys/values from the enlarged window around it.

    The map of keys/values is zero-padded by ``(ows - ws) / 2`` after the qkv projection, as in the released models,
    so border windows attend to zero keys with their biases (not masked out). x: [B, H*W, C] -> [B, H*W, C].
    """

    def __init__(self, *, dim: int, window_size: int, overlap_ratio: float, num_heads: int, qkv_bias: bool,
                 qk_scale: float | None, mlp_ratio: float) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads)**-0.5
        self.overlap_win_size = overlapping_window_size(window_size, overlap_ratio)
        if (self.overlap_win_size - window_size) % 2:
            raise ValueError(f'overlap_ratio={overlap_ratio} with window_size={window_size} gives an overlapping '
                             f'window of {self.overlap_win_size}, which cannot be centred on the window: '
                             'int(window_size * overlap_ratio) must be even.')
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((window_size + self.overlap_win_size - 1)**2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.fused_attn = True

    def forward(self, x: Tensor, x_size: tuple, rpi_oca: Tensor) -> Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, ows, heads = self.window_size, self.overlap_win_size, self.num_heads
        n_q, n_k = ws * ws, ows * ows
        tokens = self.norm1(x).reshape(b * h * w, c)
        weight, bias, d = self.qkv_layout(tokens)
        inner = heads * d
        q_weight, kv_weight = weight[:inner], weight[inner:]
        q_bias, kv_bias = (None, None) if bias is None else (bias[:inner], bias[inner:])
        kv_rows = self._key_value_rows(tokens, kv_weight, kv_bias)
        kv_index = overlapping_window_index(b, h, w, ws, ows, x.device)  # enlarged windows, as rows of kv_rows
        order = window_order(b, h, w, ws, 0, x.device)  # the windows of queries, in the same order
        attn_bias = self.gathered_bias(rpi_oca, n_q, n_k)

        n_windows = order.gather.numel() // n_q
        in_chunks = self.attends_in_chunks(tokens)
        per_chunk = self.windows_per_call(tokens, n_q, n_k * kv_weight.shape[0]) if in_chunks else n_windows
        attended = None
        for start, stop in self.call_bounds(0, n_windows, per_chunk):
            q = self.qkv.forward_with(order.take(tokens, start * n_q, stop * n_q), q_weight, q_bias)
            q = q.view(-1, n_q, heads, d).transpose(1, 2)  # [w, heads, ws*ws, d]
            attn_bias = attn_bias.to(q.dtype)  # bf16 under autocast: cast once, not per chunk
            kv = kv_rows.index_select(0, kv_index[start * n_k:stop * n_k])
            k, v = kv.view(-1, n_k, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [w, heads, ows*ows, d]
            out = attention(q, k, v, attn_bias, scale=self.scale, fused=self.fused_attn)
            out = self.project_out(out.transpose(1, 2).reshape(-1, inner))
            if in_chunks:
                if attended is None:  # the normalised tokens are read already (their kv rows, this chunk's q)
                    attended = self._chunk_output(tokens, out, in_place=True)
                order.put(attended, out, start * n_q)
            else:
                attended = order.restore(out)
        # The keys/values (and, in one piece, the enlarged windows: 2.25x the map, twice) would otherwise stay alive
        # through the MLP below.
        del kv_rows, q, kv, k, v, out

        x = attended.view(b, h * w, c).add_(x)  # in place, as in HAB
        return self.mlp.residual_forward(x, self.norm2, in_place=True)

    def _key_value_rows(self, tokens: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The keys and values of all tokens and one zero row after them (the padding of the enlarged windows, see
        :func:`~hat.archs.window.overlapping_window_index`). tokens: [R, C] -> [R + 1, 2 * heads * d]."""
        if self.qkv.uses_cpu_kernels(tokens) and not self.qkv._needs_grad(tokens):
            rows = tokens.new_empty(tokens.shape[0] + 1, weight.shape[0])
            rows[-1].zero_()
            chunked_linear(tokens, weight, bias, out=rows[:-1])
            return rows
        return F.pad(self.qkv.forward_with(tokens, weight, bias), (0, 0, 0, 1))


class AttenBlocks(nn.Module):
    """The HABs of one RHAG followed by its OCAB. x: [B, H*W, C] -> [B, H*W, C]."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, window_size: int, shift_windows: bool,
                 compress_ratio: int, squeeze_factor: int, conv_scale: float, overlap_ratio: float, mlp_ratio: float,
                 qkv_bias: bool, qk_scale: float | None, drop: float, attn_drop: float, drop_path: Sequence[float],
                 use_checkpoint: bool) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            HAB(dim=dim, num_heads=num_heads, window_size=window_size,
                shift_size=window_size // 2 if (i % 2 == 1 and shift_windows) else 0, compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor, conv_scale=conv_scale, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, drop_path=drop_path[i]) for i in range(depth)
        ])
        self.overlap_attn = OCAB(dim=dim, window_size=window_size, overlap_ratio=overlap_ratio, num_heads=num_heads,
                                 qkv_bias=qkv_bias, qk_scale=qk_scale, mlp_ratio=mlp_ratio)

    def forward(self, x: Tensor, x_size: tuple, params: dict) -> Tensor:
        # Checkpointing trades a second forward of each block in backward for not storing its activations.
        run_checkpointed = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            args = (x, x_size, params['rpi_sa'], params['shift_patterns'])
            x = checkpoint(blk, *args, use_reentrant=False) if run_checkpointed else blk(*args)
        args = (x, x_size, params['rpi_oca'])
        return checkpoint(self.overlap_attn, *args, use_reentrant=False) if run_checkpointed else self.overlap_attn(
            *args)


class RHAG(nn.Module):
    """Residual hybrid attention group: blocks, a conv on the 2-D map, and a residual connection.

    x: [B, H*W, C] -> [B, H*W, C].
    """

    def __init__(self, *, dim: int, resi_connection: str, **block_kwargs) -> None:
        super().__init__()
        self.residual_group = AttenBlocks(dim=dim, **block_kwargs)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1) if resi_connection == '1conv' else nn.Identity()

    def forward(self, x: Tensor, x_size: tuple, params: dict) -> Tensor:
        b, _, c = x.shape
        y = self.residual_group(x, x_size, params)
        # The conv reads and writes the token layout as a channels-last map, so the residual stream stays
        # contiguous: a transposed stream would make every LayerNorm and addition of the next group copy.
        y = self.conv(y.reshape(b, *x_size, c).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(b, -1, c).add_(x)  # in place on the conv's output


class PatchEmbed(nn.Module):
    """Flatten a [B, C, H, W] map to tokens [B, H*W, C], with an optional LayerNorm (``patch_embed.norm``)."""

    def __init__(self, *, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class Upsample(nn.Sequential):
    """Pixel-shuffle upsampler: log2(scale) x (conv 4C, shuffle 2) for powers of two, (conv 9C, shuffle 3) for 3."""

    def __init__(self, *, scale: int, num_feat: int) -> None:
        layers: list = []
        if scale > 0 and scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f'upscale={scale} is not supported: use 1, 2, 3, 4 or another power of two.')
        super().__init__(*layers)


@ARCH_REGISTRY.register()
class HAT(nn.Module):
    """Hybrid Attention Transformer for single-image super-resolution.

    Keywords are those of ``network_g`` in the official option files. ``forward`` takes [B, in_chans, H, W] in
    [0, 1] (any H, W: the input is reflect-padded to a multiple of ``window_size`` and the output cropped back) and
    returns [B, in_chans, H * upscale, W * upscale].

    Beyond the official keywords:
        fused_attn: compute attention with the fast kernels (default; see :func:`hat.archs.attention.attention`)
            instead of the explicit reference path; both give the same function (see ``set_fused_attn``).

    Speed (same function, same state dict; ``benchmarks/`` measures it against the official computation): attention
    on fused kernels with one mask shared by a group of windows, the cyclic shift and the window partition as one
    row gather (:func:`hat.archs.window.window_order`), a contiguous channels-last token stream, fp32 CPU linear
    layers on the library that suits the CPU and in row chunks (:mod:`hat.archs.linear`), head sizes aligned to 8
    for the CPU flash kernel and CUDA's masked fused kernels (:meth:`HeadAttention.pads_heads`), CPU inference
    attending a chunk of windows at a time from the token maps to the output (:meth:`HeadAttention.attends_in_chunks`;
    up to 64 windows of 256 tokens where oneDNN Graph's kernel serves, :meth:`HeadAttention.windows_per_call`),
    bf16 autocast on oneDNN's bf16 kernels, ``compile_blocks`` for torch.compile.
    """

    def __init__(self, *, img_size: int | Sequence[int] = 64, patch_size: int = 1, in_chans: int = 3,
                 embed_dim: int = 96, depths: Sequence[int] = (6, 6, 6, 6), num_heads: Sequence[int] = (6, 6, 6, 6),
                 window_size: int = 7, compress_ratio: int = 3, squeeze_factor: int = 30, conv_scale: float = 0.01,
                 overlap_ratio: float = 0.5, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 upscale: int = 2, img_range: float = 1.0, upsampler: str = 'pixelshuffle',
                 resi_connection: str = '1conv', fused_attn: bool = True) -> None:
        super().__init__()
        if upsampler not in SUPPORTED_UPSAMPLERS:
            raise ValueError(f'upsampler={upsampler!r} is not supported; supported: {", ".join(SUPPORTED_UPSAMPLERS)}')
        if resi_connection not in SUPPORTED_RESI_CONNECTIONS:
            raise ValueError(f'resi_connection={resi_connection!r} is not supported; '
                             f'supported: {", ".join(SUPPORTED_RESI_CONNECTIONS)}')
        if patch_size != 1:
            raise ValueError(f'patch_size={patch_size} is not supported; HAT works on pixels: use patch_size=1.')
        if len(depths) != len(num_heads):
            raise ValueError(f'depths {list(depths)} and num_heads {list(num_heads)} must have the same length '
                             '(one entry per RHAG).')
        if embed_dim % compress_ratio or embed_dim % squeeze_factor:
            raise ValueError(f'embed_dim={embed_dim} must be divisible by compress_ratio={compress_ratio} and '
                             f'squeeze_factor={squeeze_factor}.')
        for heads in num_heads:
            if embed_dim % heads:
                raise ValueError(f'embed_dim={embed_dim} must be divisible by every num_heads entry, not {heads}.')
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if min(img_hw) < window_size:
            raise ValueError(f'img_size={img_size} is smaller than window_size={window_size}; '
                             'img_size is the training patch size and must be at least the window size.')

        self.window_size = window_size
        self.shift_size = window_size // 2
        self.overlap_ratio = overlap_ratio
        self.upscale = upscale
        self.upsampler = upsampler
        self.img_range = img_range
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = embed_dim
        self.mlp_ratio = mlp_ratio
        self.patches_resolution = img_hw
        num_feat = 64

        mean = DIV2K_RGB_MEAN if in_chans == 3 else (0.0, ) * in_chans
        self.register_buffer('mean', torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer('relative_position_index_SA', relative_position_index_sa(window_size))
        self.register_buffer('relative_position_index_OCA', relative_position_index_oca(window_size, overlap_ratio))
        self._shift_patterns: Tensor | None = None

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)

        # 2. deep features
        self.patch_embed = PatchEmbed(embed_dim=embed_dim, norm=patch_norm)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, img_hw[0] * img_hw[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        stochastic_depth = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        # The released models train on patches larger than the window; a patch the size of one window has nothing to
        # shift, and the official blocks then skip the shift. Kept so that such configurations compute the same.
        shift_windows = min(img_hw) > window_size
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(
                RHAG(dim=embed_dim, resi_connection=resi_connection, depth=depth, num_heads=num_heads[i],
                     window_size=window_size, shift_windows=shift_windows, compress_ratio=compress_ratio,
                     squeeze_factor=squeeze_factor, conv_scale=conv_scale, overlap_ratio=overlap_ratio,
                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                     attn_drop=attn_drop_rate, drop_path=stochastic_depth[sum(depths[:i]):sum(depths[:i + 1])],
                     use_checkpoint=use_checkpoint))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1) if resi_connection == '1conv' else nn.Identity()

        # 3. reconstruction
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.upsample = Upsample(scale=upscale, num_feat=num_feat)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)

        self.apply(self._init_weights)
        self.set_fused_attn(fused_attn)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch every attention between ``scaled_dot_product_attention`` and the explicit reference path."""
        for m in self.modules():
            if isinstance(m, (WindowAttention, OCAB)):
                m.fused_attn = enabled

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (training only)."""
        for layer in self.layers:
            layer.residual_group.use_checkpoint = enabled

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every HAB and OCAB in place (keywords go to ``torch.compile``).

        Compiling the repeated blocks instead of the whole network compiles each kind of block once (all blocks of
        a kind share the compiled code), in a fraction of the time, and leaves module names and state-dict keys
        unchanged (``torch.compile(net)`` would prefix them with ``_orig_mod.``).
        """
        for module in self.modules():
            if isinstance(module, (HAB, OCAB)):
                module.compile(**compile_kwargs)

    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    def _shift_masks(self, device: torch.device) -> Tensor:
        if self._shift_patterns is None or self._shift_patterns.device != device:
            self._shift_patterns = shift_mask_patterns(self.window_size, self.shift_size, device=device)
        return self._shift_patterns

    def forward_features(self, x: Tensor) -> Tensor:
        """Deep feature extraction. x: [B, C, H, W] (multiples of the window) -> [B, C, H, W]."""
        x_size = (x.shape[2], x.shape[3])
        params = {
            'shift_patterns': self._shift_masks(x.device),
            'rpi_sa': self.relative_position_index_SA,
            'rpi_oca': self.relative_position_index_OCA,
        }
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size, params)
        x = self.norm(x)
        return x.view(x.shape[0], *x_size, self.embed_dim).permute(0, 3, 1, 2)  # channels-last: no copy

    def reconstruct(self, x: Tensor) -> Tensor:
        """The upsampling head: [B, embed_dim, H, W] -> [B, in_chans, H * upscale, W * upscale] (before the mean).

        Without gradients and for tall inputs it runs in bands of :data:`RECONSTRUCTION_BAND` rows with
        :data:`RECONSTRUCTION_HALO` rows of context on each side, writing into the output: its widest maps (64
        channels at 2x and 4x the input size, the largest tensors of the whole forward at x4) then exist one band at
        a time. The halo covers what its 3x3 convolutions see: one input row each for ``conv_before_upsample`` and the
        first upsampling conv, then 1/2 and 1/4 of a row at x4 (1/3 at x3): 2.75 rows in all, so with 3 every output
        pixel is computed from the same neighbourhood as in one piece.
        """
        def head(t: Tensor) -> Tensor:
            return self.conv_last(self.upsample(self.conv_before_upsample(t)))

        h = x.shape[-2]
        if torch.is_grad_enabled() or h <= RECONSTRUCTION_BAND + 2 * RECONSTRUCTION_HALO or compiling():
            return head(x)
        s = self.upscale
        out = None
        for top in range(0, h, RECONSTRUCTION_BAND):
            bottom = min(top + RECONSTRUCTION_BAND, h)
            lo, hi = max(top - RECONSTRUCTION_HALO, 0), min(bottom + RECONSTRUCTION_HALO, h)
            band = head(x[..., lo:hi, :])
            if out is None:
                out = band.new_empty(band.shape[0], band.shape[1], h * s, band.shape[3])
            out[..., top * s:bottom * s, :] = band[..., (top - lo) * s:(bottom - lo) * s, :]
        return out

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x, pad_h, pad_w = pad_to_multiple(x, self.window_size)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range

        # Channels-last from the first conv to the last: the token stream is that layout already (patch_embed and
        # forward_features are views), and oneDNN's convolutions run faster on it (the upsampling head at 128x128:
        # 0.17 instead of 0.23 s, Xeon).
        x = self.conv_first(x.contiguous(memory_format=torch.channels_last))
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.reconstruct(x)

        x = (x / self.img_range + mean).contiguous()  # back to [B, C, H, W] rows (a copy only without bands)
        if pad_h or pad_w:
            x = x[..., :h * self.upscale, :w * self.upscale]
        return x
