"""The Qwen2 decoder with M-RoPE (HF `Qwen2VLTextModel`, `model.layers.*` in checkpoints), and
the Qwen3 decoder of Qwen3-VL (HF `Qwen3VLTextModel`): the same layer without q/k/v biases,
with an RMSNorm on every query and key head (`TextConfig.qk_norm`), interleaved M-RoPE, and
DeepStack — visual features added to the hidden states at the image positions after each
of the first S layers (`DecoderContext.deepstack`).

One layer definition serves every way the model is run, through the K/V it is given:
  * full forward (training, scoring, parity): x [B, 1, T, D], no cache;
  * prefill: the same, returning each layer's K/V of the chunk (the prompt cache);
  * grouped decoding: x [B, G, T, D] — G samples of one prompt — attending to the
    prompt's K/V *shared* by the group (read once, never copied G times) plus their own
    cache [B, G, K, S, Dh] into which this chunk's K/V are written at `cache_index`;
  * a packed group (training, scoring): x [K, 1, Bs·P + R·T, D], each row a block of Bs
    prompts followed by their completions in R rows of T (`DecoderContext.prompt_len` > 0;
    Bs = 1: a prompt and its own rows). Every weight matmul, norm and MLP runs once over all
    of a row's tokens; only attention splits the row (`group_attention`): a prompt attends
    causally to itself, each completion to its prompt's K/V of the same layer plus its own
    tokens. (Two passes — prompt, then completions over its K/V — made
    XLA, with the layer scan unrolled, concatenate both passes' activations into one matmul
    per weight: a copy of every [tokens, 8960] MLP activation, 27–30 ms of a 0.62 s update
    step at the 2B size.)
    With a cache the prefix is laid out [B, K, P, Dh] (without, [B, P, K, Dh] as returned
    by prefill): the layouts `layers.cached_attention` reads without transposing them.
Layers are scanned (`nn.scan`, parameters stacked on a leading "layers" axis), which
keeps compile time flat in depth; `remat=True` recomputes each layer in the backward pass.

Shape letters as in layers.py; L layers, V vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pr1_jax.model import layers
from pr1_jax.model.decode_attention import fused_cached_attention, fused_decode_step
from pr1_jax.model.tpu_decode_attention import tpu_cached_attention
from pr1_jax.model.config import TextConfig

Array = jax.Array
KV = tuple[Array, Array]
# x [B, G, T, D] inside a layer: rows over the batch axes, the width unsharded ("act_embed" is in
# no rule table; "embed", the weights' width, is FSDP-sharded): matmuls then gather weights.
ACT = ("batch", None, "length", "act_embed")


def mrope_axes(cfg: TextConfig) -> np.ndarray:
    """Which position axis (0 t, 1 h, 2 w) rotates each of the Dh/2 frequencies: [Dh/2], static.

    Qwen2-VL: contiguous `mrope_section` blocks (i < s0 → t, i < s0+s1 → h, else w).
    Qwen3-VL (interleaved, HF `Qwen3VLTextRotaryEmbedding`): frequency i is h when
    i % 3 == 1 and i < 3·s1, w when i % 3 == 2 and i < 3·s2, else t — so every axis
    gets high and low frequencies ([24, 20, 20]: t h w t h w … t h w t t t t).
    """
    if not cfg.mrope_interleaved:
        return np.repeat(np.arange(3), cfg.mrope_section)
    i = np.arange(cfg.head_dim // 2)
    _, s_h, s_w = cfg.mrope_section
    return np.where((i % 3 == 1) & (i < 3 * s_h), 1, np.where((i % 3 == 2) & (i < 3 * s_w), 2, 0))


def mrope(pos_3bgt: Array, cfg: TextConfig) -> tuple[Array, Array]:
    """Multimodal RoPE tables (HF `Qwen2VLRotaryEmbedding` + `apply_multimodal_rotary_pos_emb`).

    Each token has (t, h, w) positions. Frequency i (of Dh/2) rotates by the axis
    `mrope_axes` names; duplicated halves.
    pos_3bgt [3, B, G, T] int → cos, sin [B, G, T, Dh] float32.
    """
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    axis_of_freq = mrope_axes(cfg)  # [Dh/2], static
    pos = jnp.take(pos_3bgt.astype(jnp.float32), axis_of_freq, axis=0)  # [Dh/2, B, G, T]
    angles = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


@flax.struct.dataclass
class DecoderContext:
    """What every layer needs besides x, broadcast over layers."""

    cos: Array  # [B, G, T, Dh] float32 M-RoPE tables
    sin: Array  # [B, G, T, Dh]
    mask: Array  # [B, G, T, S] bool: the self keys (own chunk or own cache) each query sees
    prefix_mask: Array | None = None  # [B, P] bool: valid keys of the shared prefix
    cache_index: Array | None = None  # [] int32: offset of this chunk in the self cache
    # (decoding with the XLA attention: `mask` may cover only the cache's first S slots, the
    # window that holds every written key; the attention then reads only those)
    # A packed group (module docstring): mask is then the completions' own [B, G, Tc, Tc],
    # prefix_mask the prompt's valid keys, prompt_mask the prompt's causal [B, 1, P, P].
    prompt_mask: Array | None = None
    prompt_len: int = flax.struct.field(pytree_node=False, default=0)  # P; 0: not packed
    num_samples: int = flax.struct.field(pytree_node=False, default=1)  # G (a packed group: rows R per block)
    # A packed group of blocks (`Qwen2VL.decode_group`): Bs prompts per row, and the prompt of
    # each completion row inside its block, row_group [K, R] (None when Bs = 1).
    prompts_per_block: int = flax.struct.field(pytree_node=False, default=1)
    row_group: Array | None = None
    # The block's prompts packed into its first `packed_prompt_len` positions (0: Bs rows of P,
    # left-padded): `prompt_moves` = (pack [K, Pq], pack_valid, unpack [K, Bs·P], unpack_valid),
    # the `layers.move_rows` maps between the packed and the padded layout (`Qwen2VL.decode_group`).
    packed_prompt_len: int = flax.struct.field(pytree_node=False, default=0)
    prompt_moves: tuple[Array, Array, Array, Array] | None = None
    # Qwen3-VL DeepStack: [S, B, G, T, D] added to x after layer s < S (zero off image tokens);
    # None: no DeepStack (Qwen2-VL, decode steps).
    deepstack: Array | None = None


def group_attention(q: Array, k: Array, v: Array, ctx: DecoderContext, impl: str) -> Array:
    """Attention of packed group rows: q [K, 1, Bs·P + R·T, H, Dh], k/v [.., K, Dh] → like q.

    Each of a row's Bs prompts (P tokens) attends causally to itself (ctx.prompt_mask); each
    of its R completion rows of T tokens attends to its prompt's keys (ctx.prefix_mask, the
    prefix of `layers.attention`: shared by the R rows when Bs = 1, else the prompt of
    ctx.row_group) and to its own completion's tokens (ctx.mask). With the prompts packed
    (ctx.packed_prompt_len = Pq: the row is [Pq + R·T]) their q, k, v are moved into the padded
    layout for attention, and the prompts' output back: every matmul sees only real tokens.
    """
    nk, p, bs, r = q.shape[0], ctx.prompt_len, ctx.prompts_per_block, ctx.num_samples
    head = ctx.packed_prompt_len or bs * p  # the row's prompt positions
    if ctx.packed_prompt_len:
        pack, pack_valid, unpack, unpack_valid = ctx.prompt_moves
        padded = lambda a: layers.move_rows(a, unpack, unpack_valid, pack, pack_valid)  # noqa: E731
    else:
        padded = lambda a: a  # noqa: E731

    def split(a: Array) -> tuple[Array, Array]:
        return (padded(a[:, 0, :head]).reshape(nk * bs, 1, p, *a.shape[3:]),
                a[:, 0, head:].reshape(nk, r, -1, *a.shape[3:]))

    (q_p, q_c), (k_p, k_c), (v_p, v_c) = split(q), split(k), split(v)
    out_p = layers.attention(q_p, k_p, v_p, ctx.prompt_mask, None, impl=impl)
    if bs == 1:
        out_c = layers.attention(q_c, k_c, v_c, ctx.mask, (k_p[:, 0], v_p[:, 0], ctx.prefix_mask), impl=impl)
    else:  # every row its own group: its prompt's keys gathered from the block
        t = q_c.shape[2]

        def of_row(a: Array) -> Array:  # [B, ...] → [K·R, ...]: the row's prompt's
            blocks = a.reshape(nk, bs, *a.shape[1:])
            return jax.vmap(lambda x, i: x[i])(blocks, ctx.row_group).reshape(nk * r, *a.shape[1:])

        one = lambda a: a.reshape(nk * r, 1, *a.shape[2:])  # noqa: E731  rows as groups of one
        prefix = (of_row(k_p[:, 0]), of_row(v_p[:, 0]), of_row(ctx.prefix_mask))
        out_c = layers.attention(one(q_c), one(k_c), one(v_c), one(ctx.mask), prefix, impl=impl)
        out_c = out_c.reshape(nk, r, t, *out_c.shape[3:])
    out_p = out_p.reshape(nk, bs * p, *out_p.shape[3:])
    if ctx.packed_prompt_len:
        out_p = layers.move_rows(out_p, pack, pack_valid, unpack, unpack_valid)
    return jnp.concatenate([out_p[:, None], out_c.reshape(nk, 1, -1, *out_c.shape[3:])], axis=2)


class DecoderLayer(nn.Module):
    """HF `Qwen2VLDecoderLayer`: RMSNorm → GQA attention → residual; RMSNorm → SwiGLU → residual."""

    cfg: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    return_kv: bool = False
    # Decoding reads q/k/v and gate/up weights as one matrix each (see fuse_layer_params).
    fused: bool = False
    # Attention of one-token cached steps: "xla" (layers.cached_attention) or "pallas" (one
    # kernel, interpreted on CPU: with fused weights `decode_attention.fused_decode_step`, which
    # also applies RoPE and writes the caches; else `fused_cached_attention`), or "pallas_tpu"
    # (`tpu_decode_attention.tpu_cached_attention`: a TPU kernel, interpreted off TPU).
    decode_attention: str = "xla"
    decode_splits: int = 0  # "pallas": key splits per program (0: auto; decode_attention.py)
    attention: str = "xla"  # attention without a cache: layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x: Array, ctx: DecoderContext, cache: KV | None = None, prefix: KV | None = None,
                 layer: Array | None = None):
        """layer: this layer's index (a scanned [] int32), given only with `ctx.deepstack`."""
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Activations: rows over the batch axes, width whole ("act_embed"; weights' "embed" is FSDP).
        h = nn.with_logical_constraint(layers.RMSNorm(cfg.rms_norm_eps, name="input_norm", **kw)(x), ACT)

        def proj(name: str, heads: int, axis: str) -> Array:  # HF self_attn.{q,k,v}_proj (bias: Qwen2)
            return nn.DenseGeneral((heads, cfg.head_dim), name=name, use_bias=cfg.attention_bias, **kw,
                                   kernel_init=layers.dense_init(("embed", axis, "head_dim")),
                                   bias_init=layers.zeros_init((axis, "head_dim")))(h)

        # Qwen3: HF self_attn.q_norm / k_norm, RMSNorm over Dh of every head, before RoPE.
        q_norm = lambda a: layers.RMSNorm(cfg.rms_norm_eps, name="q_norm", **kw)(a)  # noqa: E731
        k_norm = lambda a: layers.RMSNorm(cfg.rms_norm_eps, name="k_norm", **kw)(a)  # noqa: E731
        pre = None if prefix is None else (prefix[0], prefix[1], ctx.prefix_mask)
        pallas = dict(interpret=jax.default_backend() == "cpu", num_splits=self.decode_splits)
        if self.fused:
            qkv = proj("qkv_proj", cfg.num_heads + 2 * cfg.num_kv_heads, "heads")  # [B, G, T, H + 2K, Dh]
            q, k, v = jnp.split(qkv, [cfg.num_heads, cfg.num_heads + cfg.num_kv_heads], axis=-2)
            if cfg.qk_norm:  # normalised in place, so the fused Pallas step still gets one qkv
                q, k = q_norm(q), k_norm(k)
                qkv = jnp.concatenate([q, k, v], axis=-2)
        else:
            q, k, v = (proj("q_proj", cfg.num_heads, "heads"), proj("k_proj", cfg.num_kv_heads, "kv_heads"),
                       proj("v_proj", cfg.num_kv_heads, "kv_heads"))
            if cfg.qk_norm:
                q, k = q_norm(q), k_norm(k)
        one_step = (self.fused and self.decode_attention == "pallas" and cache is not None and q.shape[2] == 1
                    and cache[0].shape[3] >= 16)
        if one_step:  # RoPE, cache writes and attention in one kernel
            out, k, v = fused_decode_step(qkv, ctx.cos, ctx.sin, cache[0], cache[1], ctx.cache_index, ctx.mask,
                                          pre, num_heads=cfg.num_heads, **pallas)
        else:
            q = layers.apply_rotary(q, ctx.cos, ctx.sin)  # [B, G, T, H, Dh]
            k = layers.apply_rotary(k, ctx.cos, ctx.sin)  # [B, G, T, K, Dh]
            if cache is not None:  # write this chunk into the own cache [B, G, K, S, Dh], attend over all of it
                idx = (0, 0, 0, ctx.cache_index, 0)
                put = lambda c, a: jax.lax.dynamic_update_slice(c, jnp.swapaxes(a, 2, 3).astype(c.dtype), idx)  # noqa: E731
                k, v = put(cache[0], k), put(cache[1], v)
                if self.decode_attention == "pallas" and q.shape[2] == 1:
                    out = fused_cached_attention(q, k, v, ctx.mask, pre, **pallas)
                elif self.decode_attention == "pallas_tpu" and q.shape[2] == 1:  # reads only the valid blocks
                    out = tpu_cached_attention(q, k, v, ctx.mask, pre)
                else:  # a mask shorter than the cache: attend over its window of the first slots only
                    window = ctx.mask.shape[-1]
                    out = layers.cached_attention(q, k[:, :, :, :window], v[:, :, :, :window], ctx.mask, pre)
            elif ctx.prompt_len:
                out = group_attention(q, k, v, ctx, self.attention)
            else:
                out = layers.attention(q, k, v, ctx.mask, pre, impl=self.attention)
        x = x + nn.DenseGeneral(cfg.width, axis=(-2, -1), use_bias=False, name="o_proj", **kw,
                                kernel_init=layers.dense_init(("heads", "head_dim", "embed")))(out)

        x = nn.with_logical_constraint(x, ACT)
        h = nn.with_logical_constraint(layers.RMSNorm(cfg.rms_norm_eps, name="post_attention_norm", **kw)(x), ACT)
        dense = lambda n, f, axes: nn.Dense(f, use_bias=False, name=n, **kw,  # noqa: E731
                                            kernel_init=layers.dense_init(axes))
        if self.fused:
            gate_up = nn.DenseGeneral((2, cfg.mlp_dim), use_bias=False, name="gate_up_proj", **kw,
                                      kernel_init=layers.dense_init(("embed", None, "mlp")))(h)
            h = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        else:
            h = (jax.nn.silu(dense("gate_proj", cfg.mlp_dim, ("embed", "mlp"))(h))
                 * dense("up_proj", cfg.mlp_dim, ("embed", "mlp"))(h))
        x = x + dense("down_proj", cfg.width, ("mlp", "embed"))(h)
        if ctx.deepstack is not None:  # HF Qwen3VLTextModel._deepstack_process after layers 0..S-1
            ds = ctx.deepstack
            x = jnp.where(layer < ds.shape[0], x + jnp.take(ds, jnp.minimum(layer, ds.shape[0] - 1), axis=0), x)
        x = nn.with_logical_constraint(x, ACT)
        new_kv = (k, v) if (cache is not None or self.return_kv) else None
        return x, new_kv


class Decoder(nn.Module):
    """Scanned decoder layers + final RMSNorm, without a cache (full forward, prefill, packed
    group rows; decoding runs the layers one by one: `decode_layer_by_layer`).
    embeds [B, G, T, D] → (hidden [B, G, T, D], the chunk's own K/V stacked
    [L, B, G, T, K, Dh] when `return_kv`, else None).
    """

    cfg: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_unroll: int = 1  # > 1 trades compile time for fewer per-layer overheads (decoding)
    remat_policy: Any = None  # jax.checkpoint policy: what remat keeps (None: nothing, recompute all)
    attention: str = "xla"  # full-forward attention (training, prefill): layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x: Array, ctx: DecoderContext, return_kv: bool = False) -> tuple[Array, KV | None]:
        layer = DecoderLayer
        if self.remat:
            layer = nn.remat(layer, prevent_cse=False, policy=self.remat_policy)
        # With DeepStack each layer also gets its index (scanned), to pick its feature plane.
        deepstack = ctx.deepstack is not None
        in_axes = (nn.broadcast, nn.broadcast, nn.broadcast, 0) if deepstack else (nn.broadcast,)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=in_axes, length=self.cfg.num_layers, unroll=self.scan_unroll,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        args = (ctx, None, None, jnp.arange(self.cfg.num_layers, dtype=jnp.int32)) if deepstack else (ctx,)
        x, new_kv = stack(self.cfg, self.dtype, self.param_dtype, return_kv, attention=self.attention,
                          name="layers")(x, *args)
        x = layers.RMSNorm(self.cfg.rms_norm_eps, name="norm", dtype=self.dtype,
                           param_dtype=self.param_dtype)(x)
        return x, new_kv


def unstack_layers(stacked: Any, num_layers: int) -> list[Any]:
    """[L, ...] scanned parameters (or K/V) → a list of L per-layer trees."""
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)]


def fuse_layer_params(p: dict) -> dict:
    """One layer's parameters with q/k/v and gate/up concatenated (`DecoderLayer(fused=True)`)."""
    p = dict(p)
    qkv = [p.pop(n) for n in ("q_proj", "k_proj", "v_proj")]
    p["qkv_proj"] = {k: jnp.concatenate([x[k] for x in qkv], axis=-2) for k in ("kernel", "bias") if k in qkv[0]}
    p["gate_up_proj"] = {"kernel": jnp.stack([p.pop("gate_proj")["kernel"], p.pop("up_proj")["kernel"]], axis=-2)}
    return p


def decode_layer_by_layer(cfg: TextConfig, layer_params: list[Any], norm_params: Any, x: Array,
                          ctx: DecoderContext, caches: list[KV], prefixes: list[KV],
                          dtype: Any = jnp.float32, decode_attention: str = "xla",
                          decode_splits: int = 0) -> tuple[Array, list[KV]]:
    """`Decoder` with a cache, unrolled over per-layer parameters and caches (for decoding).

    `layer_params` are per-layer, fused (`fuse_layer_params`) once before the decode loop:
    inside a loop, a scan over stacked [L, ...] weights makes XLA copy each layer's weights
    out of the stack at every step (a second full read and write of the model per token),
    while per-layer arrays are read in place and per-layer caches updated in place.
    """
    layer = DecoderLayer(cfg, dtype, dtype, fused=True, decode_attention=decode_attention,
                         decode_splits=decode_splits)
    new_caches = []
    for params, cache, prefix in zip(layer_params, caches, prefixes):
        x, kv = layer.apply({"params": params}, x, ctx, cache, prefix)
        new_caches.append(kv)
    x = layers.RMSNorm(cfg.rms_norm_eps, dtype=dtype, param_dtype=dtype).apply({"params": norm_params}, x)
    return x, new_caches
