"""Fused decode attention (one token per row) as one Pallas kernel per layer (issue #3).

`fused_cached_attention(q, k, v, mask, prefix)` computes `layers.cached_attention` for T = 1
with a single `pl.pallas_call` (on GPU the Triton lowering) instead of ~10 XLA kernels.
`fused_decode_step(qkv, cos, sin, k_cache, v_cache, slot, mask, prefix)` also takes over what
comes before it in a layer: RoPE on q and the new key, and the cache writes (in place).

Grid (B, K, G, splits): each program owns the R = H/K query heads of one (row, sample, kv
head), padded to `block_h` ≥ 16 rows for the tensor-core dot, and one of `num_splits` runs of
its key blocks (flash-decoding: 8 × 8 rows × 2 kv heads are 128 programs, fewer than the
H200's 132 SMs; three splits fill them; a small XLA fusion merges the partial softmaxes).
q is held as two halves of Dh (RoPE rotates one half against the other; a score is the
sum of the two halves' dots). It streams the shared prefix
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

On a device mesh (the model traced under `sharding.with_rules`, as `ShardedSampler` does)
GSPMD cannot partition the kernel, so the entry points run it under `jax.shard_map`: each
device takes its rows (the mesh axes of the "batch" rule, data × fsdp) and, where the
"kv_heads" rule's axes divide the K kv heads (tensor), its heads; the rest of the layer
stays GSPMD. Without a mesh (or on one device) the kernel is called as it is.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from pr1_jax.model import layers

Array = jax.Array
_NEG = -1e30  # running-max init: finite, so exp(m_prev − m_next) never sees inf − inf


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block(length: int, block_k: int) -> int:
    """Largest power of two ≤ min(length, block_k) (length ≥ 16 after padding)."""
    return min(block_k, 1 << (length.bit_length() - 1))


def _kernel(*refs, has_prefix: bool, step: bool, rows: int, block_h: int, bk_self: int, bk_pre: int,
            num_splits: int, num_heads: int, num_kv: int):
    """One (row, kv head, sample, split) program; `step`: q/k/v come unrotated from the fused
    projection, and the program applies RoPE, attends to the new key and writes it."""
    if step:
        (q_ref, cos_ref, sin_ref, k_ref, v_ref, mask_ref, hi_ref, slot_ref, *rest) = refs
    else:
        (q_ref, k_ref, v_ref, mask_ref, hi_ref, *rest) = refs
    if has_prefix:
        kp_ref, vp_ref, mp_ref, lo_ref, *out_refs = rest
    else:
        out_refs = rest
    dh = k_ref.shape[-1]
    half = dh // 2
    lo_half, hi_half = pl.ds(0, half), pl.ds(half, half)
    row_ok = jnp.arange(block_h) < rows
    scale = dh**-0.5
    # Queries as two halves of Dh (RoPE rotates half against half; the score dot is their sum).
    q_row0 = pl.program_id(1) * rows if step else 0  # step: this kv head's R heads in [H + 2K, Dh]
    load_q = lambda cols: plgpu.load(q_ref.at[pl.ds(q_row0, block_h), cols], mask=row_ok[:, None], other=0)  # noqa: E731
    q1, q2 = load_q(lo_half), load_q(hi_half)
    if step:  # layers.apply_rotary: float32 x·cos + rotate_half(x)·sin, cast back
        c1, c2, s1, s2 = cos_ref[lo_half], cos_ref[hi_half], sin_ref[lo_half], sin_ref[hi_half]

        def rope(x1, x2, dtype):
            x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
            return (x1 * c1 - x2 * s1).astype(dtype), (x2 * c2 + x1 * s2).astype(dtype)

        q1, q2 = rope(q1, q2, q1.dtype)
        kv_row = num_heads + pl.program_id(1)
        k_new1, k_new2 = rope(q_ref[kv_row, lo_half], q_ref[kv_row, hi_half], k_ref.dtype)
        v_new = q_ref[kv_row + num_kv, :].astype(v_ref.dtype)
    q1, q2 = q1 * jnp.asarray(scale, q1.dtype), q2 * jnp.asarray(scale, q2.dtype)  # in q's dtype

    def online(o, m, l, s, valid, pv):
        """Online-softmax update with scores s [block_h, n] and pv(p) = p @ values."""
        s = jnp.where(valid, s, _NEG)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(valid, jnp.exp(s - m_next[:, None]), 0.0)
        corr = jnp.exp(m - m_next)
        return o * corr[:, None] + pv(p), m_next, l * corr + jnp.sum(p, axis=1)

    def loop(k_r, v_r, m_r, bk, lo, hi, carry, skip=None):
        """Blocks lo..hi-1 of keys; keys before a block's nominal start (clamped blocks) and at
        `skip` (the slot being written this step) are left out."""
        length = k_r.shape[0]

        def body(i, carry):
            start = jnp.minimum(i * bk, length - bk)
            sl = pl.ds(start, bk)
            idx = start + jnp.arange(bk)
            valid = (m_r[sl] != 0) & (idx >= i * bk)
            if skip is not None:
                valid &= idx != skip
            s = (plgpu.dot(q1, k_r[sl, lo_half], trans_b=True).astype(jnp.float32)
                 + plgpu.dot(q2, k_r[sl, hi_half], trans_b=True).astype(jnp.float32))  # [block_h, bk]
            v_blk = v_r[sl, :]
            return online(*carry, s, valid[None, :],
                          lambda p: plgpu.dot(p.astype(v_blk.dtype), v_blk).astype(jnp.float32))

        return jax.lax.fori_loop(lo, hi, body, carry)

    carry = (jnp.zeros((block_h, dh), jnp.float32), jnp.full((block_h,), _NEG, jnp.float32),
             jnp.zeros((block_h,), jnp.float32))
    # The blocks to visit, prefix first then own cache, numbered 0..n-1; split j takes the
    # j-th of num_splits equal runs of them (flash-decoding: more programs than SMs).
    pre_lo = pre_n = 0
    if has_prefix:
        p_len = kp_ref.shape[0]
        pre_lo = jnp.minimum(lo_ref[()], p_len) // bk_pre  # first block with a valid prefix key
        pre_n = pl.cdiv(p_len, bk_pre) - pre_lo
    self_n = pl.cdiv(hi_ref[()], bk_self)  # blocks up to the last valid own key
    per_split = pl.cdiv(pre_n + self_n, num_splits)
    first = pl.program_id(3) * per_split
    end = first + per_split
    if has_prefix:
        carry = loop(kp_ref, vp_ref, mp_ref, bk_pre, pre_lo + jnp.minimum(first, pre_n),
                     pre_lo + jnp.minimum(end, pre_n), carry)
    slot = slot_ref[()] if step else None
    carry = loop(k_ref, v_ref, mask_ref, bk_self, jnp.clip(first - pre_n, 0, self_n),
                 jnp.clip(end - pre_n, 0, self_n), carry, skip=slot)
    if step:  # the new key (not yet in the cache as read): split 0 attends to it and writes it
        is_first = pl.program_id(3) == 0
        s_new = jnp.sum(q1.astype(jnp.float32) * k_new1.astype(jnp.float32)[None, :]
                        + q2.astype(jnp.float32) * k_new2.astype(jnp.float32)[None, :], axis=1)
        carry = online(*carry, s_new[:, None], jnp.full((1, 1), is_first),
                       lambda p: p.astype(v_new.dtype).astype(jnp.float32) * v_new.astype(jnp.float32)[None, :])
        k_out, v_out = out_refs[-2:]
        out_refs = out_refs[:-2]

        @pl.when(is_first)
        def _():
            k_out[slot, lo_half] = k_new1
            k_out[slot, hi_half] = k_new2
            v_out[slot, :] = v_new

    o, m, l = carry
    if num_splits == 1:
        o = jnp.where((l > 0)[:, None], o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
        plgpu.store(out_refs[0].at[pl.ds(0, block_h), :], o.astype(out_refs[0].dtype), mask=row_ok[:, None])
    else:  # unnormalized partial output, running max and sum: combined by `_combine`
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def _combine(o_part: Array, m_part: Array, l_part: Array, rows: int, dtype) -> Array:
    """Split partials [B, G, K, NS, block_h(, Dh)] → [B, G, K, R, Dh] (one XLA fusion)."""
    m = jnp.max(m_part, axis=3, keepdims=True)
    w = jnp.exp(m_part - m)  # splits that saw no valid key have l = 0 and o = 0
    l = jnp.sum(l_part * w, axis=3)
    o = jnp.sum(o_part * w[..., None], axis=3)
    o = jnp.where((l > 0)[..., None], o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return o[..., :rows, :].astype(dtype)


def auto_splits(programs: int, max_splits: int = 8) -> int:
    """Splits per (row, sample, kv head) so that the grid has at least two programs per SM
    (1 off GPU, where the kernel is interpreted)."""
    if jax.default_backend() != "gpu":
        return 1
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    return max(1, min(max_splits, -(-2 * sms // programs)))


def _pad_keys(x: Array, axis: int, minimum: int = 16) -> Array:
    """Pads a key axis shorter than `minimum` (tiny test shapes only: dots need ≥ 16 keys)."""
    if x.shape[axis] >= minimum:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, minimum - x.shape[axis])
    return jnp.pad(x, pad)


_STATIC = ("interpret", "block_k", "num_warps", "num_stages", "num_splits")


def fused_cached_attention(q: Array, k: Array, v: Array, mask: Array,
                           prefix: tuple[Array, Array, Array] | None = None, **kernel) -> Array:
    """`layers.cached_attention` for T = 1 as one Pallas kernel (module docstring).

    q: [B, G, 1, H, Dh]; k, v: [B, G, K, S, Dh]; mask: [B, G, 1, S] bool;
    prefix: (k_p [B, K, P, Dh], v_p [B, K, P, Dh], mask_p [B, P] bool) or None.
    kernel: interpret, block_k (64), num_warps (4), num_stages (2), num_splits (1): > 1, each
    (row, sample, kv head) splits its key blocks over that many programs and a small XLA
    fusion merges their partial softmaxes (flash-decoding); 0: `auto_splits`.
    Returns [B, G, 1, H, Dh] in q's dtype. T > 1 falls back to `cached_attention`.
    On a mesh: under shard_map (module docstring).
    """
    layout = _mesh_layout(k.shape[0], k.shape[2]) if q.shape[2] == 1 else None
    if layout is None:
        return _fused_cached_attention(q, k, v, mask, prefix, **kernel)
    mesh, rows, heads = layout
    cache = P(rows, None, heads)
    args, specs = [q, k, v, mask], [P(rows, None, None, heads), cache, cache, P(rows)]
    if prefix is not None:
        args.append(prefix)
        specs.append((P(rows, heads), P(rows, heads), P(rows)))

    def local(q, k, v, mask, *prefix):
        return _fused_cached_attention(q, k, v, mask, *prefix, **kernel)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)(*args)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _fused_cached_attention(q: Array, k: Array, v: Array, mask: Array,
                            prefix: tuple[Array, Array, Array] | None = None, *, interpret: bool = False,
                            block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                            num_splits: int = 1) -> Array:
    """`fused_cached_attention` on one device (or one device's shard)."""
    b, g, t, h, dh = q.shape
    if t != 1:
        return layers.cached_attention(q, k, v, mask, prefix)
    kv = k.shape[2]
    k, v = _pad_keys(k, 3), _pad_keys(v, 3)
    q_spec = pl.BlockSpec((None, None, None, _block_h(h // kv), dh), lambda i, j, n, _: (i, n, j, 0, 0))
    out, _ = _attention_call(q.reshape(b, g, kv, h // kv, dh), q_spec, [], k, v, mask, prefix, num_heads=h,
                             interpret=interpret, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                             num_splits=num_splits)
    return out.reshape(b, g, 1, h, dh)


def fused_decode_step(qkv: Array, cos: Array, sin: Array, k_cache: Array, v_cache: Array, slot: Array,
                      mask: Array, prefix: tuple[Array, Array, Array] | None = None, *, num_heads: int,
                      **kernel) -> tuple[Array, Array, Array]:
    """A decode step's attention from the fused q/k/v projection, in one kernel: RoPE on q
    and the new k, the new k/v written into the caches at `slot` (in place: the caches are
    input-output aliased), attention over prefix + cache + the new key.

    Equals `layers.apply_rotary` on q, k, `dynamic_update_slice` of k, v into the caches, then
    `fused_cached_attention` — without the ~5 XLA kernels of the first two per layer and step.
    qkv: [B, G, 1, H + 2K, Dh] (q heads, then k, then v; before RoPE); cos, sin: [B, G, 1, Dh]
    float32; k_cache, v_cache: [B, G, K, S, Dh] with S ≥ 16; slot: [] int32; mask: [B, G, 1, S]
    bool — the query sees its own new key (mask[slot] is taken as True), other keys by mask.
    kernel: as for `fused_cached_attention`. On a mesh: under shard_map (module docstring).
    Returns (out [B, G, 1, H, Dh], k_cache, v_cache).
    """
    layout = _mesh_layout(k_cache.shape[0], k_cache.shape[2])
    if layout is None:
        return _fused_decode_step(qkv, cos, sin, k_cache, v_cache, slot, mask, prefix, num_heads=num_heads,
                                  **kernel)
    mesh, rows, heads = layout
    shards = math.prod(mesh.shape[a] for a in heads or ())
    b, g, _, hk, dh = qkv.shape
    if shards > 1:  # each shard's q, k and v heads side by side: [B, G, 1, shards, (H + 2K) / shards, Dh]
        kv = (hk - num_heads) // 2
        parts = jnp.split(qkv, [num_heads, num_heads + kv], axis=3)
        qkv = jnp.concatenate([a.reshape(b, g, 1, shards, -1, dh) for a in parts], axis=4)
    cache = P(rows, None, heads)
    args = [qkv, cos, sin, k_cache, v_cache, slot, mask]
    specs = [P(rows, None, None, heads), P(rows), P(rows), cache, cache, P(), P(rows)]
    if prefix is not None:
        args.append(prefix)
        specs.append((P(rows, heads), P(rows, heads), P(rows)))

    def local(qkv, *rest):
        qkv = qkv.reshape(*qkv.shape[:3], -1, dh)  # [B/n, G, 1, (H + 2K) / shards, Dh]
        return _fused_decode_step(qkv, *rest, num_heads=num_heads // shards, **kernel)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=(P(rows, None, None, heads), cache, cache),
                         check_vma=False)(*args)


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_heads",))
def _fused_decode_step(qkv: Array, cos: Array, sin: Array, k_cache: Array, v_cache: Array, slot: Array,
                       mask: Array, prefix: tuple[Array, Array, Array] | None = None, *, num_heads: int,
                       interpret: bool = False, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                       num_splits: int = 1) -> tuple[Array, Array, Array]:
    """`fused_decode_step` on one device (or one device's shard)."""
    b, g, _, hk, dh = qkv.shape
    if k_cache.shape[3] < 16:  # the kernel's dots need ≥ 16 keys; a padded cache could not be aliased
        raise ValueError(f"fused_decode_step needs caches of ≥ 16 slots, got {k_cache.shape[3]}: "
                         "use reference_decode_step or fused_cached_attention")
    q_spec = pl.BlockSpec((None, None, None, hk, dh), lambda i, j, n, _: (i, n, 0, 0, 0))
    row = pl.BlockSpec((None, None, None, dh), lambda i, j, n, _: (i, n, 0, 0))
    step = ([cos.astype(jnp.float32), sin.astype(jnp.float32), jnp.asarray(slot, jnp.int32)],
            [row, row, pl.BlockSpec((), lambda i, j, n, _: ())])
    out, caches = _attention_call(qkv, q_spec, step, k_cache, v_cache, mask, prefix, num_heads=num_heads,
                                  interpret=interpret, block_k=block_k, num_warps=num_warps,
                                  num_stages=num_stages, num_splits=num_splits)
    return out.reshape(b, g, 1, num_heads, dh), *caches


def _mesh_layout(batch: int, num_kv: int) -> tuple[jax.sharding.AbstractMesh, tuple[str, ...] | None,
                                                   tuple[str, ...] | None] | None:
    """(mesh, row axes, kv-head axes) for the shard_map of a kernel traced on a mesh of more
    than one device (the abstract mesh and flax's logical-axis rules in context: see
    `sharding.with_rules`), or None: call the kernel as it is (one device, no mesh, or
    already inside a shard_map). Axes of size 1 are left out; None: not split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    rules = nn.get_logical_axis_rules()

    def axes(name: str, taken: tuple[str, ...] = ()) -> tuple[str, ...]:
        spec = nn.logical_to_mesh_axes((name,), rules)[0] if rules else None
        spec = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return tuple(a for a in spec if mesh.shape.get(a, 1) > 1 and a not in taken)

    rows = axes("batch")
    n = math.prod(mesh.shape[a] for a in rows)
    if batch % n:  # shard_map needs equal shards; replicating the rows instead would redo them on every device
        raise ValueError(f"the fused decode attention splits its {batch} rows over mesh axes {rows} "
                         f"({n} shards), which do not divide them: use a multiple of {n} rows or 'xla'")
    heads = axes("kv_heads", rows)
    if num_kv % math.prod(mesh.shape[a] for a in heads):  # e.g. 2 kv heads on tensor=4: whole heads per device
        heads = ()
    return mesh, rows or None, heads or None


def reference_decode_step(qkv: Array, cos: Array, sin: Array, k_cache: Array, v_cache: Array, slot,
                          mask: Array, prefix=None, *, num_heads: int) -> tuple[Array, Array, Array]:
    """What `fused_decode_step` computes, as the XLA steps it replaces (tests, GPU checks)."""
    kv = (qkv.shape[-2] - num_heads) // 2
    q, k, v = jnp.split(qkv, [num_heads, num_heads + kv], axis=-2)
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    put = lambda c, a: jax.lax.dynamic_update_slice(c, jnp.swapaxes(a, 2, 3).astype(c.dtype),  # noqa: E731
                                                    (0, 0, 0, slot, 0))
    k_cache, v_cache = put(k_cache, k), put(v_cache, v)
    return layers.cached_attention(q, k_cache, v_cache, mask, prefix), k_cache, v_cache


def _block_h(rows: int) -> int:
    return max(16, _pow2_at_least(rows))


def _attention_call(q: Array, q_spec, step, k: Array, v: Array, mask: Array, prefix, *, num_heads: int,
                    interpret: bool, block_k: int, num_warps: int, num_stages: int, num_splits: int):
    """The pallas_call of both entry points. step: [] (q rotated) or ([cos, sin, slot], specs)."""
    b, g, kv, s, dh = k.shape
    rows = num_heads // kv
    block_h = _block_h(rows)
    num_splits = num_splits or auto_splits(b * g * kv)
    mask = _pad_keys(mask[:, :, 0].astype(jnp.int32), 2)  # [B, G, S']
    hi = jnp.max(jnp.where(mask != 0, jnp.arange(s) + 1, 0), axis=-1).astype(jnp.int32)  # [B, G]
    if step:
        hi = jnp.maximum(hi, step[0][2] + 1)  # the new key's slot is always visited
    cache_spec = pl.BlockSpec((None, None, None, s, dh), lambda i, j, n, _: (i, n, j, 0, 0))
    args, specs = [q], [q_spec]
    if step:
        args += step[0][:2]
        specs += step[1][:2]
    args += [k, v, mask, hi]
    specs += [cache_spec, cache_spec, pl.BlockSpec((None, None, s), lambda i, j, n, _: (i, n, 0)),
              pl.BlockSpec((None, None), lambda i, j, n, _: (i, n))]
    if step:
        args.append(step[0][2])
        specs.append(step[1][2])
    bk_pre = 0
    if prefix is not None:
        k_p, v_p, mask_p = prefix
        mask_p = _pad_keys(mask_p.astype(jnp.int32), 1)  # [B, P']
        k_p, v_p = _pad_keys(k_p, 2), _pad_keys(v_p, 2)
        p_len = k_p.shape[2]
        lo = jnp.min(jnp.where(mask_p != 0, jnp.arange(p_len), p_len), axis=-1).astype(jnp.int32)  # [B]
        bk_pre = _block(p_len, block_k)
        args += [k_p, v_p, mask_p, lo]
        specs += [pl.BlockSpec((None, None, p_len, dh), lambda i, j, n, _: (i, j, 0, 0)),
                  pl.BlockSpec((None, None, p_len, dh), lambda i, j, n, _: (i, j, 0, 0)),
                  pl.BlockSpec((None, p_len), lambda i, j, n, _: (i, 0)),
                  pl.BlockSpec((None,), lambda i, j, n, _: (i,))]
    kernel = functools.partial(_kernel, has_prefix=prefix is not None, step=bool(step), rows=rows,
                               block_h=block_h, bk_self=_block(s, block_k), bk_pre=bk_pre,
                               num_splits=num_splits, num_heads=num_heads, num_kv=kv)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((b, g, kv, rows, dh), k.dtype)]
        out_specs = [pl.BlockSpec((None, None, None, block_h, dh), lambda i, j, n, _: (i, n, j, 0, 0))]
    else:  # per split: o [B, G, K, NS, block_h, Dh], m and l [B, G, K, NS, block_h], float32
        part = (b, g, kv, num_splits, block_h)
        out_shape = [jax.ShapeDtypeStruct(part + (dh,), jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, None, block_h, dh), lambda i, j, n, x: (i, n, j, x, 0, 0)),
                     pl.BlockSpec((None, None, None, None, block_h), lambda i, j, n, x: (i, n, j, x, 0)),
                     pl.BlockSpec((None, None, None, None, block_h), lambda i, j, n, x: (i, n, j, x, 0))]
    aliases = {}
    if step:  # the caches are outputs too, written in place
        k_at = 3  # args: q, cos, sin, k, v, ...
        aliases = {k_at: len(out_shape), k_at + 1: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        out_specs += [cache_spec, cache_spec]
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    outs = pl.pallas_call(
        kernel, grid=(b, kv, g, num_splits), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases, compiler_params=compiler_params, interpret=interpret,
        name="fused_decode_step" if step else "fused_decode_attention",
    )(*args)
    caches = outs[len(outs) - 2:] if step else ()
    attn = outs[:len(outs) - 2] if step else outs
    out = attn[0] if num_splits == 1 else _combine(*attn, rows, k.dtype)
    return out, caches
