"""The Qwen3-VL vision tower: patch embedding with a bias, learned position embeddings
resampled to each image, 2D RoPE, ViT blocks, the 2×2 merger and the DeepStack mergers.

HF counterpart: `Qwen3VLVisionModel` (`model.visual.*` in checkpoints). Packed rows as in
`pr1_jax/model/vision.py` (whose `VisionBlock` and `PatchMerger` it reuses): several images
per row of N patches, each attending only to itself through segment ids.

What differs from Qwen2-VL's tower (docs/qwen3_vl.md):
  * patches of 16 px (F = 3·2·16·16 = 1536 features) embedded with a bias;
  * a learned table of side × side position embeddings (48 × 48 for the released models)
    is resampled bilinearly (align_corners=True) to the image's patch grid and added to the
    patch embeddings (`interpolated_positions`);
  * blocks: LayerNorm, attention with qkv/proj biases and the same 2D RoPE as Qwen2-VL,
    an fc1 → GELU(tanh) → fc2 MLP;
  * DeepStack: the outputs of the blocks in `deepstack_indexes` go through their own
    mergers (LayerNorm over the grouped 4·W features) to the LLM width; the decoder adds
    them to the hidden states of its first layers at the image positions.

Shapes: R packed rows, N patches per row, W ViT width, D LLM width, S DeepStack taps,
L ViT depth.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pr1_jax.model import layers
from pr1_jax.model.config import VisionConfig
from pr1_jax.model.vision import ROWS_W, PatchMerger, VisionBlock, _rows, vision_rope

Array = jax.Array


def image_sizes(segment_rn: Array, pos_hw_rn2: Array) -> Array:
    """Each patch's image grid (height, width) in patches: [R, N, 2] int32, the largest
    (row, column) + 1 among the patches of its segment (padding patches form one segment)."""
    same = segment_rn[:, :, None] == segment_rn[:, None, :]  # [R, N, N]
    return jnp.max(jnp.where(same[..., None], pos_hw_rn2[:, None, :, :], 0), axis=2) + 1


def interpolation_taps(pos_rn: Array, size_rn: Array, side: int) -> tuple[Array, Array]:
    """Bilinear taps (align_corners=True) along one axis: position p of an axis of `size`
    patches samples the table at s = p·(side−1)/max(size−1, 1), from rows ⌊s⌋ and ⌊s⌋+1
    (clamped to the table) with weights 1−frac and frac. → (taps [R, N, 2] int32,
    weights [R, N, 2] float32), computed in float32 in transformers' order of operations
    (`vision_utils.get_vision_interpolation_indices_and_weights`)."""
    src = pos_rn.astype(jnp.float32) * (side - 1) / jnp.maximum(size_rn - 1, 1).astype(jnp.float32)
    floor = jnp.floor(src)
    offsets = jnp.arange(2)
    taps = jnp.clip(floor.astype(jnp.int32)[..., None] + offsets, 0, side - 1)
    weights = jnp.maximum(1 - jnp.abs(src[..., None] - floor[..., None] - offsets.astype(jnp.float32)), 0)
    return taps, weights


def interpolated_positions(table_pw: Array, segment_rn: Array, pos_hw_rn2: Array) -> Array:
    """The learned position table [side², W] resampled to each patch's place in its image:
    Σ of 4 rows (2 taps per axis) × their weight products → [R, N, W] in the table's dtype."""
    side = int(round(table_pw.shape[0] ** 0.5))
    size_rn2 = image_sizes(segment_rn, pos_hw_rn2)
    h_taps, h_w = interpolation_taps(pos_hw_rn2[..., 0], size_rn2[..., 0], side)
    w_taps, w_w = interpolation_taps(pos_hw_rn2[..., 1], size_rn2[..., 1], side)
    rows = (h_taps[..., :, None] * side + w_taps[..., None, :]).reshape(*h_taps.shape[:-1], 4)
    weights = (h_w[..., :, None] * w_w[..., None, :]).reshape(*h_w.shape[:-1], 4)
    gathered = jnp.take(table_pw, rows, axis=0)  # [R, N, 4, W]
    return jnp.sum(gathered * weights[..., None].astype(gathered.dtype), axis=-2)


class Qwen3VisionTower(nn.Module):
    """Packed patches → merged visual tokens and their DeepStack features.

    pixels_rnf [R, N, F] float, segment_rn [R, N] int32 (image id per patch; padding patches
    carry -1), pos_hw_rn2 [R, N, 2] int32 → [R, N/4, 1 + S, D]: plane 0 the merger's output
    (the image tokens' embeddings), planes 1..S the DeepStack features of the taps in order.
    """

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: Any = None
    attention: str = "xla"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, pixels_rnf: Array, segment_rn: Array, pos_hw_rn2: Array,
                 image_patches_rjl: Array | None = None) -> Array:
        """As `VisionTower`; attention and the position taps use [R, N, N] segment masks (the
        image table is not used: training keeps Qwen3-VL's images one per row, `StepShapes`)."""
        del image_patches_rjl
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # HF patch_embed.proj: Conv3d(3→W, kernel=stride=(2,16,16), bias) ≡ Linear on the flat patch.
        pixels_rnf = _rows(pixels_rnf.astype(self.dtype))
        x = nn.Dense(cfg.width, use_bias=True, name="patch_embed", **kw,
                     kernel_init=layers.dense_init(("patch", "vit_embed")),
                     bias_init=layers.zeros_init(("vit_embed",)))(pixels_rnf)
        table = nn.Embed(cfg.num_position_embeddings, cfg.width, name="pos_embed", **kw,  # HF pos_embed
                         embedding_init=layers.dense_init((None, "vit_embed"))).embedding
        x = x + interpolated_positions(table, segment_rn, pos_hw_rn2).astype(x.dtype)
        x = nn.with_logical_constraint(x, ROWS_W)
        cos, sin = vision_rope(pos_hw_rn2, cfg.head_dim, cfg.rope_theta)
        image_mask_rnn = segment_rn[:, :, None] == segment_rn[:, None, :]
        block = VisionBlock
        if self.remat:
            block = nn.remat(block, prevent_cse=False, policy=self.remat_policy)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, 0), length=cfg.depth, unroll=self.scan_unroll,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        # Every block's output comes back [L, R, N, W] (a scan has no per-step choice of what
        # to return); the S taps are picked from it.
        full_l = jnp.ones((cfg.depth,), bool)  # no window attention
        x, per_block = blocks(cfg, name="blocks", attention=self.attention, emit=bool(cfg.deepstack_indexes),
                              **kw)(x, (cos, sin, image_mask_rnn, None), full_l)
        planes = [PatchMerger(cfg, name="merger", **kw)(x)]
        for j, index in enumerate(cfg.deepstack_indexes):  # HF deepstack_merger_list.{j}
            planes.append(PatchMerger(cfg, postshuffle_norm=True, name=f"deepstack_merger_{j}", **kw)(per_block[index]))
        return jnp.stack(planes, axis=-2)
