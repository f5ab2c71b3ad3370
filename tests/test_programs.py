"""The program builder: kernel choices per backend, the micro-batch chosen from the compiled
program's memory, and micro-batching that never changes PR1's update."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import grpo, rollouts, sharding, train_state
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.processing.chat import SpecialTokens
from pr1_jax.programs import Programs, program_bytes, resolve_kernels
from pr1_jax.shapes import StepShapes
from pr1_jax.train_step import OptimConfig, make_optimizer
from tests.helpers import mixed_batch

PAD = 151643
G, TC = 2, 6


@pytest.fixture(scope="module")
def step(sampler_dir):
    """Four prompts (images of three sizes, one text-only) × G=2 completions of mixed lengths."""
    cfg = ModelConfig.from_pretrained(sampler_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(sampler_dir, cfg))
    rows, images, _, _ = mixed_batch(sampler_dir, cfg)
    with_image = [i for i in range(len(rows)) if i != 2]  # every prompt of a step has one image
    prompts = [rollouts.EncodedPrompt(rows[i], images[j], {}) for j, i in enumerate(with_image)]
    prompts = prompts + prompts[:1]
    rng = np.random.default_rng(0)
    comp = rng.integers(0, 150000, (4, G, TC)).astype(np.int32)
    lengths = rng.integers(1, TC + 1, (4, G))
    mask = np.arange(TC) < lengths[..., None]
    adv = rng.standard_normal((4, G)).astype(np.float32)
    special = SpecialTokens.from_pretrained(sampler_dir)
    return cfg, params, prompts, comp, mask, adv, special


def _programs(cfg, mesh, budget, micro=0):
    opt = make_optimizer(OptimConfig(learning_rate=1.0, eps=1.0, schedule="constant"))  # step ≈ gradient
    return Programs(cfg, mesh, dtype=jnp.float32, optimizer=opt, grpo_cfg=grpo.GRPOConfig(num_generations=G),
                    eos_ids=(151645,), pad_id=PAD, kernels=resolve_kernels("auto", "auto", mesh),
                    chunk_size=4, prompts_per_micro=micro, budget=budget)


def _make_batch(step, mesh, longer_rows=0):
    """micro → the step's batch in micro-batches of `micro` prompts (rows `longer_rows` longer
    than chosen: a step of larger shapes)."""
    cfg, params, prompts, comp, mask, adv, special = step
    shapes = StepShapes.from_caps(seq_len=512, patch_row_len=512, max_new_tokens=TC, num_samples=G)
    pshape = rollouts.PromptSize.of(prompts).padded(shapes)
    cshape = rollouts.CompletionShape.choose(rollouts.completion_extents(mask), shapes, pshape.seq_len, 6.5e-5)
    cshape = dataclasses.replace(cshape, row_len=cshape.row_len + longer_rows)
    return lambda micro: sharding.shard_batch(rollouts.assemble(
        prompts, special, pshape, cshape, comp, mask, adv, np.zeros(mask.shape, np.float32),
        np.ones(adv.shape, np.float32), micro), mesh)


def test_kernels_per_backend():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    assert resolve_kernels("auto", "auto", mesh).decode_attention == "xla"  # CPU: no Pallas GPU kernel
    assert resolve_kernels("xla", "pallas", mesh).decode_attention == "pallas"  # named: kept
    with pytest.raises(ValueError, match="decode_attention"):
        resolve_kernels("auto", "flash", mesh)
    # What "auto" picks on other backends (stand-in meshes: resolve_kernels reads only the devices).
    for platform, kind, n, want in (("gpu", "NVIDIA H200", 1, ("auto", "pallas")),
                                    ("gpu", "NVIDIA H200", 8, ("auto", "pallas")),  # under shard_map
                                    ("tpu", "TPU v5 lite", 64, ("splash", "pallas_tpu"))):
        device = types.SimpleNamespace(platform=platform, device_kind=kind)
        fake = types.SimpleNamespace(devices=np.array([device] * n), size=n)
        kernels = resolve_kernels("auto", "auto", fake)
        assert (kernels.attention, kernels.decode_attention) == want, (platform, n)


def test_micro_batch_from_memory_and_equal_updates(step):
    """No budget (CPU): all 4 prompts in one micro-batch; with a budget, the first candidate whose
    compiled memory fits. Whatever the micro-batching, the step's metrics and update are equal."""
    cfg, params = step[:2]
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    make_batch = _make_batch(step, mesh)
    new_state = lambda p: train_state.init_train_state(params, p.optimizer, mesh, cfg=cfg)  # noqa: E731

    free = _programs(cfg, mesh, budget=None)
    assert free.update_batch(new_state(free), params, make_batch, 4, 1).advantages.shape[:2] == (1, 4)
    need = {b: program_bytes(free.lower_update(new_state(free), params, make_batch(b)).compile()) for b in (4, 2, 1)}
    # The first candidate (most prompts per micro-batch first) that fits is taken; none fits → the last.
    for budget in (min(need.values()), (need[4] + need[2]) / 2, min(need.values()) - 1):
        expected = next((b for b in (4, 2, 1) if need[b] <= budget), 1)
        p = _programs(cfg, mesh, budget=budget)
        batch = p.update_batch(new_state(p), params, make_batch, 4, 1)
        assert batch.advantages.shape[:2] == (4 // expected, expected), (budget, need)
        # The compile event covers every candidate compiled to find it (accounting's update compile time).
        tried = (4, 2, 1).index(expected) + 1
        assert [e["count"] for e in p.compile_events if e["program"] == "update"] == [tried], p.compile_events
        assert p.update_batch(new_state(p), params, make_batch, 4, 1).advantages.shape[1] == expected  # kept
        if expected == 2:
            # A later step of larger shapes: 4 prompts per micro-batch did not fit at smaller ones,
            # so it is not compiled again (one compile, of the 2-prompt candidate, which fits).
            p.update_batch(new_state(p), params, _make_batch(step, mesh, longer_rows=16), 4, 1)
            assert [e["count"] for e in p.compile_events if e["program"] == "update"] == [2, 1], p.compile_events

    results = {}
    for micro in (4, 2, 1):
        p = _programs(cfg, mesh, budget=None, micro=micro)
        state, m = p.update(new_state(p), params, p.update_batch(new_state(p), params, make_batch, 4, 1))
        results[micro] = (jax.device_get(m), jax.device_get(state.params))
    for micro in (2, 1):
        for k, v in results[4][0].items():
            if k != "loss_weight_sum":  # a per-micro-batch denominator: 4 prompts' worth vs 2 vs 1
                np.testing.assert_allclose(results[micro][0][k], v, rtol=1e-5, atol=1e-6, err_msg=f"{micro}: {k}")
        for a, b in zip(jax.tree.leaves(results[micro][1]), jax.tree.leaves(results[4][1])):
            np.testing.assert_allclose(a, b, atol=2e-6)


def test_compile_cache_from_the_config_unless_one_is_set(tmp_path):
    """`python -m pr1_jax.train` turns on JAX's persistent cache at `compile_cache`; a cache
    already set (here the test session's, or JAX_COMPILATION_CACHE_DIR) is kept; "" is off."""
    from pr1_jax.programs import enable_compile_cache

    before = jax.config.jax_compilation_cache_dir
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    assert before and enable_compile_cache(str(tmp_path / "other")) == before
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert enable_compile_cache("") is None and not jax.config.jax_compilation_cache_dir
        assert enable_compile_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
