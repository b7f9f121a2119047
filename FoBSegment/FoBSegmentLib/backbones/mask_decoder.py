"""SAM's prompt encoder + mask decoder, shared by every SAM-family backbone.

:func:`sam_style_decode` turns normalised prompts into SAM's inputs and runs the eager
decoder; :class:`MaskPredictor` is its exportable twin (prompt encoding included), which
:mod:`.prompt_tokens` feeds without PyTorch; :func:`dense_pe` caches the positional encoding
that never changes for a model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import Backbone, Decoded
from .prompt_tokens import GRAPH_VERSION, PADDING


class MaskPredictor(torch.nn.Module):
    """SAM's prompt encoder and mask decoder as one exportable graph for prompts without a
    mask input (the only kind FoBSegment uses): (embedding, prompt coordinates and labels) ->
    (all 4 masks, their IoU).  With the prompt encoding inside, a run whose exports are ready
    decodes without PyTorch (:mod:`.prompt_tokens` builds the inputs).

    Same weights and function as ``MaskDecoder.predict_masks``, arranged for a CPU, where
    the image side (4096 tokens) is the whole cost and the prompt side has ~7 tokens:

    - every attention between the image and the prompt tokens is reassociated so that no
      4096 x 256 x 128 projection of the image tokens is computed (:func:`_few_to_many`,
      :func:`_many_to_few`): products with the few tokens are formed first;
    - the image stays as (tokens, channels) from the transformer to the masks.  Each 2 x 2,
      stride-2 transposed convolution of the upscaling is one matrix product per pixel and
      its LayerNorm2d a plain layer norm over the last axis, so ONNX Runtime runs two GEMMs
      and a fused LayerNormalization instead of ConvTranspose, channel-axis ReduceMeans and
      the transposes between them; the masks are put back in pixel order once, at the end.

    The positional grid and the "no mask" dense embedding are constants inside the graph, so
    only the embedding and a few prompt points cross into ONNX Runtime per call.  Speed:
    docs/benchmarks/speed.md."""

    GRAPH_VERSION = GRAPH_VERSION

    def __init__(self, prompt_encoder, mask_decoder, image_pe: torch.Tensor, no_mask_dense: torch.Tensor):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        up = mask_decoder.output_upscaling
        conv1, norm, self.act1, conv2, self.act2 = up[0], up[1], up[2], up[3], up[4]
        self.grid = tuple(image_pe.shape[-2:])
        self.register_buffer("pe", image_pe.detach().flatten(2).transpose(1, 2).contiguous())
        dense = no_mask_dense.detach().flatten(2).transpose(1, 2)
        if torch.equal(dense, dense[:, :1].expand_as(dense)):
            dense = dense[:, :1]  # the "no mask" embedding is one vector, the same everywhere
        self.register_buffer("dense", dense.contiguous())
        # ConvTranspose2d weight (in, out, 2, 2) -> (in, 2 * 2 * out), columns ordered (dy, dx, out).
        for name, conv in (("1", conv1), ("2", conv2)):
            self.register_buffer("w" + name, conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.in_channels, -1))
            self.register_buffer("b" + name, conv.bias.detach().repeat(4))
        self.norm_weight, self.norm_bias, self.norm_eps = norm.weight, norm.bias, float(norm.eps)
        self.c1, self.c2 = conv1.out_channels, conv2.out_channels

    def sparse_tokens(self, coords, labels):
        """SAM's ``PromptEncoder`` for points and box corners given as points: coords (1, T, 2)
        in model input pixels, labels (1, T) int64: 1 foreground, 0 background, 2 and 3 a box's
        corners, -1 padding -> (1, T, 256)."""
        pe_enc = self.prompt_encoder
        h, w = pe_enc.input_image_size
        xy = (coords + 0.5) / torch.tensor([w, h], dtype=coords.dtype)
        tokens = pe_enc.pe_layer._pe_encoding(xy)
        lab = labels[..., None]
        tokens = torch.where(lab == PADDING, torch.zeros_like(tokens), tokens)
        tokens = tokens + (lab == PADDING).to(tokens.dtype) * pe_enc.not_a_point_embed.weight
        for k, emb in enumerate(pe_enc.point_embeddings):
            tokens = tokens + (lab == k).to(tokens.dtype) * emb.weight
        return tokens

    def forward(self, embedding, coords, labels):
        """embedding (1, 256, 64, 64), coords (1, T, 2), labels (1, T) -> masks (1, 4, 256, 256),
        iou (1, 4)."""
        sparse = self.sparse_tokens(coords, labels)
        md = self.mask_decoder
        tr = md.transformer
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)[None]
        tokens = torch.cat((out_tokens, sparse), 1)
        queries, keys = tokens, embedding.flatten(2).transpose(1, 2) + self.dense  # (1, HW, C)
        for layer in tr.layers:
            queries, keys = _two_way_block(layer, queries, keys, tokens, self.pe)
        queries = queries + _few_to_many(tr.final_attn_token_to_image, queries + tokens, keys + self.pe, keys)
        hs = tr.norm_final_attn(queries)
        x = (keys @ self.w1 + self.b1).reshape(1, -1, self.c1)  # rows (h, w, dy, dx)
        x = self.act1(torch.nn.functional.layer_norm(x, (self.c1,), self.norm_weight, self.norm_bias, self.norm_eps))
        x = self.act2((x @ self.w2 + self.b2).reshape(1, -1, self.c2))  # rows (h, w, dy, dx, ey, ex)
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], 1)
        h, w = self.grid
        n = hyper.shape[1]
        masks = (x @ hyper.transpose(1, 2)).reshape(h, w, 2, 2, 2, 2, n)
        # pixel (4h + 2dy + ey, 4w + 2dx + ex)
        masks = masks.permute(6, 0, 2, 4, 1, 3, 5).reshape(1, n, 4 * h, 4 * w)
        return masks, md.iou_prediction_head(hs[:, 0])


def _two_way_block(layer, queries, keys, query_pe, key_pe):
    """segment-anything's TwoWayAttentionBlock.forward with the reassociated cross attentions."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    image = keys + key_pe
    queries = layer.norm2(queries + _few_to_many(layer.cross_attn_token_to_image, queries + query_pe, image, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = layer.norm4(keys + _many_to_few(layer.cross_attn_image_to_token, image, queries + query_pe, queries))
    return queries, keys


def _few_to_many(attn, q, k, v):
    """SAM ``Attention(q, k, v)`` for few queries (1, T, C) over many keys/values (1, N, C).

    Per head h: softmax(Q_h K_h^T / sqrt(d)) V_h with K_h = k Wk_h^T + bk_h.  Q_h Wk_h (T x C)
    is formed first, so k is multiplied by H*T columns instead of projected to (N, I); bk_h
    only shifts each row of scores and drops out of the softmax.  The values likewise:
    P_h V_h = (P_h v) Wv_h^T + bv_h, since each row of P_h sums to 1."""
    heads = attn.num_heads
    d = attn.internal_dim // heads
    c = k.shape[-1]
    qh = attn.q_proj(q).reshape(-1, heads, d).transpose(0, 1)  # (H, T, d)
    a = (qh @ attn.k_proj.weight.reshape(heads, d, c)).reshape(1, -1, c) / math.sqrt(d)  # (1, H*T, C)
    p = torch.softmax(a @ k.transpose(1, 2), dim=-1)  # (1, H*T, N)
    pv = (p @ v).reshape(heads, -1, c)  # (H, T, C)
    out = (pv @ attn.v_proj.weight.reshape(heads, d, c).transpose(1, 2)).transpose(0, 1)  # (T, H, d)
    return attn.out_proj(out.reshape(1, -1, heads * d) + attn.v_proj.bias)


def _many_to_few(attn, q, k, v):
    """SAM ``Attention(q, k, v)`` for many queries (1, N, C) over few keys/values (1, T, C).

    Per head: scores = (q Wq_h^T + bq_h) K_h^T / sqrt(d) = q (Wq_h^T K_h^T) + bq_h K_h^T, and the
    output projection is folded into the values: sum_h P_h (V_h Wo_h), so q meets two
    C x H*T matrices instead of the (C x I) projection and the (I x C) output projection."""
    heads = attn.num_heads
    d = attn.internal_dim // heads
    c = q.shape[-1]
    n = q.shape[1]
    kh = attn.k_proj(k).reshape(-1, heads, d).permute(1, 2, 0)  # (H, d, T)
    vh = attn.v_proj(v).reshape(-1, heads, d).transpose(0, 1)  # (H, T, d)
    wq = attn.q_proj.weight.reshape(heads, d, c).transpose(1, 2)  # (H, C, d)
    b = (wq @ kh).transpose(0, 1).reshape(c, -1) / math.sqrt(d)  # (C, H*T)
    shift = (attn.q_proj.bias.reshape(heads, 1, d) @ kh).reshape(1, -1) / math.sqrt(d)  # (1, H*T)
    p = torch.softmax((q @ b + shift).reshape(1, n, heads, -1), dim=-1).reshape(1, n, -1)
    wo = attn.out_proj.weight.t().reshape(heads, d, c)  # (H, d, C)
    return p @ (vh @ wo).reshape(-1, c) + attn.out_proj.bias


def dense_pe(backbone: Backbone, prompt_encoder) -> torch.Tensor:
    """The prompt encoder's positional grid (1, 256, 64, 64): fixed for a model, so computed
    once per backbone instead of on every decode."""
    if "_dense_pe" not in backbone.__dict__:
        with torch.inference_mode():
            backbone._dense_pe = prompt_encoder.get_dense_pe().clone()
    return backbone._dense_pe


@torch.inference_mode()
def sam_style_decode(backbone: Backbone, prompt_encoder, mask_decoder, embedding, points, labels, box,
                     multimask) -> Decoded:
    """Eager decoding, shared by every backbone built from segment-anything's prompt encoder
    and mask decoder."""
    dev = backbone.device
    emb = torch.as_tensor(embedding, dtype=torch.float32)
    if emb.ndim == 3:
        emb = emb[None]
    emb = emb.to(dev)
    pts = None
    if points is not None and len(points):
        p = torch.as_tensor(backbone.to_model_coords(points), device=dev)[None]
        lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=dev)[None]
        pts = (p, lab)
    boxes = None
    if box is not None:
        boxes = torch.as_tensor(backbone.to_model_coords(np.asarray(box).reshape(2, 2)).reshape(1, 1, 4), device=dev)
    sparse, dense = prompt_encoder(points=pts, boxes=boxes, masks=None)
    low_res, iou = mask_decoder(
        image_embeddings=emb,
        image_pe=dense_pe(backbone, prompt_encoder),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    # low_res covers the padded model input at 1/4 resolution: 256 x 256 for both the
    # 256-input LiteMedSAM and the 1024-input SAM, i.e. exactly the WORK_SIZE grid.
    return Decoded(logits=low_res[0].float().cpu().numpy(), iou=iou[0].float().cpu().numpy())
