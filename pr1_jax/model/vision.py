"""The Qwen2-VL vision tower: patch embedding, 2D RoPE, ViT blocks, 2×2 patch merger.

HF counterpart: `Qwen2VisionTransformerPretrainedModel` (`visual.*` in checkpoints).

Images of any mix of sizes are *packed*: patch rows of several images share a row of
length N (a padded bucket) and attend only within their own image through segment ids.
So one compiled program serves every mix of image sizes that fits the bucket, with no
Python loop per image. `pr1_jax.processing.batch.pack_images` builds the inputs.

Qwen2.5-VL (HF `Qwen2_5_VisionTransformerPretrainedModel`) differs in RMSNorm, a SwiGLU
MLP with biases and *window attention*: most blocks attend only within square windows
of `window_size` pixels (112 px = 8×8 patches = 4×4 merged tokens, the last window of a
row or column cut short by the image edge); the blocks in `fullatt_block_indexes`
attend over the whole image. See `window_attention_mask` for why we never permute.

Full attention (every Qwen2-VL block) runs per image, not per row: the image table
`image_patches` [R, J, L] (`pack_images`) gathers each image's q, k, v into a row of its
own ([R·J, L]; L ≥ the largest image), attention there with the image's length (cuDNN does
no work past it), and the outputs go back to their patches. Its cost follows the images,
so a row may hold many of them: the matmuls see the packed rows with little padding, and
attention never sees another image (a mask over the whole row costs N² per row).
Window attention (Qwen2.5-VL) and Qwen3-VL keep the [R, N, N] masks.

Shapes: R packed rows, N patches per row (a multiple of 4: every image occupies whole
2×2 merge blocks), F = C·T·14·14 = 1176 patch features, W ViT width, M = N/4 merged
tokens, D LLM width, L ViT depth (J, L of the image table: images per row, patches per image).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pr1_jax.model import layers
from pr1_jax.model.config import VisionConfig

Array = jax.Array

# Activations run data-parallel over the packed rows, their width WHOLE ("act_vit_embed" /
# "act_embed" are unsharded in every rule table, unlike the weights' "vit_embed" / "embed"):
# under FSDP each matmul then gathers its weight instead of contracting over a width that
# is sharded on both sides (partial sums → an activation-sized all-reduce per matmul).
ROWS_W = ("batch", None, "act_vit_embed")


def _rows(x: Array, *names: str | None) -> Array:
    """x [R, N, ...] constrained to packed rows over the batch axes, the rest as named."""
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1 - len(names)) + names)


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


def window_attention_mask(segment_rn: Array, pos_hw_rn2: Array, cfg: VisionConfig) -> Array:
    """Qwen2.5-VL's window attention as a mask: same image AND same window → [R, N, N] bool.

    A patch at (h, w) lies in window (h // S, w // S) of its image, S = merge ·
    (window_size // merge // patch) patches (8 for 112 px): HF splits the merged-token
    grid into windows of window_size // merge // patch tokens from the top-left corner,
    padding the bottom/right edge, and drops the padding, so edge windows are smaller.

    Why no permutation: HF gathers the patches (in 2×2-block units, RoPE alongside) into
    window order so that each window is one contiguous cu_seqlens segment, runs the blocks,
    and un-permutes the merger output. Every op of a block except attention acts per patch
    and so commutes with any permutation; masked softmax attention is permutation
    equivariant (permuting queries and keys together, and the mask with them, permutes the
    output). A contiguous segment in window order is exactly the set "same window" in the
    original order, so HF's result equals attention with this mask on unpermuted patches.
    The permutation moves whole 2×2 blocks, so the merger's groups of 4 consecutive
    patches are the same blocks either way, and un-permuting its output restores the
    order we already have. The parity tests against transformers check this.

    Images only (grid_t = 1): video frames share (h, w), so their windows would merge
    across frames, where HF keeps frames apart (as `segment_rn` does not split them either).
    """
    side = cfg.merge_size * (cfg.window_size // cfg.merge_size // cfg.patch_size)
    if side <= 0:
        raise ValueError(f"window_size {cfg.window_size} is smaller than one merged token "
                         f"({cfg.merge_size * cfg.patch_size} px)")
    win_rn2 = pos_hw_rn2 // side
    same = segment_rn[:, :, None] == segment_rn[:, None, :]
    for a in range(2):  # same window row and same window column
        same &= win_rn2[:, :, None, a] == win_rn2[:, None, :, a]
    return same


def image_index(image_patches_rjl: Array, row_len: int) -> tuple[Array, Array, Array, Array]:
    """Both directions of the image table as gathers: (at [R, J·L]: the row patch of each image
    slot, valid [R, J·L]; back [R, N]: the image slot of each row patch, in_image [R, N]).
    The valid slots and the image patches are in one-to-one correspondence."""
    r, j, size = image_patches_rjl.shape
    flat = image_patches_rjl.reshape(r, j * size)
    valid = flat >= 0
    to = jnp.where(valid, flat, row_len + jnp.arange(j * size))  # padding slots: out of the row, dropped
    put = lambda t, v: jnp.zeros(row_len, v.dtype).at[t].set(v, mode="drop", unique_indices=True)  # noqa: E731
    back = jax.vmap(put, in_axes=(0, None))(to, jnp.arange(j * size, dtype=jnp.int32))
    in_image = jax.vmap(put, in_axes=(0, None))(to, jnp.ones(j * size, bool))
    return jnp.maximum(flat, 0), valid, back, in_image


def per_image(x_rn: Array, image_patches_rjl: Array, index: tuple | None = None) -> Array:
    """x [R, N, ...] → each image's patches in a row of its own: [R·J, L, ...] (a row's J
    image slots in order; positions past an image's end: 0). `index`: `image_index` of the table."""
    r, j, size = image_patches_rjl.shape
    at, valid, back, has = index or image_index(image_patches_rjl, x_rn.shape[1])
    return _rows(layers.move_rows(x_rn, at, valid, back, has)).reshape(r * j, size, *x_rn.shape[2:])


def back_to_rows(y: Array, image_patches_rjl: Array, row_len: int, index: tuple | None = None) -> Array:
    """`per_image`'s inverse: y [R·J, L, ...] → [R, N, ...] (patches of no image: 0)."""
    r, j, size = image_patches_rjl.shape
    at, valid, back, has = index or image_index(image_patches_rjl, row_len)
    return _rows(layers.move_rows(y.reshape(r, j * size, *y.shape[2:]), back, has, at, valid))


def image_attention(q: Array, k: Array, v: Array, image_patches_rjl: Array, impl: str) -> Array:
    """Each image's patches attend among themselves: q, k, v [R, N, H, Dh] → [R, N, H, Dh]."""
    lengths = jnp.sum(image_patches_rjl >= 0, axis=-1).reshape(-1)  # [R·J]
    index = image_index(image_patches_rjl, q.shape[1])
    gather = lambda a: per_image(a, image_patches_rjl, index)  # noqa: E731
    out = layers.prefix_attention(gather(q), gather(k), gather(v), lengths, impl=impl)
    return back_to_rows(out, image_patches_rjl, q.shape[1], index)


class VisionBlock(nn.Module):
    """Pre-norm ViT block (HF `Qwen2VLVisionBlock` / `Qwen2_5_VLVisionBlock` / `Qwen3VLVisionBlock`):
    x += attn(norm1(x)); x += mlp(norm2(x))."""

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "xla"  # layers.ATTENTION_IMPLS
    emit: bool = False  # also return the output as the scan's per-block output (Qwen3-VL DeepStack)

    @nn.compact
    def __call__(self, x: Array, ctx: tuple[Array, Array, Array, Array | None],
                 full_attention: Array) -> tuple[Array, None]:
        """ctx = (cos, sin, image mask or the image table [R, J, L], window mask or None),
        shared by all blocks; full_attention: scalar bool, this block's entry of the scanned [L] flags."""
        cos, sin, images, window_mask_rnn = ctx
        mask_rnn = images
        if window_mask_rnn is not None:
            mask_rnn = jnp.where(full_attention, images, window_mask_rnn)
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = vit_norm(cfg, kw)
        x = nn.with_logical_constraint(x, ROWS_W)
        h = nn.with_logical_constraint(norm(name="norm1")(x), ROWS_W)
        # HF attn.qkv: Linear(W, 3W) whose outputs are laid out (3, heads, head_dim).
        qkv = nn.DenseGeneral((3, cfg.num_heads, cfg.head_dim), name="qkv", **kw,
                              kernel_init=layers.dense_init(("vit_embed", None, "vit_heads", "head_dim")),
                              bias_init=layers.zeros_init((None, "vit_heads", "head_dim")))(h)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [R, N, heads, Dh]
        q = layers.apply_rotary(q, cos, sin)[:, None]
        k = layers.apply_rotary(k, cos, sin)[:, None]
        if images.dtype == jnp.int32:  # the image table (full attention only: the tower gives no window mask)
            out = image_attention(q[:, 0], k[:, 0], v, images, self.attention)
        else:
            out = layers.attention(q, k, v[:, None], mask_rnn[:, None], impl=self.attention)[:, 0]
        x = x + nn.DenseGeneral(cfg.width, axis=(-2, -1), name="proj", **kw,  # HF attn.proj
                                kernel_init=layers.dense_init(("vit_heads", "head_dim", "vit_embed")),
                                bias_init=layers.zeros_init(("vit_embed",)))(out)
        x = nn.with_logical_constraint(x, ROWS_W)
        h = nn.with_logical_constraint(norm(name="norm2")(x), ROWS_W)
        if cfg.mlp in ("quick_gelu", "gelu_tanh"):  # HF mlp.fc1 / fc2 (Qwen3-VL: mlp.linear_fc1 / fc2)
            h = nn.Dense(cfg.mlp_dim, name="fc1", **kw, kernel_init=layers.dense_init(("vit_embed", "vit_mlp")),
                         bias_init=layers.zeros_init(("vit_mlp",)))(h)
            if cfg.mlp == "quick_gelu":
                h = _rows(h * jax.nn.sigmoid(1.702 * h), "vit_mlp")
            else:  # HF "gelu_pytorch_tanh"
                h = _rows(jax.nn.gelu(h, approximate=True), "vit_mlp")
            h = nn.Dense(cfg.width, name="fc2", **kw, kernel_init=layers.dense_init(("vit_mlp", "vit_embed")),
                         bias_init=layers.zeros_init(("vit_embed",)))(h)
        else:  # Qwen2.5-VL SwiGLU with biases: HF mlp.gate_proj / up_proj / down_proj
            dense = lambda n, f, axes: nn.Dense(f, name=n, **kw, kernel_init=layers.dense_init(axes),  # noqa: E731
                                                bias_init=layers.zeros_init(axes[-1:]))
            h = (jax.nn.silu(dense("gate_proj", cfg.mlp_dim, ("vit_embed", "vit_mlp"))(h))
                 * dense("up_proj", cfg.mlp_dim, ("vit_embed", "vit_mlp"))(h))
            h = dense("down_proj", cfg.width, ("vit_mlp", "vit_embed"))(_rows(h, "vit_mlp"))
        x = nn.with_logical_constraint(x + h, ROWS_W)
        return x, (x if self.emit else None)


def vit_norm(cfg: VisionConfig, kw: dict[str, Any]):
    """The ViT norm: LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL, HF `Qwen2_5_VLRMSNorm`), eps 1e-6."""
    if cfg.norm == "layernorm":
        return lambda name: layers.LayerNorm(cfg.eps, name=name, **kw)
    return lambda name: layers.RMSNorm(cfg.eps, name=name, axis_name="vit_norm", **kw)


class VisionTower(nn.Module):
    """Packed patches → merged visual tokens in the LLM width.

    pixels_rnf [R, N, F] float, segment_rn [R, N] int32 (image id per patch; padding
    patches carry -1 and only see each other), pos_hw_rn2 [R, N, 2] int32, image_patches_rjl
    [R, J, L] int32 (the image table; None: masks over the rows) → [R, N/4, D].
    """

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: Any = None  # jax.checkpoint policy: what remat keeps (None: nothing, recompute all)
    attention: str = "xla"  # layers.ATTENTION_IMPLS
    scan_unroll: int = 1  # blocks per scan step (depth: straight-line; no per-block copies in/out of the loop)

    @nn.compact
    def __call__(self, pixels_rnf: Array, segment_rn: Array, pos_hw_rn2: Array,
                 image_patches_rjl: Array | None = None) -> Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # HF patch_embed.proj: Conv3d(3→W, kernel=stride=(2,14,14)) ≡ Linear on the flat patch.
        pixels_rnf = _rows(pixels_rnf.astype(self.dtype))
        x = nn.Dense(cfg.width, use_bias=False, name="patch_embed", **kw,
                     kernel_init=layers.dense_init(("patch", "vit_embed")))(pixels_rnf)
        x = nn.with_logical_constraint(x, ROWS_W)
        cos, sin = vision_rope(pos_hw_rn2, cfg.head_dim, cfg.rope_theta)
        windowed = bool(cfg.window_size)  # Qwen2.5-VL
        if image_patches_rjl is not None and not windowed:
            images = image_patches_rjl.astype(jnp.int32)  # attention per image (`image_attention`)
        else:
            images = segment_rn[:, :, None] == segment_rn[:, None, :]  # [R, N, N]
        window_mask_rnn = window_attention_mask(segment_rn, pos_hw_rn2, cfg) if windowed else None
        # Scanned per block: attend over the whole image (True) or within the window (False).
        full_l = jnp.asarray([not windowed or i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
        block = VisionBlock
        if self.remat:
            block = nn.remat(block, prevent_cse=False, policy=self.remat_policy)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, 0), length=cfg.depth, unroll=self.scan_unroll,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        ctx = (cos, sin, images, window_mask_rnn)
        x, _ = blocks(cfg, name="blocks", attention=self.attention, **kw)(x, ctx, full_l)
        return PatchMerger(cfg, name="merger", **kw)(x)


class PatchMerger(nn.Module):
    """HF `PatchMerger` / `Qwen2_5_VLPatchMerger` / `Qwen3VLVisionPatchMerger`: norm, group 2×2
    neighbours (4 consecutive rows), MLP to the LLM width. `postshuffle_norm` (Qwen3-VL's
    DeepStack mergers): the norm runs over the grouped 4·W features instead of each patch's W."""

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    postshuffle_norm: bool = False

    @nn.compact
    def __call__(self, x_rnw: Array) -> Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x_rnw, ROWS_W)
        if not self.postshuffle_norm:
            x = vit_norm(cfg, kw)("ln_q")(x)
        r, n, w = x.shape
        unit = cfg.merge_size**2
        x = _rows(x.reshape(r, n // unit, unit * w))
        if self.postshuffle_norm:
            x = vit_norm(cfg, kw)("ln_q")(x)
        x = nn.Dense(unit * w, name="mlp_0", **kw, kernel_init=layers.dense_init(("vit_mlp", "vit_mlp2")),
                     bias_init=layers.zeros_init(("vit_mlp2",)))(x)
        x = _rows(jax.nn.gelu(x, approximate=False))
        x = nn.Dense(cfg.out_width, name="mlp_2", **kw, kernel_init=layers.dense_init(("vit_mlp2", "embed")),
                     bias_init=layers.zeros_init(("embed",)))(x)
        return _rows(x, "act_embed")
