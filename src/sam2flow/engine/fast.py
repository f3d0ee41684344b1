"""Encoder speed-ups that leave the embeddings as they were (same operations on the same values).

transformers' Hiera attention computes a per-token attention matrix it never uses, and the FPN
neck rebuilds its sine position encodings on every forward (its cache holds one shape of four).
We replace those two pieces of work on our own model instances; the parity tests check that
embeddings equal the reference's within 1e-4 (float32) and that masks match.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _hiera_attention(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """Multi-scale attention of one Hiera block: (B, H, W, C) → (B, H', W', C_out)."""
    b, h, w, _ = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(b, h * w, 3, self.num_attention_heads, -1)
    query, key, value = torch.unbind(qkv, 2)
    if self.query_stride:  # query pooling at stage changes
        pooled = F.max_pool2d(query.reshape(b, h, w, -1).permute(0, 3, 1, 2), self.query_stride, self.query_stride)
        query = pooled.permute(0, 2, 3, 1)
        h, w = query.shape[1:3]
        query = query.reshape(b, h * w, self.num_attention_heads, -1)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=self.scale
    )
    return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def _memoised(forward):
    cache: dict = {}

    def position_encoding(shape, device, dtype, mask=None):
        if mask is not None:
            return forward(shape, device, dtype, mask)
        key = (tuple(shape), str(device), dtype)
        if key not in cache:
            cache[key] = forward(shape, device, dtype)
        return cache[key]

    return position_encoding


def streamline_encoder(model) -> None:
    """Patch a ``Sam2Model``'s vision encoder in place (idempotent)."""
    encoder = model.vision_encoder
    if getattr(encoder, "_sam2flow_streamlined", False):
        return
    for module in encoder.modules():
        if type(module).__name__ == "Sam2MultiScaleAttention":
            module.forward = types.MethodType(_hiera_attention, module)
    neck_pe = encoder.neck.position_encoding
    neck_pe.forward = _memoised(neck_pe.forward)
    encoder._sam2flow_streamlined = True
