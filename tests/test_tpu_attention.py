"""The TPU attention kernels (Pallas interpret mode on CPU) equal the XLA attention: splash
attention for training (packed image segments and windows as in the vision tower; a shared
prefix with causal own keys and padding), forward and gradients; the decode kernel over a
left-padded prefix and the own cache, odd lengths, one block and several. With libtpu
importable, the kernels also compile ahead of time for a v5e topology (Mosaic lowering)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import sampler as sampler_lib
from pr1_jax import sharding
from pr1_jax.model import hf_io, layers
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.model.tpu_attention import splash_attention
from pr1_jax.model.tpu_decode_attention import key_block, tpu_cached_attention
from pr1_jax.processing import batch as pb
from pr1_jax.programs import resolve_kernels
from tests.helpers import mixed_batch

B, G, K, R, DH = 2, 3, 2, 2, 16
TOL = dict(atol=2e-5, rtol=2e-5)


def _normal(key, *shape):
    return jax.random.normal(key, shape, jnp.float32)


def _close(a, b, rows=None, **tol):
    """a ≈ b (float32 tolerance); rows [..] bool: compare only query rows with a valid key (the
    kernels give such rows 0, the einsums a mean of v; their outputs are never used)."""
    a, b = np.asarray(a), np.asarray(b)
    if rows is not None:
        keep = np.asarray(rows)[..., None, None]
        a, b = np.where(keep, a, 0), np.where(keep, b, 0)
    np.testing.assert_allclose(a, b, **(tol or TOL))


def _grads(fn, args, rows):
    """Gradients of Σ out² over the rows with a valid key, for every float argument."""
    def loss(*xs):
        return jnp.sum(jnp.where(rows[..., None, None], fn(*xs), 0.0) ** 2)
    argnums = tuple(i for i, a in enumerate(args) if a is not None and a.dtype == jnp.float32)
    return jax.grad(loss, argnums=argnums)(*args)


def test_splash_packed_image_segments_and_windows():
    """Vision-tower masks: patches of several images packed in one row (segment ids, padding
    patches with their own id) and Qwen2.5-VL's windows within images; all heads share a kv
    head count (no GQA in the tower), T = N = 200 (not a block multiple)."""
    rows, n, h = 2, 200, 3
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    seg = jnp.stack([jnp.repeat(jnp.arange(3), jnp.array([80, 100, 20]), total_repeat_length=n),
                     jnp.repeat(jnp.arange(2), jnp.array([130, 70]), total_repeat_length=n)])  # [R, N]
    window = jnp.arange(n)[None] // 48  # windows: runs of 48 patches
    image_mask = seg[:, :, None] == seg[:, None, :]
    window_mask = image_mask & (window[:, :, None] == window[:, None, :])
    q, k, v = (_normal(kk, rows, 1, n, h, DH) for kk in ks[:3])
    for mask in (image_mask, window_mask):
        args = (q, k, v, mask[:, None])
        out = splash_attention(*args, interpret=True)
        _close(out, layers.attention(*args))
        every = jnp.ones((rows, 1, n), bool)
        for a, b in zip(_grads(lambda *x: splash_attention(*x, mask[:, None], interpret=True), args[:3], every),
                        _grads(lambda *x: layers.attention(*x, mask[:, None]), args[:3], every)):
            _close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t,p", [(13, 37), (130, 5)])
def test_splash_shared_prefix_causal_padding(t, p):
    """A packed group's completions: G samples of T tokens attend to the prompt's P keys (left
    padding: row 1 starts at key 4) and causally to their own (ends padded; the diagonal always
    valid, as `train_step` builds it); odd lengths. Forward and gradients of q, k, v, k_p, v_p."""
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    q = _normal(ks[0], B, G, t, K * R, DH)
    k, v = _normal(ks[1], B, G, t, K, DH), _normal(ks[2], B, G, t, K, DH)
    k_p, v_p = _normal(ks[3], B, p, K, DH), _normal(ks[4], B, p, K, DH)
    mask_p = jnp.arange(p)[None] >= jnp.array([0, min(4, p - 1)])[:, None]
    length = jnp.array([[t, t - 3, 1], [2, t, t - 1]])  # [B, G] valid own tokens
    idx = jnp.arange(t)
    causal = idx[:, None] >= idx[None, :]
    mask = (causal & (idx[None, None, None, :] < length[..., None, None])) | jnp.eye(t, dtype=bool)
    out = splash_attention(q, k, v, mask, (k_p, v_p, mask_p), interpret=True)
    _close(out, layers.attention(q, k, v, mask, (k_p, v_p, mask_p)))
    rows = jnp.ones((B, G, t), bool)
    fn_tpu = lambda q, k, v, kp, vp: splash_attention(q, k, v, mask, (kp, vp, mask_p), interpret=True)  # noqa: E731
    fn_xla = lambda q, k, v, kp, vp: layers.attention(q, k, v, mask, (kp, vp, mask_p))  # noqa: E731
    for a, b in zip(_grads(fn_tpu, (q, k, v, k_p, v_p), rows), _grads(fn_xla, (q, k, v, k_p, v_p), rows)):
        _close(a, b, atol=1e-4, rtol=1e-4)


def test_splash_prefill_left_padding():
    """Prefill's mask (causal & key padding, no prefix): left-pad query rows have no valid key
    and are left out of the comparison."""
    t = 21
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    q, k, v = _normal(ks[0], B, 1, t, K * R, DH), _normal(ks[1], B, 1, t, K, DH), _normal(ks[2], B, 1, t, K, DH)
    valid = jnp.arange(t)[None] >= jnp.array([0, 9])[:, None]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & valid[:, None, None, :]
    _close(splash_attention(q, k, v, mask, interpret=True), layers.attention(q, k, v, mask), rows=mask.any(-1))


def _decode_inputs(s, p, num_valid, seed=3):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = _normal(ks[0], B, G, 1, K * R, DH)
    k, v = _normal(ks[1], B, G, K, s, DH), _normal(ks[2], B, G, K, s, DH)
    k_p, v_p = _normal(ks[3], B, K, p, DH), _normal(ks[4], B, K, p, DH)
    mask_p = jnp.arange(p)[None] >= jnp.array([0, min(13, p - 1)])[:, None]  # row 1: 13 left-pad keys
    mask = jnp.broadcast_to(jnp.arange(s)[None, None, None] < jnp.asarray(num_valid)[:, None, None, None],
                            (B, G, 1, s))
    return q, k, v, mask, (k_p, v_p, mask_p)


@pytest.mark.parametrize("s,p,block_k", [(40, 72, 8), (13, 37, 8), (24, 70, 512)])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_decode_equals_cached_attention(s, p, block_k, with_prefix):
    """Prefix + own cache: several blocks (40 keys in blocks of 8: rows whose last valid key is
    in block 0 or 4; a prefix starting in block 1 for row 1), odd lengths as one block."""
    q, k, v, mask, prefix = _decode_inputs(s, p, num_valid=[1, s - 3])
    prefix = prefix if with_prefix else None
    out = tpu_cached_attention(q, k, v, mask, prefix, interpret=True, block_k=block_k)
    _close(out, layers.cached_attention(q, k, v, mask, prefix))


def test_decode_general_own_mask():
    """Per-sample own masks (holes, different lengths per sample) are applied entry by entry."""
    q, k, v, _, prefix = _decode_inputs(32, 16, num_valid=[32, 32], seed=4)
    mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.6, (B, G, 1, 32)).at[..., 0].set(True)
    _close(tpu_cached_attention(q, k, v, mask, prefix, interpret=True, block_k=8),
           layers.cached_attention(q, k, v, mask, prefix))


def test_key_block():
    assert key_block(768, 512) == 384 and key_block(1024, 512) == 512 and key_block(2048, 512) == 512
    assert key_block(13, 8) == 13 and key_block(40, 8) == 8 and key_block(24, 16) == 8


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=2, tensor=4)])
def test_kernels_on_mesh_equal_one_device(mesh_shape):
    """Traced on a mesh (as the programs do) both kernels run in shard_map: rows over data ×
    fsdp, heads over tensor (4 does not divide 2 kv heads: heads whole); the platform decides
    Mosaic or interpreter (`interpret=None`: interpreted here)."""
    mesh = sharding.make_mesh(**mesh_shape)
    b, t = 4, 9
    ks = jax.random.split(jax.random.PRNGKey(6), 3)
    q, k, v = _normal(ks[0], b, 1, t, K * R, DH), _normal(ks[1], b, 1, t, K, DH), _normal(ks[2], b, 1, t, K, DH)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, 1, t, t))
    dq, dk, dv, dmask, dprefix = _decode_inputs(24, 20, num_valid=[5, 24])
    rep = lambda tree: jax.device_put(tree, sharding.replicated(mesh))  # noqa: E731
    dargs = jax.tree.map(lambda a: jnp.concatenate([a, a[::-1]]), (dq, dk, dv, dmask, dprefix))  # 4 rows
    for fn, args in ((splash_attention, (q, k, v, mask)), (tpu_cached_attention, dargs)):
        on_mesh = jax.jit(sharding.with_rules(fn, mesh, sharding.SAMPLE_RULES))
        assert "shard_map" in str(jax.make_jaxpr(on_mesh)(*args))
        _close(on_mesh(*rep(args)), fn(*args, interpret=True))


def test_resolve_kernels_on_tpu():
    """"auto" → the TPU kernels on a TPU mesh (any size), CPU/GPU choices unchanged."""
    class Dev:
        platform, device_kind = "tpu", "TPU v5 lite"

    class TpuMesh:
        devices, size = np.array([Dev()] * 8), 8

    assert resolve_kernels("auto", "auto", TpuMesh()) == resolve_kernels("splash", "pallas_tpu", TpuMesh())
    assert resolve_kernels("auto", "auto", TpuMesh()).attention == "splash"
    assert resolve_kernels("auto", "auto", TpuMesh()).decode_attention == "pallas_tpu"
    cpu = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
    assert resolve_kernels("auto", "auto", cpu).attention == "auto"  # layers.attention: cudnn or xla per call
    assert resolve_kernels("auto", "auto", cpu).decode_attention == "xla"


EOS = (151645, 151643)
PAD = 151643


def test_sampler_tpu_kernels_equal_xla(sampler_dir):
    """The whole rollout (vision tower and prefill through splash, decode steps through the TPU
    kernel) gives the XLA rollout's greedy tokens."""
    cfg = ModelConfig.from_pretrained(sampler_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(sampler_dir, cfg))
    rows, images, _, _ = mixed_batch(sampler_dir, cfg)
    inputs = jax.tree.map(jnp.asarray, pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=PAD))
    sc = sampler_lib.SamplingConfig(num_samples=2, max_new_tokens=12, temperature=0)
    outs = [sampler_lib.Sampler(Qwen2VL(cfg, attention=attn), EOS, PAD, decode_attention=dec)(
        params, inputs, jax.random.PRNGKey(0), sc) for attn, dec in (("xla", "xla"), ("splash", "pallas_tpu"))]
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
    np.testing.assert_allclose(np.asarray(outs[1].logp), np.asarray(outs[0].logp), atol=1e-4)


def _libtpu() -> str | None:
    """Why the AOT test cannot run (None: it can)."""
    if os.environ.get("TPU_LIBRARY_PATH") and os.path.exists(os.environ["TPU_LIBRARY_PATH"]):
        return None
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return "libtpu is not installed (CPU-only venv; see `python -m pr1_jax.aot --help`)"
    return None


@pytest.mark.skipif(_libtpu() is not None, reason=str(_libtpu()))
def test_kernels_compile_for_v5e():
    """Mosaic lowering: splash forward and backward and the decode kernel compile for a v5e
    chip (bfloat16, Qwen2-VL-2B head shapes) from this CPU host."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    try:
        devices = topologies.get_topology_desc("v5e:2x4", "tpu", chips_per_host_bounds=(2, 4, 1)).devices
    except Exception as e:  # noqa: BLE001  a libtpu that cannot start here (lock held, wrong version)
        pytest.skip(f"libtpu cannot describe a v5e topology here: {e}")
    mesh = Mesh(np.array(devices[:1]), ("fsdp",))

    def sds(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))

    b, g, t, h, kv, dh, p, s = 1, 4, 256, 12, 2, 128, 512, 768
    train_args = (sds(b, g, t, h, dh), sds(b, g, t, kv, dh), sds(b, g, t, kv, dh), sds(b, g, t, t, dtype=bool),
                  sds(b, p, kv, dh), sds(b, p, kv, dh), sds(b, p, dtype=bool))

    def loss(q, k, v, m, kp, vp, mp):
        return splash_attention(q, k, v, m, (kp, vp, mp)).astype(jnp.float32).sum()

    # conftest's "highest" matmul precision asks Mosaic for fp32 contractions of bf16 (refused);
    # the programs run at the default precision.
    with jax.default_matmul_precision("default"):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5))).lower(*train_args).compile()
        decode = jax.jit(lambda q, k, v, m, kp, vp, mp: tpu_cached_attention(q, k, v, m, (kp, vp, mp))).lower(
            sds(b, g, 1, h, dh), sds(b, g, kv, s, dh), sds(b, g, kv, s, dh), sds(b, g, 1, s, dtype=bool),
            sds(b, kv, p, dh), sds(b, kv, p, dh), sds(b, p, dtype=bool)).compile()
    assert grad.as_text().count("tpu_custom_call") >= 3  # forward, dq, dkv kernels
    assert "tpu_custom_call" in decode.as_text()
