"""Fused decode attention (one token per row) as one Pallas kernel per layer (issue #3).

`fused_cached_attention(q, k, v, mask, prefix)` computes `layers.cached_attention` for T = 1
with a single `pl.pallas_call` (on GPU the Triton lowering) instead of ~10 XLA kernels.

Grid (B, K, G): each program owns the R = H/K query heads of one (row, sample, kv head),
padded to `block_h` ≥ 16 rows for the tensor-core dot. It streams the shared prefix
k_p, v_p [B, K, P, Dh] and then its own cache k, v [B, G, K, S, Dh] in blocks of `block_k`
keys, with an online softmax (running max, sum and output in float32), and writes
out / sum in q's dtype. Like `cached_attention`: q is scaled by Dh^-0.5 in q's dtype, the
scores are float32, and exp(s − max) ∈ [0, 1] is cast to v's dtype for the PV dot.

Blocks never read out of bounds: the last block of a length-L array starts at L − block_k
(clamped) and masks the keys an earlier block already covered, so lengths need not be block
multiples (P = 318 with blocks of 64). Only blocks that can hold valid keys are visited:
the prefix from the block of its first valid key (left padding), the own cache up to the
last valid key (in decoding, slot t). The masks are general (any bool masks); the loop
bounds and int32 masks are computed outside the kernel from the masks shared by all
layers, so XLA computes them once per step.

A query row with no valid key at all gets 0 (`cached_attention` would average all of v);
decoding never has one (the own key at slot t is always valid).
`interpret=True` runs the kernel with the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pr1_jax.model import layers

Array = jax.Array
_NEG = -1e30  # running-max init: finite, so exp(m_prev − m_next) never sees inf − inf


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block(length: int, block_k: int) -> int:
    """Largest power of two ≤ min(length, block_k) (length ≥ 16 after padding)."""
    return min(block_k, 1 << (length.bit_length() - 1))


def _kernel(*refs, has_prefix: bool, rows: int, block_h: int, bk_self: int, bk_pre: int):
    if has_prefix:
        (q_ref, k_ref, v_ref, mask_ref, hi_ref, kp_ref, vp_ref, mp_ref, lo_ref, o_ref) = refs
    else:
        (q_ref, k_ref, v_ref, mask_ref, hi_ref, o_ref) = refs
    dh = q_ref.shape[-1]
    row_ok = jnp.arange(block_h) < rows
    q = plgpu.load(q_ref.at[pl.ds(0, block_h), :], mask=row_ok[:, None], other=0)
    q = q * jnp.asarray(dh**-0.5, q.dtype)  # in q's dtype, as cached_attention

    def attend(k_blk, v_blk, m_blk, ok_after, start, carry):
        """One block of keys: k_blk/v_blk [bk, Dh], m_blk [bk] int32 mask; keys < ok_after are done."""
        o, m, l = carry
        idx = start + jnp.arange(k_blk.shape[0])
        valid = ((m_blk != 0) & (idx >= ok_after))[None, :]
        s = plgpu.dot(q, k_blk, trans_b=True).astype(jnp.float32)  # [block_h, bk]
        s = jnp.where(valid, s, _NEG)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(valid, jnp.exp(s - m_next[:, None]), 0.0)
        corr = jnp.exp(m - m_next)
        o = o * corr[:, None] + plgpu.dot(p.astype(v_blk.dtype), v_blk).astype(jnp.float32)
        return o, m_next, l * corr + jnp.sum(p, axis=1)

    def loop(k_r, v_r, m_r, bk, lo, hi, carry):
        length = k_r.shape[0]

        def body(i, carry):
            start = jnp.minimum(i * bk, length - bk)
            sl = pl.ds(start, bk)
            return attend(k_r[sl, :], v_r[sl, :], m_r[sl], i * bk, start, carry)

        return jax.lax.fori_loop(lo, hi, body, carry)

    carry = (jnp.zeros((block_h, dh), jnp.float32), jnp.full((block_h,), _NEG, jnp.float32),
             jnp.zeros((block_h,), jnp.float32))
    if has_prefix:
        p_len = kp_ref.shape[0]
        lo = jnp.minimum(lo_ref[()], p_len) // bk_pre  # first block with a valid prefix key
        carry = loop(kp_ref, vp_ref, mp_ref, bk_pre, lo, pl.cdiv(p_len, bk_pre), carry)
    carry = loop(k_ref, v_ref, mask_ref, bk_self, 0, pl.cdiv(hi_ref[()], bk_self), carry)
    o, _, l = carry
    o = jnp.where((l > 0)[:, None], o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    plgpu.store(o_ref.at[pl.ds(0, block_h), :], o.astype(o_ref.dtype), mask=row_ok[:, None])


def _pad_keys(x: Array, axis: int, minimum: int = 16) -> Array:
    """Pads a key axis shorter than `minimum` (tiny test shapes only: dots need ≥ 16 keys)."""
    if x.shape[axis] >= minimum:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, minimum - x.shape[axis])
    return jnp.pad(x, pad)


@functools.partial(jax.jit, static_argnames=("interpret", "block_k", "num_warps", "num_stages"))
def fused_cached_attention(q: Array, k: Array, v: Array, mask: Array,
                           prefix: tuple[Array, Array, Array] | None = None, *, interpret: bool = False,
                           block_k: int = 64, num_warps: int = 4, num_stages: int = 2) -> Array:
    """`layers.cached_attention` for T = 1 as one Pallas kernel (module docstring).

    q: [B, G, 1, H, Dh]; k, v: [B, G, K, S, Dh]; mask: [B, G, 1, S] bool;
    prefix: (k_p [B, K, P, Dh], v_p [B, K, P, Dh], mask_p [B, P] bool) or None.
    Returns [B, G, 1, H, Dh] in q's dtype. T > 1 falls back to `cached_attention`.
    """
    b, g, t, h, dh = q.shape
    if t != 1:
        return layers.cached_attention(q, k, v, mask, prefix)
    kv = k.shape[2]
    rows = h // kv
    block_h = max(16, _pow2_at_least(rows))
    qr = q.reshape(b, g, kv, rows, dh)  # free: [.., H, ..] = [.., K, R, ..]
    mask = _pad_keys(mask[:, :, 0].astype(jnp.int32), 2)  # [B, G, S']
    k, v = _pad_keys(k, 3), _pad_keys(v, 3)
    s = k.shape[3]
    hi = jnp.max(jnp.where(mask != 0, jnp.arange(s) + 1, 0), axis=-1).astype(jnp.int32)  # [B, G]
    bk_self = _block(s, block_k)
    args = [qr, k, v, mask, hi]
    specs = [pl.BlockSpec((None, None, None, block_h, dh), lambda i, j, n: (i, n, j, 0, 0)),
             pl.BlockSpec((None, None, None, s, dh), lambda i, j, n: (i, n, j, 0, 0)),
             pl.BlockSpec((None, None, None, s, dh), lambda i, j, n: (i, n, j, 0, 0)),
             pl.BlockSpec((None, None, s), lambda i, j, n: (i, n, 0)),
             pl.BlockSpec((None, None), lambda i, j, n: (i, n))]
    bk_pre = 0
    if prefix is not None:
        k_p, v_p, mask_p = prefix
        mask_p = _pad_keys(mask_p.astype(jnp.int32), 1)  # [B, P']
        k_p, v_p = _pad_keys(k_p, 2), _pad_keys(v_p, 2)
        p_len = k_p.shape[2]
        lo = jnp.min(jnp.where(mask_p != 0, jnp.arange(p_len), p_len), axis=-1).astype(jnp.int32)  # [B]
        bk_pre = _block(p_len, block_k)
        args += [k_p, v_p, mask_p, lo]
        specs += [pl.BlockSpec((None, None, p_len, dh), lambda i, j, n: (i, j, 0, 0)),
                  pl.BlockSpec((None, None, p_len, dh), lambda i, j, n: (i, j, 0, 0)),
                  pl.BlockSpec((None, p_len), lambda i, j, n: (i, 0)),
                  pl.BlockSpec((None,), lambda i, j, n: (i,))]
    kernel = functools.partial(_kernel, has_prefix=prefix is not None, rows=rows, block_h=block_h,
                               bk_self=bk_self, bk_pre=bk_pre)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel, grid=(b, kv, g), in_specs=specs,
        out_specs=pl.BlockSpec((None, None, None, block_h, dh), lambda i, j, n: (i, n, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        compiler_params=compiler_params, interpret=interpret, name="fused_decode_attention",
    )(*args)
    return out.reshape(b, g, 1, h, dh)
