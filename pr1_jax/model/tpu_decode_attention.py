"""Decode attention on TPU (one token per sample) as one Pallas TPU kernel per layer.

`tpu_cached_attention(q, k, v, mask, prefix)` computes `layers.cached_attention` for T = 1,
reading the caches in the layouts the sampler stores them: the group's shared prefix
k_p, v_p [B, K, P, Dh] and the samples' own caches k, v [B, G, K, S, Dh].

Grid (B, K, blocks): one program per (row, kv head) walks the prefix's key blocks, then the
own cache's, with an online softmax (running max, sum and output in float32 VMEM scratch).
Its queries are all G samples' R = H/K heads at once, [G·R, Dh]: a prefix block is read from
HBM once per group (as the einsums of `cached_attention` do), and an own-cache block
[G, bk, Dh] is one [G·R, G·bk] score matmul whose entries across samples are masked out —
G times the MXU work of per-sample dots, which decoding (bound by reading the caches) has to
spare, and only plain 2-D dots for Mosaic.

Only valid blocks are read. The first valid prefix block (left padding) and the number of
own blocks up to the last valid key (in decoding, slot t) are scalar-prefetched; each block
index map clamps the grid step into that range, and the TPU pipeline does not copy a block
whose index did not change, so steps outside the range neither read HBM nor compute
(`pl.when`). Within a block, the masks are applied entry by entry.

Numerics as `cached_attention`: q scaled by Dh^-0.5 in q's dtype, float32 scores,
exp(s − max) ∈ [0, 1] cast to v's dtype for the PV dot, one division by the sum at the end.
A query with no valid key gets 0 (decoding never has one: its own new key is valid).

Block sizes divide the lengths (no padding copies of a cache): the largest divisor of S (P)
up to `block_k` that is a multiple of 8, else the whole length as one block. Multi-device
meshes: inside shard_map (rows over data × fsdp, kv heads over tensor: `run_sharded`).
`interpret`: None picks Mosaic when lowered for TPU (also AOT from a CPU host) and the
Pallas interpreter elsewhere (CPU tests); True/False force one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pr1_jax.model import layers
from pr1_jax.model.tpu_attention import run_sharded

Array = jax.Array
_NEG = -1e30  # running-max init: finite, so exp(m_prev − m_next) never sees inf − inf


def key_block(length: int, block_k: int) -> int:
    """Largest divisor of `length` up to block_k that is a multiple of 8 (TPU sublanes), else
    `length` (one block)."""
    for d in range(min(block_k, length), 7, -1):
        if length % d == 0 and d % 8 == 0:
            return d
    return length


def _kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, mask_ref, *rest, has_prefix: bool, nb_pre: int, nb_self: int,
            group: int, rows: int, bk: int):
    """One (row b, kv head) program at grid step j: prefix blocks j < nb_pre, own blocks after.

    q_ref [G·R, Dh]; k_ref, v_ref [G, bk, Dh]; mask_ref [1, G·bk] int32 (sample-major);
    prefix: kp_ref, vp_ref [bk_p, Dh], mp_ref [1, bk_p] int32; o_ref [G·R, Dh];
    scratch m, l [G·R, 1] and acc [G·R, Dh], float32."""
    if has_prefix:
        kp_ref, vp_ref, mp_ref, o_ref, m_ref, l_ref, acc_ref = rest
    else:
        o_ref, m_ref, l_ref, acc_ref = rest
    b, j = pl.program_id(0), pl.program_id(2)
    f32 = jnp.float32

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, f32)
        l_ref[...] = jnp.zeros(l_ref.shape, f32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

    def update(keys: Array, values: Array, valid: Array):
        """Online-softmax step over one block of keys [n, Dh] with valid [G·R or 1, n]."""
        s = jax.lax.dot_general(q_ref[...], keys, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        s = jnp.where(valid, s, _NEG)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(valid, jnp.exp(s - m_next), 0.0)
        corr = jnp.exp(m_prev - m_next)
        l_ref[...] = l_ref[...] * corr + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * corr + jnp.dot(p.astype(values.dtype), values, preferred_element_type=f32)
        m_ref[...] = m_next

    if has_prefix:
        @pl.when((j >= lo_ref[b]) & (j < nb_pre))
        def _():
            update(kp_ref[...], vp_ref[...], mp_ref[...] != 0)

    @pl.when((j >= nb_pre) & (j - nb_pre < hi_ref[b]))
    def _():
        dh = k_ref.shape[-1]
        gr, cols = group * rows, group * bk
        row = jax.lax.broadcasted_iota(jnp.int32, (gr, cols), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (gr, cols), 1)
        same = jnp.zeros((gr, cols), jnp.bool_)
        for g in range(group):  # query row of sample g × key column of sample g (compares only)
            same |= (row >= g * rows) & (row < (g + 1) * rows) & (col >= g * bk) & (col < (g + 1) * bk)
        update(k_ref[...].reshape(cols, dh), v_ref[...].reshape(cols, dh), same & (mask_ref[...] != 0))

    @pl.when(j == nb_pre + nb_self - 1)
    def _():
        total = l_ref[...]
        out = jnp.where(total > 0, acc_ref[...] / jnp.where(total > 0, total, 1.0), 0.0)
        o_ref[...] = out.astype(o_ref.dtype)


def _decode_local(q: Array, k: Array, v: Array, mask: Array, prefix, *, interpret: bool | None,
                  block_k: int) -> Array:
    """`tpu_cached_attention` on one device's shard."""
    b, g, _, h, dh = q.shape
    kv, s = k.shape[2], k.shape[3]
    r = h // kv
    bk = key_block(s, block_k)
    nb_self = s // bk
    q = q * jnp.asarray(dh**-0.5, q.dtype)  # like cached_attention: scaled in q's dtype
    q = q.reshape(b, g, kv, r, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv, g * r, dh)  # [B, K, G·R, Dh]
    mask_i = mask[:, :, 0].astype(jnp.int32)  # [B, G, S]
    hi = jnp.max(jnp.where(mask_i != 0, jnp.arange(s) + 1, 0), axis=(1, 2))  # last valid key + 1, [B]
    hi = ((hi + bk - 1) // bk).astype(jnp.int32)  # own blocks to visit
    # Block j of all samples side by side, sample-major: [B, S/bk, 1, G·bk].
    mask_i = mask_i.reshape(b, g, nb_self, bk).transpose(0, 2, 1, 3).reshape(b, nb_self, 1, g * bk)
    nb_pre, lo = 0, jnp.zeros((b,), jnp.int32)
    pre_specs, pre_args = [], []
    if prefix is not None:
        k_p, v_p, mask_p = prefix
        p_len = k_p.shape[2]
        bk_p = key_block(p_len, block_k)
        nb_pre = p_len // bk_p
        first = jnp.min(jnp.where(mask_p, jnp.arange(p_len), p_len - 1), axis=-1)  # first valid key
        lo = (first // bk_p).astype(jnp.int32)
        pre = lambda j, lo_b: jnp.clip(j, lo_b, nb_pre - 1)  # noqa: E731
        pre_specs = [
            pl.BlockSpec((None, None, bk_p, dh), lambda i, n, j, lo, hi: (i, n, pre(j, lo[i]), 0)),
            pl.BlockSpec((None, None, bk_p, dh), lambda i, n, j, lo, hi: (i, n, pre(j, lo[i]), 0)),
            pl.BlockSpec((None, 1, bk_p), lambda i, n, j, lo, hi: (i, 0, pre(j, lo[i]))),
        ]
        pre_args = [k_p, v_p, mask_p.astype(jnp.int32)[:, None, :]]
    own = lambda j, hi_b: jnp.clip(j - nb_pre, 0, jnp.maximum(hi_b - 1, 0))  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, g * r, dh), lambda i, n, j, lo, hi: (i, n, 0, 0)),
        pl.BlockSpec((None, g, None, bk, dh), lambda i, n, j, lo, hi: (i, 0, n, own(j, hi[i]), 0)),
        pl.BlockSpec((None, g, None, bk, dh), lambda i, n, j, lo, hi: (i, 0, n, own(j, hi[i]), 0)),
        pl.BlockSpec((None, None, 1, g * bk), lambda i, n, j, lo, hi: (i, own(j, hi[i]), 0, 0)),
    ]
    args = [q, k, v, mask_i]
    in_specs, args = in_specs + pre_specs, args + pre_args
    kernel = functools.partial(_kernel, has_prefix=prefix is not None, nb_pre=nb_pre, nb_self=nb_self, group=g,
                               rows=r, bk=bk)
    f32 = jnp.float32
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, kv, nb_pre + nb_self), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, g * r, dh), lambda i, n, j, lo, hi: (i, n, 0, 0)),
        scratch_shapes=[pltpu.VMEM((g * r, 1), f32), pltpu.VMEM((g * r, 1), f32), pltpu.VMEM((g * r, dh), f32)])

    def call(interp: bool):
        return pl.pallas_call(
            kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((b, kv, g * r, dh), q.dtype),
            compiler_params=None if interp else pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interp, name="tpu_decode_attention")

    if interpret is None:  # Mosaic where lowered for TPU (also AOT from a CPU host), else interpreted
        out = jax.lax.platform_dependent(lo, hi, *args, tpu=call(False), default=call(True))
    else:
        out = call(interpret)(lo, hi, *args)
    return out.reshape(b, kv, g, r, dh).transpose(0, 2, 1, 3, 4).reshape(b, g, 1, h, dh)


def tpu_cached_attention(q: Array, k: Array, v: Array, mask: Array,
                         prefix: tuple[Array, Array, Array] | None = None, *, interpret: bool | None = None,
                         block_k: int = 512) -> Array:
    """`layers.cached_attention` for T = 1 as one Pallas TPU kernel (module docstring).

    q: [B, G, 1, H, Dh]; k, v: [B, G, K, S, Dh]; mask: [B, G, 1, S] bool;
    prefix: (k_p [B, K, P, Dh], v_p [B, K, P, Dh], mask_p [B, P] bool) or None.
    Returns [B, G, 1, H, Dh] in q's dtype. T > 1 falls back to `cached_attention`.
    """
    if q.shape[2] != 1:
        return layers.cached_attention(q, k, v, mask, prefix)
    local = functools.partial(_decode_local, interpret=interpret, block_k=block_k)
    heads = (q.shape[3], k.shape[2])
    if prefix is None:
        return run_sharded(lambda q, k, v, m: local(q, k, v, m, None), (q, k, v, mask), (0, 0, 0, 0),
                           (3, 2, 2, None), heads, (5, 0, 3))
    k_p, v_p, mask_p = prefix
    return run_sharded(lambda q, k, v, m, kp, vp, mp: local(q, k, v, m, (kp, vp, mp)),
                       (q, k, v, mask, k_p, v_p, mask_p), (0, 0, 0, 0, 0, 0, 0), (3, 2, 2, None, 1, 1, None),
                       heads, (5, 0, 3))
