"""SAM2's mask decoder for many prompts on one image, without per-prompt projections of the image.

transformers' decoder copies the image embedding for every prompt and then, in each of its five
token↔image attentions, projects all 4096 image tokens of every copy (a [4096, 256] × [256, 128]
matmul per attention per prompt) and splits heads with memory copies. The arithmetic below is the
same function, ordered so that image-sized work happens once per image or shrinks to the number
of tokens (~9 per prompt):

- The first block's image side is the same for every prompt (the image embedding plus the
  no-mask embedding): its key, value and query projections run once per image.
- Elsewhere the projections are folded into the tokens. Tokens attending to image tokens X
  (+ positions P): ``softmax(q Wk (X+P)ᵀ) (X Wvᵀ + bv) = (softmax((q Wk)(X+P)ᵀ) X) Wvᵀ + bv``
  (the key bias adds the same logit to every image token, and attention rows sum to one).
  Image tokens attending to tokens: ``q·k = (X+P)·(Wqᵀ k) + bq·k``, and the output projection is
  applied to the ~9 token values before mixing them, not to 4096 mixed rows.

- A mask prompt's embedding is computed on channels-last rows, and its last (1 × 1) convolution
  is added to the image tokens inside one matmul (``prompted_image``).

Precision: image-sized work runs in the image tokens' dtype, token-sized work in the dtype of the
``decoder`` passed in (the engine passes its float32 decoder for a single prompt: ~9-row matmuls in
bf16 cost more than in float32 on a CPU) and tensors are cast where the two meet.

Results equal transformers' within float32 rounding (the tests compare masks by IoU against the
reference package); mask inputs (a different dense embedding per prompt) only lose the sharing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import transforms as T


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., T, heads·d) → (..., heads, T, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, T, d) → (..., T, heads·d)."""
    return x.transpose(-3, -2).flatten(-2)


def _ln(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _self_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Token self-attention (N, T, C) → (N, T, C): small, done plainly."""
    h = attn.num_attention_heads
    out = F.scaled_dot_product_attention(
        _heads(attn.q_proj(q), h), _heads(attn.k_proj(k), h), _heads(attn.v_proj(v), h), scale=attn.scaling
    )
    return attn.o_proj(_merge(out))


def _tokens_to_shared_image(attn, q: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor) -> torch.Tensor:
    """Tokens (N, T, C) attend to one image's projected keys/values (heads, L, d) → (N, T, C)."""
    n, t, _ = q.shape
    h = attn.num_attention_heads
    qh = attn.q_proj(q).view(n * t, h, -1).transpose(0, 1).to(k_img.dtype)  # all prompts' tokens: one query set
    out = F.scaled_dot_product_attention(qh[None], k_img[None], v_img[None], scale=attn.scaling)[0]
    return attn.o_proj(out.transpose(0, 1).reshape(n, t, -1).to(q.dtype))


def _tokens_to_image(attn, q: torch.Tensor, x: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """Tokens q (N, T, C) attend to per-prompt image tokens x (N, L, C), keys xp = x + positions → (N, T, C)."""
    n, t, c = q.shape
    h = attn.num_attention_heads
    a = torch.einsum("nhtd,hdc->nhtc", _heads(attn.q_proj(q), h), attn.k_proj.weight.view(h, -1, c))
    a = a.mul_(attn.scaling).reshape(n, h * t, c).to(x.dtype)
    p = torch.bmm(a, xp.transpose(1, 2)).softmax(-1)  # (N, heads·T, L)
    px = torch.bmm(p, x).view(n, h, t, c).to(q.dtype)
    out = torch.einsum("nhtc,hdc->nhtd", px, attn.v_proj.weight.view(h, -1, c)) + attn.v_proj.bias.view(h, 1, -1)
    return attn.o_proj(_merge(out))


def _image_to_tokens(attn, x, xp, k, v, q_img=None, owned=False) -> torch.Tensor:
    """x + attention of image tokens x (N or 1, L, C) (queries xp = x + positions) to tokens k, v (N, T, C).

    Returns (N, L, C), the residual sum included. ``q_img`` (heads, L, d): the image side's query
    projection, when x is one image shared by all prompts. ``owned``: x (N, L, C) is the caller's
    scratch, so the sum is written into it (no copy of the image tokens).
    """
    n, t, c = k.shape
    h = attn.num_attention_heads
    kh = _heads(attn.k_proj(k), h)  # (N, heads, T, d)
    if q_img is not None:
        logits = torch.einsum("hld,nhtd->nhtl", q_img, kh.to(q_img.dtype)).mul_(attn.scaling)
    else:
        b = torch.einsum("hdc,nhtd->nhtc", attn.q_proj.weight.view(h, -1, c), kh).mul_(attn.scaling).to(x.dtype)
        bias = torch.einsum("hd,nhtd->nht", attn.q_proj.bias.view(h, -1), kh).mul_(attn.scaling).to(x.dtype)
        logits = torch.baddbmm(bias.reshape(n, h * t, 1), b.reshape(n, h * t, c), xp.transpose(1, 2)).view(n, h, t, -1)
    p = logits.softmax(2)  # over the tokens: (N, heads, T, L)
    # Values go through the output projection before mixing; each image token's weights sum to 1
    # per head, so the output bias rides along as bias / heads.
    u = torch.einsum("nhtd,chd->nhtc", _heads(attn.v_proj(v), h), attn.o_proj.weight.view(c, h, -1))
    u = (u + attn.o_proj.bias / h).to(x.dtype)
    p, u = p.reshape(n, h * t, -1).transpose(1, 2), u.reshape(n, h * t, c)
    return x.baddbmm_(p, u) if owned and x.shape[0] == n else torch.baddbmm(x.expand(n, -1, -1), p, u)


def _first_layer_image_side(layer, image: torch.Tensor, pos: torch.Tensor):
    """The first block's projections of one image shared by all prompts, (heads, L, d) each:
    keys and values of the tokens→image attention, queries of the image→tokens attention."""
    xp = image + pos
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    h = t2i.num_attention_heads
    return _heads(t2i.k_proj(xp), h), _heads(t2i.v_proj(image), h), _heads(i2t.q_proj(xp), i2t.num_attention_heads)


def _transformer(tr, tokens: torch.Tensor, image: torch.Tensor, pos: torch.Tensor, first=None):
    """The two-way transformer: tokens (N, T, C), image (N or 1, L, C), positions (L, C).

    ``first``: ``_first_layer_image_side`` of a shared image (1, L, C), made once per image.
    Returns (tokens (N, T, C), image tokens (N, L, C)). Image tokens plus positions are made once per
    layer (N × 4 MB for 4096 × 256 tokens: cheaper than a second (R × C) × (C × L) product per attention).
    """
    queries, x = tokens, image
    shared = first is not None
    for layer in tr.layers:
        if layer.skip_first_layer_pe:
            queries = _self_attention(layer.self_attn, queries, queries, queries)
        else:
            qp = queries + tokens
            queries = queries + _self_attention(layer.self_attn, qp, qp, queries)
        queries = _ln(layer.layer_norm1, queries)
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        q_img = xp = None
        if shared:  # one image for every prompt: its tokens are projected already
            k_img, v_img, q_img = first
            queries = queries + _tokens_to_shared_image(t2i, queries + tokens, k_img, v_img)
        else:
            xp = x + pos
            queries = queries + _tokens_to_image(t2i, queries + tokens, x, xp)
        queries = _ln(layer.layer_norm2, queries)
        queries = _ln(layer.layer_norm3, queries + layer.mlp(queries))
        x = _ln(layer.layer_norm4, _image_to_tokens(i2t, x, xp, queries + tokens, queries, q_img, x is not image))
        shared = False
    queries = queries + _tokens_to_image(tr.final_attn_token_to_image, queries + tokens, x, x + pos)
    return _ln(tr.layer_norm_final_attn, queries), x


def sub_pixel_rows(feat: torch.Tensor, levels: int) -> torch.Tensor:
    """(C, H·2^k, W·2^k) → (H·W·4^k, C) rows in the order ``_upscaled_masks`` produces pixels
    (``transforms.sub_pixel_layout``): source pixel (i, j), then the (a, b) offsets of each level."""
    view, order = T.sub_pixel_layout(tuple(feat.shape), levels)
    return feat.view(view).permute(order).reshape(-1, feat.shape[0])


def upscale_weights(decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Both transposed convolutions as (in, a·b·out) matrices: (256, 4·64) and (64, 4·32)."""
    conv1, conv2 = decoder.upscale_conv1, decoder.upscale_conv2
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, 4 * conv1.out_channels)
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(conv2.in_channels, 4 * conv2.out_channels)
    return w1, w2


def upscale_addends(decoder, high_res) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: what each upscaling level adds (the high-resolution features plus the bias) in
    sub-pixel row order, (L, 4·64) and (4·L, 4·32) for L image tokens (~12 MB for one image)."""
    s0, s1 = high_res
    l = s1.shape[1] * s1.shape[2] // 4
    return with_upscale_bias(decoder, sub_pixel_rows(s1, 1).reshape(l, -1), sub_pixel_rows(s0, 2).reshape(4 * l, -1))


def with_upscale_bias(decoder, pixels1: torch.Tensor, pixels0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``upscale_addends`` from the features' sub-pixel rows, s1's (L, 4·64) and s0's (4·L, 4·32):
    each row holds 4 sub-pixels' channels, so each level's bias repeats 4 times along it."""
    return pixels1 + decoder.upscale_conv1.bias.repeat(4), pixels0 + decoder.upscale_conv2.bias.repeat(4)


def upscale_operands(decoder, addends: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(w1, add1, w2, add2)``: ``upscale_weights`` and one image's ``addends`` (``upscale_addends``,
    or ``with_upscale_bias`` of rows made elsewhere), in the order ``decode`` takes them."""
    (w1, w2), (add1, add2) = upscale_weights(decoder), addends
    return w1, add1, w2, add2


def _upscaled_masks(decoder, x: torch.Tensor, operands, hyper: torch.Tensor, budget: int | None) -> torch.Tensor:
    """The upscaling path and the hypernetwork product: (N, L, C) image tokens → (N, K, 16·L) logits,
    pixels in sub-pixel order (``_raster`` puts them in image order).

    A stride-2, 2 × 2 transposed convolution maps each input pixel to its own 2 × 2 block, so it
    is one matmul per level in a "source pixel, then sub-pixel" order with channels last (the
    layer norm then runs over contiguous channels). So each source pixel's 16 output pixels depend
    on it alone, and the path runs as many source pixels at a time as keep its (N, 16·pixels, C/8)
    activations within ``budget`` bytes (None: all at once). On a CPU that keeps them in cache and
    under glibc's mmap threshold (32 MB), past which every allocation is fresh pages: for 4 prompts
    in float32 they are 33.5 MB. ``hyper`` (N, K, C/8); ``operands`` from ``upscale_operands``.
    """
    n, l, _ = x.shape
    w1, add1, w2, add2 = operands
    c1, c2 = w2.shape[0], w2.shape[1] // 4
    block = l if budget is None else max(1, min(l, budget // (n * 16 * c2 * x.element_size())))
    norm = decoder.upscale_layer_norm
    hyper, w1, w2 = hyper.to(x.dtype), w1.expand(n, -1, -1), w2.expand(n, -1, -1)
    parts = []
    for i in range(0, l, block):
        b = min(block, l - i)
        y = torch.baddbmm(add1[i : i + b].expand(n, -1, -1), x[:, i : i + b], w1).view(n, 4 * b, c1)
        y = decoder.activation(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
        y = torch.baddbmm(add2[4 * i : 4 * (i + b)].expand(n, -1, -1), y, w2).view(n, 16 * b, c2)
        parts.append(torch.bmm(hyper, decoder.activation(y).transpose(1, 2)))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def _raster(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, K, 16·H·W) logits in sub-pixel order (source pixel (i, j), then the (a, b) offsets of each
    level) → (N, K, 4H, 4W) in image order: row 4i + 2a1 + a2, column 4j + 2b1 + b2."""
    n, k, _ = m.shape
    h, w = hw
    return m.view(n, k, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(n, k, 4 * h, 4 * w)


def _patches(x: torch.Tensor) -> torch.Tensor:
    """(N, H·2, W·2, C) → (N, H, W, 4·C): each 2 × 2 patch as one vector, ordered (row offset, column
    offset, channel), which is a stride-2, 2 × 2 convolution's input once its weight is permuted to match."""
    n, hh, ww, c = x.shape
    return x.view(n, hh // 2, 2, ww // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hh // 2, ww // 2, 4 * c)


def _conv_as_linear(conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 2 × 2 convolution's weight (out, in, kh, kw) as a linear layer's (out, kh·kw·in) for ``_patches``."""
    return conv.weight.permute(0, 2, 3, 1).flatten(1)


def _mask_features(embed, masks: torch.Tensor) -> torch.Tensor:
    """The prompt encoder's mask embedding up to its last convolution: (N, 1, 4H, 4W) mask logits →
    (N, H·W, 16) rows in image-token order (row-major over the H × W embedding grid), float32.

    transformers' ``Sam2MaskEmbedding`` runs two stride-2, 2 × 2 convolutions on channels-first
    tensors with a permuted layer norm after each; on channels-last rows each is one small matmul and
    the layer norms run over contiguous channels.
    """
    x = masks.permute(0, 2, 3, 1)  # (N, 4H, 4W, 1)
    for conv, norm in ((embed.conv1, embed.layer_norm1), (embed.conv2, embed.layer_norm2)):
        x = F.linear(_patches(x), _conv_as_linear(conv), conv.bias)
        x = embed.activation(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
    return x.flatten(1, 2)


def image_rows(image_embed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An image embedding (C, H, W) as the decoder's image tokens (H·W, C) in ``dtype``, contiguous:
    the per-image form callers keep."""
    return image_embed.flatten(1).t().to(dtype).contiguous()


def prompted_image(rows: torch.Tensor, prompt_encoder, masks: torch.Tensor | None) -> torch.Tensor:
    """The image tokens plus the dense prompt embedding: (1, L, C) without mask prompts (the same
    no-mask embedding for every prompt), else (N, L, C) for masks (N, 1, 4H, 4W) of low-resolution logits.

    A mask's embedding ends with a 1 × 1 convolution (16 → C channels): it is one matmul per prompt
    whose result is added to the image tokens in the same product (its bias rides as a 17th input
    channel of ones). ``rows`` from ``image_rows``; the result is in ``rows``' dtype.
    """
    if masks is None:
        return (rows + prompt_encoder.no_mask_embed.weight.to(rows.dtype))[None]
    embed = prompt_encoder.mask_embed
    feats = _mask_features(embed, masks)
    feats = torch.cat([feats, feats.new_ones(*feats.shape[:2], 1)], 2).to(rows.dtype)
    w = torch.cat([embed.conv3.weight.flatten(1).t(), embed.conv3.bias[None]]).to(rows.dtype)
    return torch.baddbmm(rows.expand(masks.shape[0], -1, -1), feats, w.expand(masks.shape[0], -1, -1))


def decode(
    decoder,
    image: torch.Tensor,
    pos: torch.Tensor,
    grid: tuple[int, int],
    sparse: torch.Tensor,
    operands: tuple[torch.Tensor, ...],
    multimask_output: bool,
    chunk: int = 8,
    best_only: bool = False,
    upscale_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits (N, K, 4H, 4W) and predicted IoU (N, K) for N prompts of one image.

    ``decoder``: transformers' ``Sam2MaskDecoder`` (its weights), which sets the precision of the
    token-sized work; ``image`` (1 or N, L = H·W, C): ``prompted_image``, in the precision of the
    image-sized work (1: the same for every prompt, so the image side is shared); ``pos`` (L, C):
    the positional encoding as ``image_rows`` in that precision; ``grid``: (H, W); ``sparse``
    (N, 1, S, C) prompt tokens; ``operands``: this image's ``upscale_operands`` (they depend on the
    image only, not the prompts, so callers keep them). K = 3 with ``multimask_output`` else 1 (with
    SAM2's fall-back to the best of three for an unstable single mask); 1 with ``best_only``: the
    candidate with the highest predicted IoU. Prompts go ``chunk`` at a time, which keeps each
    chunk's (prompts, 4096, 256) tensors in cache; the per-image work is done once for all chunks.
    """
    hh, ww = grid
    # One image for several prompts: project its 4096 tokens once (three (4096, 256) × (256, 128)
    # products) and share them. A single prompt is cheaper with the projections folded into its tokens.
    shared = image.shape[0] == 1 and sparse.shape[0] > 1
    first = _first_layer_image_side(decoder.transformer.layers[0], image[0], pos) if shared else None
    out_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight])
    parts = []
    for i in range(0, sparse.shape[0], chunk):
        part = sparse[i : i + chunk, 0]
        tokens = torch.cat([out_tokens.expand(part.shape[0], -1, -1), part], 1)
        queries, x = _transformer(decoder.transformer, tokens, image if shared else image[i : i + chunk], pos, first)
        mask_tokens = queries[:, 2 : 2 + decoder.num_mask_tokens]
        hyper = torch.stack([mlp(mask_tokens[:, k]) for k, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        iou = decoder.iou_prediction_head(queries[:, 1])
        hyper, iou = _candidates(decoder, hyper, iou, multimask_output, best_only)
        parts.append((_upscaled_masks(decoder, x, operands, hyper, upscale_budget), iou))
    masks, iou = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if not multimask_output and decoder.dynamic_multimask_via_stability:
        n, k, _ = masks.shape  # k = 2: the single mask, then the best of the three others
        m, s = decoder._dynamic_multimask_via_stability(masks.view(1, n, k, 4 * hh, 4 * ww), iou[None])
        return _raster(m[0].flatten(2), (hh, ww)), s[0]
    return _raster(masks, (hh, ww)), iou


def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (N, K') of each prompt's candidates x (N, K, ...) → (N, K', ...)."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def _candidates(decoder, hyper: torch.Tensor, iou: torch.Tensor, multimask_output: bool, best_only: bool):
    """The mask tokens worth upscaling (upscaling is the costly part: a product over 16·L pixels
    per token): hyper (N, 4, C/8) and IoU (N, 4) → the three multimask candidates (with ``best_only``
    the best of them by predicted IoU), or the single mask alone, or, with SAM2's fall-back for an
    unstable single mask, the single mask and the best of the three by predicted IoU (the only one
    the fall-back can pick)."""
    best = iou[:, 1:].argmax(1, keepdim=True) + 1  # (N, 1): the best multimask candidate
    if multimask_output:
        return (_pick(hyper, best), _pick(iou, best)) if best_only else (hyper[:, 1:], iou[:, 1:])
    if not decoder.dynamic_multimask_via_stability:
        return hyper[:, :1], iou[:, :1]
    pick = torch.cat([torch.zeros_like(best), best], 1)  # (N, 2)
    return _pick(hyper, pick), _pick(iou, pick)
