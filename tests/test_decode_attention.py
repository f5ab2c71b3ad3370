"""The fused Pallas decode attention (interpret mode on CPU) equals `layers.cached_attention`,
and the sampler's greedy tokens are the same with it, on one device and under shard_map on
8 fake devices (`ShardedSampler`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import sampler as sampler_lib
from pr1_jax.model import hf_io, layers
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.decode_attention import fused_cached_attention, fused_decode_step, reference_decode_step
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.processing import batch as pb
from tests.helpers import mixed_batch

B, G, K, R, DH, P, S = 2, 3, 2, 3, 32, 70, 40


def _inputs(dtype, num_valid, seed=0, dh=DH, p=P, s=S):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, G, 1, K * R, dh), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, G, K, s, dh), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, G, K, s, dh), jnp.float32).astype(dtype)
    k_p = jax.random.normal(ks[3], (B, K, p, dh), jnp.float32).astype(dtype)
    v_p = jax.random.normal(ks[4], (B, K, p, dh), jnp.float32).astype(dtype)
    pad = jnp.asarray([0, 13])[:, None]  # left padding: row 1's first 13 prefix keys are invalid
    mask_p = jnp.arange(p)[None] >= pad
    mask = jnp.broadcast_to(jnp.arange(s) < num_valid, (B, G, 1, s))
    return q, k, v, mask, (k_p, v_p, mask_p)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_valid", [1, 7, S])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_fused_equals_cached_attention(dtype, tol, num_valid, with_prefix):
    q, k, v, mask, prefix = _inputs(dtype, num_valid)
    prefix = prefix if with_prefix else None
    ref = layers.cached_attention(q, k, v, mask, prefix)
    out = fused_cached_attention(q, k, v, mask, prefix, interpret=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


def test_fused_general_masks_and_small_lengths():
    """Non-prefix own masks (holes), per-sample different lengths, keys fewer than 16."""
    q, k, v, _, (k_p, v_p, _) = _inputs(jnp.float32, 1, seed=3, p=9, s=12)
    mask = jax.random.bernoulli(jax.random.PRNGKey(7), 0.5, (B, G, 1, 12)).at[..., 0].set(True)
    mask_p = jnp.arange(9)[None] >= jnp.asarray([0, 4])[:, None]
    ref = layers.cached_attention(q, k, v, mask, (k_p, v_p, mask_p))
    out = fused_cached_attention(q, k, v, mask, (k_p, v_p, mask_p), interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_fused_head_dim_128(dtype, tol):
    """The Qwen2-VL head dim, with a prefix longer than two blocks of 64."""
    q, k, v, mask, prefix = _inputs(dtype, 19, seed=5, dh=128, p=150, s=70)
    ref = layers.cached_attention(q, k, v, mask, prefix)
    out = fused_cached_attention(q, k, v, mask, prefix, interpret=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_split_keys_equal_one_program(num_splits, with_prefix):
    """Flash-decoding splits (8 > the blocks there are: some splits see no key) merge exactly."""
    q, k, v, mask, prefix = _inputs(jnp.float32, 19, seed=9, dh=128, p=150, s=70)
    prefix = prefix if with_prefix else None
    ref = layers.cached_attention(q, k, v, mask, prefix)
    out = fused_cached_attention(q, k, v, mask, prefix, interpret=True, num_splits=num_splits, block_k=32)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("slot,num_splits", [(0, 1), (21, 1), (21, 3), (39, 2)])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_fused_step_equals_rope_write_attend(dtype, tol, slot, num_splits, with_prefix):
    """RoPE + cache write + attention in one kernel = the three XLA steps; the caches are
    updated at the slot and nowhere else (stale values at the slot are never read)."""
    h, kv, dh, p, s = K * R, K, 128, 150, S
    ks = jax.random.split(jax.random.PRNGKey(11), 7)
    qkv = jax.random.normal(ks[0], (B, G, 1, h + 2 * kv, dh), jnp.float32).astype(dtype)
    angles = jax.random.uniform(ks[1], (B, G, 1, dh // 2), jnp.float32, 0, 50)
    cos, sin = jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1))
    k_cache = jax.random.normal(ks[2], (B, G, kv, s, dh), jnp.float32).astype(dtype)  # slot holds garbage
    v_cache = jax.random.normal(ks[3], (B, G, kv, s, dh), jnp.float32).astype(dtype)
    mask = jnp.broadcast_to(jnp.arange(s) <= slot, (B, G, 1, s))
    prefix = None
    if with_prefix:
        mask_p = jnp.arange(p)[None] >= jnp.asarray([0, 13])[:, None]
        prefix = (jax.random.normal(ks[4], (B, kv, p, dh), jnp.float32).astype(dtype),
                  jax.random.normal(ks[5], (B, kv, p, dh), jnp.float32).astype(dtype), mask_p)
    ref = reference_decode_step(qkv, cos, sin, k_cache, v_cache, slot, mask, prefix, num_heads=h)
    out = fused_decode_step(qkv, cos, sin, k_cache, v_cache, jnp.int32(slot), mask, prefix, num_heads=h,
                            interpret=True, num_splits=num_splits, block_k=32)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(out[1][:, :, :, slot + 1:]), np.asarray(k_cache[:, :, :, slot + 1:]))


def test_fused_step_refuses_short_caches():
    qkv = jnp.zeros((1, 1, 1, 8, 32))
    cache = jnp.zeros((1, 1, 2, 8, 32))
    rope = jnp.zeros((1, 1, 1, 32))
    with pytest.raises(ValueError, match="16 slots"):
        fused_decode_step(qkv, rope, rope, cache, cache, jnp.int32(0), jnp.ones((1, 1, 1, 8), bool),
                          num_heads=4, interpret=True)


EOS = (151645, 151643)
PAD = 151643


def test_sampler_pallas_equals_xla(sampler_dir):
    cfg = ModelConfig.from_pretrained(sampler_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(sampler_dir, cfg))
    rows, images, _, _ = mixed_batch(sampler_dir, cfg)
    inputs = jax.tree.map(jnp.asarray, pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=PAD))
    model = Qwen2VL(cfg)
    # 20 new tokens: caches of ≥ 16 slots take the one-kernel step (fused_decode_step)
    sc = sampler_lib.SamplingConfig(num_samples=2, max_new_tokens=20, temperature=0)
    outs = [sampler_lib.Sampler(model, EOS, PAD, decode_attention=a)(params, inputs, jax.random.PRNGKey(0), sc)
            for a in ("xla", "pallas")]
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
    np.testing.assert_array_equal(np.asarray(outs[1].lengths), np.asarray(outs[0].lengths))
    np.testing.assert_allclose(np.asarray(outs[1].logp), np.asarray(outs[0].logp), atol=1e-4)


MESHES = [dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)]  # tensor=2: one kv head per device


@pytest.mark.parametrize("mesh_shape", MESHES + [dict(fsdp=2, tensor=4)])  # 2 kv heads on 4: whole heads
def test_kernels_on_mesh_equal_one_device(mesh_shape):
    """Traced on a mesh (as ShardedSampler does), both entry points run under shard_map, and
    each device's rows (and kv heads) give the one-device result."""
    from pr1_jax import sharding
    b, h, kv, dh, p, s, slot = 8, K * R, K, 32, 20, 16, 5
    ks = jax.random.split(jax.random.PRNGKey(13), 7)
    qkv = jax.random.normal(ks[0], (b, G, 1, h + 2 * kv, dh), jnp.float32)
    cos, sin = jnp.cos(qkv[:, :, :, 0] * 7), jnp.sin(qkv[:, :, :, 0] * 7)
    k_cache, v_cache = (jax.random.normal(k, (b, G, kv, s, dh), jnp.float32) for k in ks[1:3])
    mask = jnp.broadcast_to(jnp.arange(s) <= slot, (b, G, 1, s))
    prefix = (jax.random.normal(ks[3], (b, kv, p, dh), jnp.float32), jax.random.normal(ks[4], (b, kv, p, dh)),
              jnp.arange(p)[None] >= jnp.arange(b)[:, None] * 2)  # left padding: row i's first 2i keys
    step_args = (qkv, cos, sin, k_cache, v_cache, jnp.int32(slot), mask, prefix)
    attend_args = (qkv[:, :, :, :h], k_cache, v_cache, mask, prefix)
    step = lambda *a: fused_decode_step(*a, num_heads=h, interpret=True)  # noqa: E731
    attend = lambda *a: fused_cached_attention(*a, interpret=True)  # noqa: E731
    mesh = sharding.make_mesh(**mesh_shape)
    for fn, args in ((step, step_args), (attend, attend_args)):
        ref = fn(*args)
        on_mesh = jax.jit(sharding.with_rules(fn, mesh, sharding.SAMPLE_RULES))
        out = on_mesh(*jax.device_put(args, sharding.replicated(mesh)))  # the program spans the mesh
        assert "shard_map" in str(jax.make_jaxpr(on_mesh)(*args))
        for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def eight_rows(sampler_dir):
    """8 prompts (the mixed batch, then again in reverse: left padding, uneven lengths), and the
    one-device greedy rollouts of them with each decode attention."""
    cfg = ModelConfig.from_pretrained(sampler_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(sampler_dir, cfg))
    rows, images, _, _ = mixed_batch(sampler_dir, cfg)
    inputs = pb.build_inputs(rows + rows[::-1], images + images[::-1], image_token_id=cfg.image_token_id,
                             pad_id=PAD)
    model = Qwen2VL(cfg)
    # 16 new tokens: caches of 16 slots take the one-kernel step (fused_decode_step)
    sc = sampler_lib.SamplingConfig(num_samples=2, max_new_tokens=16, temperature=0)
    one_device = {a: sampler_lib.Sampler(model, EOS, PAD, decode_attention=a)(
        params, jax.tree.map(jnp.asarray, inputs), jax.random.PRNGKey(0), sc) for a in ("xla", "pallas")}
    return model, params, inputs, sc, one_device


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_sampler_pallas_equals_one_device(eight_rows, mesh_shape):
    """The fused decode under shard_map on 8 devices: the one-device tokens, token for token."""
    from pr1_jax import sharding
    from pr1_jax.sharded_sampler import ShardedSampler
    model, params, inputs, sc, one_device = eight_rows
    mesh = sharding.make_mesh(**mesh_shape)
    sampler = ShardedSampler(model, EOS, PAD, mesh, decode_attention="pallas")
    out = sampler(params, sharding.shard_batch(inputs, mesh, sharding.SAMPLE_RULES), jax.random.PRNGKey(0), sc)
    for ref in (one_device["pallas"], one_device["xla"]):
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
        np.testing.assert_allclose(np.asarray(out.logp), np.asarray(ref.logp), atol=1e-4)
    assert len(set(map(tuple, np.asarray(out.tokens[:, 0])))) > 1  # the rows really differ


def test_sharded_sampler_pallas_needs_whole_rows_per_device(eight_rows):
    """shard_map needs the same rows on every device: 4 prompts on 8 batch shards is refused
    before anything compiles (GSPMD's 'xla' takes them)."""
    from pr1_jax import sharding
    from pr1_jax.sharded_sampler import ShardedSampler
    model, params, inputs, sc, _ = eight_rows
    four = pb.build_inputs([np.asarray(r) for r in inputs.input_ids[4:]], [], image_token_id=-1, pad_id=PAD)
    sampler = ShardedSampler(model, EOS, PAD, sharding.make_mesh(data=2, fsdp=4), decode_attention="pallas")
    with pytest.raises(ValueError, match="multiple of its 8 batch shards"):
        sampler(params, four, jax.random.PRNGKey(0), sc)
    assert sampler.num_compiled() == 0
