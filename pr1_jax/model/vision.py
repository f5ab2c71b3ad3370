"""The Qwen2-VL vision tower: patch embedding, 2D RoPE, ViT blocks, 2×2 patch merger.

HF counterpart: `Qwen2VisionTransformerPretrainedModel` (`visual.*` in checkpoints).

Images of any mix of sizes are *packed*: patch rows of several images share a row of
length N (a padded bucket) and attend only within their own image through segment ids.
So one compiled program serves every mix of image sizes that fits the bucket, with no
Python loop per image. `pr1_jax.processing.batch.pack_images` builds the inputs.

Shapes: R packed rows, N patches per row (a multiple of 4: every image occupies whole
2×2 merge blocks), F = C·T·14·14 = 1176 patch features, W ViT width, M = N/4 merged
tokens, D LLM width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pr1_jax.model import layers
from pr1_jax.model.config import VisionConfig

Array = jax.Array


def vision_rope(pos_hw_rn2: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """2D RoPE tables: angle vector concat(h·inv_freq, w·inv_freq), duplicated to head_dim.

    pos_hw_rn2: [R, N, 2] int (row, column of each patch in its image). Returns cos, sin
    [R, N, head_dim] float32 (HF `VisionRotaryEmbedding` + `rot_pos_emb`).
    """
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [dim/2]
    angles = pos_hw_rn2.astype(jnp.float32)[..., None] * inv_freq  # [R, N, 2, dim/2]
    angles = angles.reshape(*angles.shape[:-2], dim)  # h freqs then w freqs
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionBlock(nn.Module):
    """Pre-norm ViT block (HF `Qwen2VLVisionBlock`): x += attn(norm1(x)); x += mlp(norm2(x))."""

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, ctx: tuple[Array, Array, Array]) -> tuple[Array, None]:
        cos, sin, mask_rnn = ctx
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = vit_norm(cfg, kw)
        h = norm(name="norm1")(x)
        # HF attn.qkv: Linear(W, 3W) whose outputs are laid out (3, heads, head_dim).
        qkv = nn.DenseGeneral((3, cfg.num_heads, cfg.head_dim), name="qkv", **kw,
                              kernel_init=layers.dense_init(("vit_embed", None, "vit_heads", "head_dim")),
                              bias_init=layers.zeros_init((None, "vit_heads", "head_dim")))(h)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [R, N, heads, Dh]
        q = layers.apply_rotary(q, cos, sin)[:, None]
        k = layers.apply_rotary(k, cos, sin)[:, None]
        out = layers.attention(q, k, v[:, None], mask_rnn[:, None])[:, 0]
        x = x + nn.DenseGeneral(cfg.width, axis=(-2, -1), name="proj", **kw,  # HF attn.proj
                                kernel_init=layers.dense_init(("vit_heads", "head_dim", "vit_embed")),
                                bias_init=layers.zeros_init(("vit_embed",)))(out)
        h = norm(name="norm2")(x)
        if cfg.mlp == "quick_gelu":  # HF mlp.fc1 / fc2
            h = nn.Dense(cfg.mlp_dim, name="fc1", **kw, kernel_init=layers.dense_init(("vit_embed", "vit_mlp")),
                         bias_init=layers.zeros_init(("vit_mlp",)))(h)
            h = h * jax.nn.sigmoid(1.702 * h)
            h = nn.Dense(cfg.width, name="fc2", **kw, kernel_init=layers.dense_init(("vit_mlp", "vit_embed")),
                         bias_init=layers.zeros_init(("vit_embed",)))(h)
        else:  # Qwen2.5-VL SwiGLU with biases: HF mlp.gate_proj / up_proj / down_proj
            dense = lambda n, f, axes: nn.Dense(f, name=n, **kw, kernel_init=layers.dense_init(axes),  # noqa: E731
                                                bias_init=layers.zeros_init(axes[-1:]))
            h = (jax.nn.silu(dense("gate_proj", cfg.mlp_dim, ("vit_embed", "vit_mlp"))(h))
                 * dense("up_proj", cfg.mlp_dim, ("vit_embed", "vit_mlp"))(h))
            h = dense("down_proj", cfg.width, ("vit_mlp", "vit_embed"))(h)
        return x + h, None


def vit_norm(cfg: VisionConfig, kw: dict[str, Any]):
    """The ViT norm: LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL), eps 1e-6."""
    if cfg.norm == "layernorm":
        return lambda name: layers.LayerNorm(cfg.eps, name=name, **kw)
    return lambda name: layers.RMSNorm(cfg.eps, name=name, axis_name="vit_norm", **kw)


class VisionTower(nn.Module):
    """Packed patches → merged visual tokens in the LLM width.

    pixels_rnf [R, N, F] float, segment_rn [R, N] int32 (image id per patch; padding
    patches carry -1 and only see each other), pos_hw_rn2 [R, N, 2] int32 → [R, N/4, D].
    """

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, pixels_rnf: Array, segment_rn: Array, pos_hw_rn2: Array) -> Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # HF patch_embed.proj: Conv3d(3→W, kernel=stride=(2,14,14)) ≡ Linear on the flat patch.
        x = nn.Dense(cfg.width, use_bias=False, name="patch_embed", **kw,
                     kernel_init=layers.dense_init(("patch", "vit_embed")))(pixels_rnf.astype(self.dtype))
        cos, sin = vision_rope(pos_hw_rn2, cfg.head_dim, cfg.rope_theta)
        mask_rnn = segment_rn[:, :, None] == segment_rn[:, None, :]
        block = VisionBlock
        if self.remat:
            block = nn.remat(block, prevent_cse=False)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=cfg.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(cfg, name="blocks", **kw)(x, (cos, sin, mask_rnn))
        return PatchMerger(cfg, name="merger", **kw)(x)


class PatchMerger(nn.Module):
    """HF `PatchMerger`: norm, group 2×2 neighbours (4 consecutive rows), MLP to the LLM width."""

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_rnw: Array) -> Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = vit_norm(cfg, kw)("ln_q")(x_rnw)
        r, n, w = x.shape
        unit = cfg.merge_size**2
        x = x.reshape(r, n // unit, unit * w)
        x = nn.Dense(unit * w, name="mlp_0", **kw, kernel_init=layers.dense_init(("vit_mlp", "vit_mlp2")),
                     bias_init=layers.zeros_init(("vit_mlp2",)))(x)
        x = jax.nn.gelu(x, approximate=False)
        return nn.Dense(cfg.out_width, name="mlp_2", **kw, kernel_init=layers.dense_init(("vit_mlp2", "embed")),
                        bias_init=layers.zeros_init(("embed",)))(x)
