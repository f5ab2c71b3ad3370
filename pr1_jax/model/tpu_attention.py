"""Flash attention on TPU for training, scoring and prefill: JAX's Pallas splash attention.

`splash_attention(q, k, v, mask, prefix)` computes `layers.attention` (the same arguments and
layouts) with `jax.experimental.pallas.ops.tpu.splash_attention`, forward and backward: the
[.., T, S] float32 scores never reach HBM. The masks are the model's own bool masks, given to
splash as *dynamic* masks: splash cuts each into blocks, skips the blocks with no True entry
(the other images of a packed row, the other windows, the keys after a causal query block,
a group's other samples) and applies the rest entry by entry — so padding, causal, packed
image segments (vision tower) and Qwen2.5-VL's windows all come in exactly as `layers.attention`
reads them, with no call site changed.

Layout: the (B, G) rows become one batch axis that splash is vmapped over ([H, T, Dh] per
row, grouped-query heads: splash reads kv head h // R for query head h, like the einsums).
A shared prefix is broadcast to the G rows and put before the own keys (like
`layers.flash_attention`, the cuDNN path). T and the key count are padded up to the block
size (masked rows and keys). Numerics as `layers.attention`: q is scaled by Dh^-0.5 in q's
dtype, scores and softmax are float32, the probabilities are cast to v's dtype for the PV
product. A query row with no valid key (a left-pad position, whose output is never used)
gets zeros instead of the einsum path's mean of v.

Multi-device meshes: GSPMD cannot partition a Pallas call, so the kernel runs inside
`shard_map` (`run_sharded`): rows over data × fsdp, heads over tensor, where they divide.
Lowering: `jax.lax.platform_dependent` picks the Mosaic (TPU) kernel when the program is
lowered for TPU — also ahead of time from a CPU host (`pr1_jax.aot` with libtpu) — and the
Pallas interpreter elsewhere (CPU tests); `interpret=True` forces the interpreter.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.sharding import PartitionSpec as P

from pr1_jax.model import layers

Array = jax.Array
BATCH_AXES = ("data", "fsdp")  # the mesh axes rows are split over (`sharding.TRAIN_RULES` "batch")
HEAD_AXIS = "tensor"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_sizes(t: int, s: int, block: int = 512) -> splash.BlockSizes:
    """Splash tiles for T queries and S keys (both padded to a multiple of them): up to `block`,
    at least 128 (keys: the lane width; queries: kept equal, splash's tested configuration)."""
    bq = min(block, _round_up(t, 128))
    bkv = min(block, _round_up(s, 128))
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def _row_kernel(q_htd: Array, k_ksd: Array, v_ksd: Array, mask_ts: Array, sizes: splash.BlockSizes,
                interpret: bool) -> Array:
    """One row's splash attention: q [H, T, Dh], k/v [K, S, Dh], mask [T, S] bool (dynamic)."""
    kernel = splash.make_splash_mha(mask_ts[None], block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    # make_splash_mha turns MaskInfo.is_dynamic_mask (a Python bool) into an array, which under
    # jit/vmap is a tracer that its __call__ then branches on; it only names a scope: drop it.
    fix = lambda mi: None if mi is None else mi._replace(is_dynamic_mask=None)  # noqa: E731
    kernel = splash.SplashAttentionKernel(fix(kernel.fwd_mask_info), fix(kernel.dq_mask_info),
                                          fix(kernel.dkv_mask_info), **kernel.kwargs)
    return kernel(q_htd, k_ksd, v_ksd)


def _attention_local(q: Array, k: Array, v: Array, mask: Array, prefix, *, interpret: bool | None,
                     block: int) -> Array:
    """`splash_attention` on one device's shard (same shapes as `layers.attention`)."""
    b, g, t, h, dh = q.shape
    k, v, mask = layers.prefix_as_own_keys(k, v, mask, prefix)
    s, kv = k.shape[2], k.shape[3]
    sizes = block_sizes(t, s, block)
    t_pad, s_pad = _round_up(t, sizes.block_q), _round_up(s, sizes.block_kv)
    q = q * jnp.asarray(dh**-0.5, q.dtype)  # like the einsum path: scaled in q's dtype
    # [B·G, H, T', Dh] and [B·G, K, S', Dh]; padded queries and keys are masked out.
    q = jnp.pad(q.reshape(b * g, t, h, dh), ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    def kv_rows(a: Array) -> Array:
        return jnp.pad(a.reshape(b * g, s, kv, dh), ((0, 0), (0, s_pad - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    k, v = kv_rows(k), kv_rows(v)
    mask = jnp.pad(mask.reshape(b * g, t, s), ((0, 0), (0, t_pad - t), (0, s_pad - s)))

    def run(interp: bool) -> Callable:
        return lambda q, k, v, m: jax.vmap(functools.partial(_row_kernel, sizes=sizes, interpret=interp))(q, k, v, m)

    if interpret is None:  # Mosaic where lowered for TPU (also AOT from a CPU host), else interpreted
        out = jax.lax.platform_dependent(q, k, v, mask, tpu=run(False), default=run(True))
    else:
        out = run(interpret)(q, k, v, mask)
    return out.transpose(0, 2, 1, 3)[:, :t].reshape(b, g, t, h, dh)


def _axes(mesh, names: tuple[str, ...], n: int):
    """The mesh axes among `names` with size > 1, if their product divides n (a PartitionSpec
    entry), else None: a dimension they do not divide is left whole."""
    present = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    size = 1
    for a in present:
        size *= mesh.shape[a]
    if not present or n % size:
        return None
    return present if len(present) > 1 else present[0]


def run_sharded(fn: Callable, args: tuple, batch_dims: tuple, head_dims: tuple, head_counts: tuple[int, ...],
                out_dims: tuple[int, int, int]):
    """`fn(*args)` inside shard_map over the mesh in context (`sharding.with_rules` sets it):
    dimension batch_dims[i] of args[i] over data × fsdp (if they divide the rows), dimension
    head_dims[i] over tensor (if it divides every count in head_counts); None: not split.
    out_dims: (ndim, batch dim, head dim) of the output. Without a mesh of more than one
    device, `fn(*args)` as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    rows = _axes(mesh, BATCH_AXES, args[0].shape[batch_dims[0]])
    heads = _axes(mesh, (HEAD_AXIS,), math.gcd(*head_counts))

    def spec(ndim: int, bd, hd) -> P:
        parts = [None] * ndim
        if bd is not None:
            parts[bd] = rows
        if hd is not None:
            parts[hd] = heads
        return P(*parts)

    in_specs = tuple(spec(a.ndim, bd, hd) for a, bd, hd in zip(args, batch_dims, head_dims))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec(*out_dims), check_vma=False)(*args)


def splash_attention(q: Array, k: Array, v: Array, mask: Array, prefix: tuple[Array, Array, Array] | None = None,
                     *, interpret: bool | None = None, block: int = 512) -> Array:
    """`layers.attention` with splash attention (module docstring).

    q: [B, G, T, H, Dh]; k, v: [B, G, S, K, Dh]; mask: [B, G, T, S] bool;
    prefix: (k_p [B, P, K, Dh], v_p [B, P, K, Dh], mask_p [B, P] bool) or None.
    interpret: None (Mosaic when lowered for TPU, else the interpreter) or a fixed choice.
    Returns [B, G, T, H, Dh] in q's dtype.
    """
    local = functools.partial(_attention_local, interpret=interpret, block=block)
    heads = (q.shape[3], k.shape[3])
    if prefix is None:
        return run_sharded(lambda q, k, v, m: local(q, k, v, m, None), (q, k, v, mask), (0, 0, 0, 0),
                           (3, 3, 3, None), heads, (5, 0, 3))
    k_p, v_p, mask_p = prefix
    return run_sharded(lambda q, k, v, m, kp, vp, mp: local(q, k, v, m, (kp, vp, mp)),
                       (q, k, v, mask, k_p, v_p, mask_p), (0, 0, 0, 0, 0, 0, 0), (3, 3, 3, None, 2, 2, None),
                       heads, (5, 0, 3))
