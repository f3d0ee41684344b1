"""Encoder speed-ups that leave the embeddings as they were (same operations on the same values).

transformers' Hiera attention computes a per-token attention matrix it never uses, the FPN neck
rebuilds its sine position encodings on every forward (its cache holds one shape of four), and the
trunk resizes its position embedding (bicubic, ~45 ms at 256 × 256 in bf16 on 2 cores) on every
forward. We replace those three pieces of work on our own model instances; the parity tests check that
embeddings equal the reference's within 1e-4 (float32) and that masks match.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

WINDOW_TOKENS = 16384  # tokens of windowed attention per stretch between pauses (4 stretches at stage 1)


def _hiera_attention(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """Multi-scale attention of one Hiera block: (B, H, W, C) → (B, H', W', C_out), B = images × windows.

    With pause points, windows go ``WINDOW_TOKENS`` tokens at a time with a pause between (each
    window's attention is its own: the same values).
    """
    pauses = getattr(self, "_sam2flow_pauses", ())
    if not pauses:  # (a conversion traces this: no shape arithmetic on its path)
        return _attend(self, hidden_states)
    b, h, w, _ = hidden_states.shape
    step = max(1, WINDOW_TOKENS // (h * w))
    if step >= b:
        return _attend(self, hidden_states)
    parts = []
    for start in range(0, b, step):
        for pause in pauses if start else ():
            pause()
        parts.append(_attend(self, hidden_states[start : start + step]))
    return torch.cat(parts)


def _attend(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``_hiera_attention`` on (B, H, W, C) at once (global attention: query rows in chunks).

    q, k and v come out of one permute to (3, B, heads, H·W, d), and query pooling runs on
    (B, H, W, heads·d) channels: the same values as transformers' unbind/transpose, in a layout
    OpenVINO's converter also reads right (2026.4 mis-converted the unbind + per-tensor transposes).
    """
    b, h, w, _ = hidden_states.shape
    heads = self.num_attention_heads
    qkv = self.qkv(hidden_states).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv[0], qkv[1], qkv[2]  # (B, heads, H·W, d)
    if self.query_stride:  # query pooling at stage changes
        d = query.shape[-1]
        grid = query.transpose(1, 2).reshape(b, h, w, heads * d).permute(0, 3, 1, 2)
        pooled = F.max_pool2d(grid, self.query_stride, self.query_stride)
        h, w = pooled.shape[2:]
        query = pooled.reshape(b, heads, d, h * w).transpose(2, 3)
    rows, pauses = getattr(self, "_sam2flow_pause_rows", 0), getattr(self, "_sam2flow_pauses", ())
    if pauses and query.shape[2] > rows:  # a global attention: query rows in chunks, a pause between them
        parts = []
        for start in range(0, query.shape[2], rows):
            for pause in pauses if start else ():
                pause()
            chunk = query[:, :, start : start + rows]
            parts.append(F.scaled_dot_product_attention(chunk, key, value, scale=self.scale))
        out = torch.cat(parts, 2)
    else:
        out = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


MEMO = "_sam2flow_memo"  # the instance attribute holding a module's memoised position encodings


def _memoised_sine(self, shape, device, dtype, mask=None):
    """The neck's sine position encoding (it has no weights), made once per shape, device and dtype.

    Bound to its module with ``types.MethodType`` and memoised on it, so a ``copy.deepcopy`` of the
    model rebinds to the copy (a closure would keep computing with the original)."""
    forward = type(self).forward
    if mask is not None:
        return forward(self, shape, device, dtype, mask)
    memo = self.__dict__.setdefault(MEMO, {})
    key = (tuple(shape), str(device), dtype)
    if key not in memo:
        memo[key] = forward(self, shape, device, dtype)
    return memo[key]


def _memoised_pos_embed(self, hw):
    """Hiera's ``_get_pos_embed`` made once per grid size and weights, in inference mode only (a
    conversion traces it as it is); bound and memoised like ``_memoised_sine``."""
    compute = type(self)._get_pos_embed
    if not torch.is_inference_mode_enabled():
        return compute(self, hw)
    pe, window = self.pos_embed, self.pos_embed_window
    key = (tuple(hw), pe.dtype, pe.device, pe.data_ptr(), pe._version, window.data_ptr(), window._version)
    memo = self.__dict__.setdefault(MEMO, {})
    if key not in memo:
        if len(memo) >= 4:
            memo.clear()
        memo[key] = compute(self, hw)
    return memo[key]


def position_memos(encoder) -> list[dict]:
    """The memoised position encodings of a streamlined vision encoder (neck, trunk)."""
    return [m.__dict__.setdefault(MEMO, {}) for m in (encoder.neck.position_encoding, encoder.backbone)]


def add_pause_points(side, pause: Callable[..., None], attention_rows: int = 512) -> None:
    """Call ``pause`` at the encoder's pause points (``DecodeFirst.wait``), at most ~30-60 ms of work
    apart on 2 cores for hiera_tiny in bf16: before the patch embedding, each trunk block's attention
    and its output projection, its MLP and the MLP's second layer, each neck convolution and each
    high-resolution projection, between ``WINDOW_TOKENS`` of a windowed attention, and between
    chunks of ``attention_rows`` query rows of a global attention (4096 rows in hiera's global
    blocks, ~250 ms of work unchunked). Row chunks give the same values: each query
    row's attention is computed alone. ``side``: an ``ImageSide``. Several engines on one model each
    add their own ``pause``."""
    encoder = side.encoder
    stops = [encoder.backbone.patch_embed, *encoder.neck.convs, side.conv_s0, side.conv_s1]
    for block in encoder.backbone.blocks:
        stops += [block, block.attn.proj, block.mlp, block.mlp.proj_out]
        if attention_rows:  # every engine on this model pauses there, as with the hooks
            block.attn._sam2flow_pauses = (*getattr(block.attn, "_sam2flow_pauses", ()), pause)
            block.attn._sam2flow_pause_rows = attention_rows
    for module in stops:
        module.register_forward_pre_hook(pause)


def streamline_encoder(model) -> None:
    """Patch a ``Sam2Model``'s vision encoder in place (idempotent)."""
    encoder = model.vision_encoder
    if getattr(encoder, "_sam2flow_streamlined", False):
        return
    for module in encoder.modules():
        if type(module).__name__ == "Sam2MultiScaleAttention":
            module.forward = types.MethodType(_hiera_attention, module)
    neck_pe = encoder.neck.position_encoding
    neck_pe.forward = types.MethodType(_memoised_sine, neck_pe)
    encoder.backbone._get_pos_embed = types.MethodType(_memoised_pos_embed, encoder.backbone)
    encoder._sam2flow_streamlined = True


def forget_position_encodings(encoder) -> None:
    """Empty ``streamline_encoder``'s memoised position encodings (tens of MB after a conversion ran
    the torch encoder once): for an encoder whose torch weights are released."""
    for memo in position_memos(encoder):
        memo.clear()
