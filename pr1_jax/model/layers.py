"""Building blocks shared by the vision tower and the decoder.

Shape letters: B batch rows, G samples per row (1 outside grouped decoding), T query
tokens, S self keys, P shared-prefix keys, D width, H query heads, K kv heads,
R = H/K heads per kv head, Dh head dim.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
`pr1_jax.sharding` maps them to mesh axes. Model code never names a mesh axis.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# Large negative instead of -inf: a fully-masked query row (a left-pad position) then
# gets a uniform distribution instead of NaN, and its output is never used.
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_init(axes: tuple[str | None, ...], std: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def ones_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones, axes)


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²)+eps) in float32, cast back, times `scale` (HF Qwen2RMSNorm)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", ones_init((self.axis_name,)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, statistics in float32 (HF nn.LayerNorm, eps 1e-6)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "vit_norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", ones_init((self.axis_name,)), (d,), self.param_dtype)
        bias = self.param("bias", zeros_init((self.axis_name,)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE in float32. x [..., T, heads, Dh]; cos/sin [..., T, Dh]."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")


def cudnn_attention_fits(q: Array, num_keys: int) -> bool:
    """Whether `flash_attention` can run: an NVIDIA GPU, 16-bit q, head dim a multiple of 8 up
    to 256, and (with the mask as a bias) even query and key lengths."""
    t, dh = q.shape[2], q.shape[-1]
    return (jax.default_backend() == "gpu" and "NVIDIA" in jax.devices()[0].device_kind
            and q.dtype in (jnp.bfloat16, jnp.float16) and dh % 8 == 0 and dh <= 256
            and t % 2 == 0 and num_keys % 2 == 0)


def attention(q: Array, k: Array, v: Array, mask: Array,
              prefix: tuple[Array, Array, Array] | None = None, impl: str = "xla") -> Array:
    """Softmax attention of grouped queries over their own keys and an optional shared prefix.

    q: [B, G, T, H, Dh]; k, v: [B, G, S, K, Dh]; mask: [B, G, T, S] bool (True = attend).
    prefix: (k_p [B, P, K, Dh], v_p [B, P, K, Dh], mask_p [B, P] bool) — keys shared by
      the G rows of a group (the prompt's KV cache), read once instead of G times.
    impl: "xla" (einsums, scores materialized), "cudnn" (`flash_attention`, NVIDIA GPUs),
    "splash" (Pallas splash attention, TPU: `tpu_attention.splash_attention`; interpreted off
    TPU) or "auto" (cudnn where `cudnn_attention_fits`, splash on a TPU backend, else xla).
    Scores and softmax in float32. Returns [B, G, T, H, Dh] in q's dtype.
    """
    if impl == "auto":
        impl = "cudnn" if cudnn_attention_fits(q, k.shape[2] + (0 if prefix is None else prefix[0].shape[1])) else (
            "splash" if jax.default_backend() == "tpu" else "xla")
    if impl == "cudnn":
        return flash_attention(q, k, v, mask, prefix)
    if impl == "splash":
        from pr1_jax.model.tpu_attention import splash_attention  # Pallas TPU ops: imported on use

        return splash_attention(q, k, v, mask, prefix)
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r} (one of {ATTENTION_IMPLS})")
    b, g, t, h, dh = q.shape
    kv = k.shape[-2]
    q = q.reshape(b, g, t, kv, h // kv, dh) * jnp.asarray(dh**-0.5, q.dtype)
    s_self = jnp.einsum("bgtkrd,bgskd->bgkrts", q, k, preferred_element_type=jnp.float32)
    s_self = jnp.where(mask[:, :, None, None], s_self, NEG_INF)
    if prefix is None:
        probs = jax.nn.softmax(s_self, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgkrts,bgskd->bgtkrd", probs, v)
        return out.reshape(b, g, t, h, dh)
    k_p, v_p, mask_p = prefix
    s_pre = jnp.einsum("bgtkrd,bpkd->bgkrtp", q, k_p, preferred_element_type=jnp.float32)
    s_pre = jnp.where(mask_p[:, None, None, None, None, :], s_pre, NEG_INF)
    probs = jax.nn.softmax(jnp.concatenate([s_pre, s_self], axis=-1), axis=-1).astype(v.dtype)
    p_pre, p_self = probs[..., : k_p.shape[1]], probs[..., k_p.shape[1]:]
    out = (jnp.einsum("bgkrtp,bpkd->bgtkrd", p_pre, v_p)
           + jnp.einsum("bgkrts,bgskd->bgtkrd", p_self, v))
    return out.reshape(b, g, t, h, dh)


def prefix_attention(q: Array, k: Array, v: Array, lengths: Array, impl: str = "xla") -> Array:
    """Bidirectional attention of each row's first `lengths` tokens among themselves.

    q, k, v: [B, L, H, Dh]; lengths: [B] int32 (0 allowed: that row's output is undefined).
    "cudnn" passes the lengths as cuDNN's sequence lengths, so the kernel does no work past
    them (a mask as a bias costs the whole L×L); the other implementations mask.
    Returns [B, L, H, Dh] (positions past a row's length: undefined, never read).
    """
    if impl == "auto":
        impl = "cudnn" if cudnn_attention_fits(q[:, None], k.shape[1]) else (
            "splash" if jax.default_backend() == "tpu" else "xla")
    if impl == "cudnn":
        n = jnp.maximum(lengths, 1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=n, key_value_seq_lengths=n,
                                            implementation="cudnn")
    pos = jnp.arange(k.shape[1])
    valid = pos[None, :] < lengths[:, None]  # [B, L]
    mask = (valid[:, :, None] & valid[:, None, :]) | (pos[:, None] == pos[None, :])  # a pad sees itself
    return attention(q[:, None], k[:, None], v[:, None], mask[:, None], impl=impl)[:, 0]


def prefix_as_own_keys(k: Array, v: Array, mask: Array,
                       prefix: tuple[Array, Array, Array] | None) -> tuple[Array, Array, Array]:
    """A shared prefix broadcast to the G rows and put before their own keys, for the fused
    kernels that take one key axis (cuDNN, splash): k, v [B, G, P+S, K, Dh], mask [B, G, T, P+S].
    Without a prefix, the inputs unchanged."""
    if prefix is None:
        return k, v, mask
    k_p, v_p, mask_p = prefix
    b, g, t = mask.shape[:3]
    rows = lambda a: jnp.broadcast_to(a[:, None], (b, g) + a.shape[1:])  # noqa: E731
    k, v = jnp.concatenate([rows(k_p), k], axis=2), jnp.concatenate([rows(v_p), v], axis=2)
    return k, v, jnp.concatenate([jnp.broadcast_to(mask_p[:, None, None, :], (b, g, t, mask_p.shape[-1])), mask], -1)


def flash_attention(q: Array, k: Array, v: Array, mask: Array,
                    prefix: tuple[Array, Array, Array] | None = None) -> Array:
    """`attention` as one cuDNN flash-attention call (forward and backward; NVIDIA GPUs).

    The scores never reach memory: the [.., T, S] float32 scores, masks and softmax of the
    einsum path are most of a training step's non-matmul time. The (B, G) rows become one
    batch axis; a shared prefix is broadcast to the G rows and put before the own keys (its
    gradient sums over them), and the mask goes in as cuDNN's additive bias [B·G, 1, T, P+S].
    cuDNN computes the softmax in float32 and casts the probabilities to v's dtype for the PV
    product like the einsum path; with a bias it needs T and P+S even ("auto" falls back to the
    einsum path otherwise, see `cudnn_attention_fits`).
    """
    b, g, t, h, dh = q.shape
    k, v, mask = prefix_as_own_keys(k, v, mask, prefix)
    s, kv = k.shape[2], k.shape[3]
    out = jax.nn.dot_product_attention(
        q.reshape(b * g, t, h, dh), k.reshape(b * g, s, kv, dh), v.reshape(b * g, s, kv, dh),
        mask=mask.reshape(b * g, 1, t, s), implementation="cudnn")
    return out.reshape(b, g, t, h, dh)


def cached_attention(q: Array, k: Array, v: Array, mask: Array,
                     prefix: tuple[Array, Array, Array] | None = None) -> Array:
    """`attention` for decoding, with the caches in the layouts the matmuls read in place.

    q: [B, G, T, H, Dh]; k, v: [B, G, K, S, Dh] (own cache); mask: [B, G, T, S] bool.
    prefix: (k_p [B, K, P, Dh], v_p [B, K, P, Dh], mask_p [B, P] bool), the group's shared keys.
    With the batch dims (b, g, k / b, k) major and Dh or S minor, every einsum is a plain
    batched matmul of the caches as stored: no per-step transpose of cache-sized arrays (the
    [.., S, K, Dh] layout of `attention` costs one per cache per layer per token).
    Two-part softmax (no concatenated scores): joint max, exp and sum of each part, and the
    division by the total applied once to the summed outputs (float32) rather than to both
    probability tensors: fewer kernels per step. Scores in float32; exp(s − max) ∈ [0, 1] is
    cast to v's dtype for the matmul, like the probabilities of `attention`.
    Returns [B, G, T, H, Dh] in q's dtype.
    """
    b, g, t, h, dh = q.shape
    kv = k.shape[2]
    q = q.reshape(b, g, t, kv, h // kv, dh) * jnp.asarray(dh**-0.5, q.dtype)
    f32 = jnp.float32
    s_self = jnp.einsum("bgtkrd,bgksd->bgktrs", q, k, preferred_element_type=f32)
    s_self = jnp.where(mask[:, :, None, :, None, :], s_self, NEG_INF)
    m = jnp.max(s_self, axis=-1)  # [B, G, K, T, R]
    if prefix is not None:
        k_p, v_p, mask_p = prefix
        s_pre = jnp.einsum("bgtkrd,bkpd->bkgtrp", q, k_p, preferred_element_type=f32)
        s_pre = jnp.where(mask_p[:, None, None, None, None, :], s_pre, NEG_INF)
        m = jnp.maximum(jnp.swapaxes(jnp.max(s_pre, axis=-1), 1, 2), m)
    e_self = jnp.exp(s_self - m[..., None])
    total = jnp.sum(e_self, axis=-1)
    out = jnp.einsum("bgktrs,bgksd->bgktrd", e_self.astype(v.dtype), v, preferred_element_type=f32)
    if prefix is not None:
        e_pre = jnp.exp(s_pre - jnp.swapaxes(m, 1, 2)[..., None])  # [B, K, G, T, R, P]
        total = total + jnp.swapaxes(jnp.sum(e_pre, axis=-1), 1, 2)
        out = out + jnp.swapaxes(
            jnp.einsum("bkgtrp,bkpd->bkgtrd", e_pre.astype(v_p.dtype), v_p, preferred_element_type=f32), 1, 2)
    out = (out / total[..., None]).astype(q.dtype)  # [B, G, K, T, R, Dh]
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(b, g, t, h, dh)


@jax.custom_vjp
def move_rows(x_rn: Array, at_rm: Array, valid_rm: Array, back_rn: Array, has_rn: Array) -> Array:
    """out[r, m] = x[r, at[r, m]] where valid[r, m], else 0: [R, N, ...] → [R, M, ...].

    For moves between two layouts of the same tokens (each image's patches out of a packed
    row and back, `vision.per_image`; a block's prompts packed and unpacked,
    `decoder.group_attention`): (at, valid) and (back, has) must map the valid entries one to
    one, and the entries of x that no valid entry reads must get a zero gradient (padding
    that nothing downstream reads). Then the gradient is the same gather the other way: no
    scatter-add, which (autodiff's transpose of a gather) took ~100 ms of a 0.83 s grounding
    update on an H200 for the vision tower's moves alone.
    """
    y = jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x_rn, at_rm)
    return jnp.where(valid_rm.reshape(valid_rm.shape + (1,) * (x_rn.ndim - 2)), y, jnp.zeros((), y.dtype))


def _move_rows_fwd(x, at, valid, back, has):
    return move_rows(x, at, valid, back, has), (at, valid, back, has)


def _move_rows_bwd(res, g):
    at, valid, back, has = res
    return move_rows(g, back, has, at, valid), None, None, None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)
