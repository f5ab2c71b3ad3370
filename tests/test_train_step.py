"""The update step: group-shared scoring equals the full forward of every [prompt, completion]
row (values and gradients); one GRPO step and one SFT step run and change the parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import grpo
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.processing import batch as pb
from pr1_jax.train_step import (OptimConfig, Rollouts, completion_log_probs, init_state, make_optimizer,
                                make_sft_fn, make_update_fn)
from tests.helpers import mixed_batch

PAD = 151643


@pytest.fixture(scope="module")
def setup(sampler_dir):
    cfg = ModelConfig.from_pretrained(sampler_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(sampler_dir, cfg))
    rows, images, _, _ = mixed_batch(sampler_dir, cfg)
    rows, images = [rows[0], rows[1]], images[:2]  # two prompts with images of different sizes
    prompts = pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=PAD)
    comp = np.random.default_rng(0).integers(0, 150000, (2, 3, 7)).astype(np.int32)  # B=2, G=3, Tc=7
    return cfg, params, rows, images, prompts, comp


def _full_forward_logp(cfg, params, rows, images, comp):
    b, g, tc = comp.shape
    full_rows = [np.concatenate([rows[i], comp[i, j]]) for i in range(b) for j in range(g)]
    full_images = [images[i] for i in range(b) for _ in range(g)]
    inputs = jax.tree.map(jnp.asarray, pb.build_inputs(full_rows, full_images, image_token_id=cfg.image_token_id,
                                                       pad_id=PAD))

    def logp_fn(p):
        logits = Qwen2VL(cfg).apply({"params": p}, inputs)[:, -tc - 1:-1]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return jnp.take_along_axis(lp, jnp.asarray(comp.reshape(b * g, tc, 1)), -1)[..., 0].reshape(b, g, tc)

    return logp_fn


def test_group_scoring_equals_full_forward(setup):
    cfg, params, rows, images, prompts, comp = setup
    model = Qwen2VL(cfg)
    ours_fn = lambda p: completion_log_probs(model, p, jax.tree.map(jnp.asarray, prompts), jnp.asarray(comp),  # noqa: E731
                                             chunk_size=3)[0]
    full_fn = _full_forward_logp(cfg, params, rows, images, comp)
    np.testing.assert_allclose(np.asarray(ours_fn(params)), np.asarray(full_fn(params)), atol=1e-4)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(comp.shape), jnp.float32)
    g_ours = jax.grad(lambda p: (ours_fn(p) * w).sum())(params)
    g_full = jax.grad(lambda p: (full_fn(p) * w).sum())(params)
    for path, a in hf_io.flatten(g_ours).items():
        b = hf_io.flatten(g_full)[path]
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-3, err_msg=path)


def _rollouts(prompts, comp, adv):
    b, g, tc = comp.shape
    return jax.tree.map(jnp.asarray, Rollouts(
        prompts=jax.tree.map(lambda a: a[None], prompts), completions=comp[None], mask=np.ones((1, b, g, tc), bool),
        advantages=adv.reshape(1, b, g), old_logp=np.zeros((1, b, g, tc), np.float32),
        group_weight=np.ones((1, b, g), np.float32)))


def test_one_grpo_and_one_sft_step(setup):
    cfg, params, _, _, prompts, comp = setup
    model = Qwen2VL(cfg)
    opt = make_optimizer(OptimConfig(learning_rate=1e-3, total_steps=10))
    update = make_update_fn(model, opt, grpo.GRPOConfig(num_generations=3), chunk_size=4)
    rewards = jnp.asarray([1.0, 0.0, 0.5, 0.2, 0.2, 0.9])
    adv, _ = grpo.group_advantages(rewards, grpo.GRPOConfig(num_generations=3))
    state = init_state(jax.tree.map(jnp.copy, params), opt)
    before = np.asarray(params["decoder"]["layers"]["q_proj"]["kernel"]).copy()
    state, m = update(state, params, _rollouts(prompts, comp, np.asarray(adv)))
    assert int(state.step) == 1 and np.isfinite(float(m["loss"])) and float(m["skipped_nonfinite"]) == 0
    assert abs(float(m["kl"])) < 1e-6  # policy == reference before the first update
    assert not np.allclose(np.asarray(state.params["decoder"]["layers"]["q_proj"]["kernel"]), before)
    sft = make_sft_fn(model, opt, chunk_size=4)
    s2, m2 = sft(init_state(jax.tree.map(jnp.copy, params), opt),
                 _rollouts(prompts, comp[:, :1], np.zeros((2, 1), np.float32)))
    assert np.isfinite(float(m2["loss"])) and float(m2["loss"]) > 0


def test_remat_policies_keep_values_and_gradients(setup):
    """Every remat policy (opt-in; the default recomputes whole layers) changes only what the
    backward pass stores, never the log-probs or their gradients."""
    cfg, params, _, _, prompts, comp = setup
    x, c = jax.tree.map(jnp.asarray, prompts), jnp.asarray(comp)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(comp.shape), jnp.float32)

    def value_and_grad(model):
        return jax.jit(jax.value_and_grad(lambda p: (completion_log_probs(model, p, x, c, chunk_size=4)[0] * w).sum()))(
            params)

    v0, g0 = value_and_grad(Qwen2VL(cfg))
    for kw in (dict(remat_policy="full"), dict(remat_policy="dots", vision_remat_policy="none"),
               dict(remat_policy="dots_flash", scan_unroll=2, vision_scan_unroll=2,
                    attention="auto")):  # auto: xla on CPU
        v, g = value_and_grad(Qwen2VL(cfg, remat=True, **kw))
        np.testing.assert_allclose(float(v), float(v0), rtol=1e-5, err_msg=str(kw))
        for path, a in hf_io.flatten(g).items():
            np.testing.assert_allclose(np.asarray(a), np.asarray(hf_io.flatten(g0)[path]), atol=2e-4, rtol=2e-3,
                                       err_msg=f"{kw} {path}")
    with pytest.raises(ValueError, match="unknown remat policy"):
        Qwen2VL(cfg, remat=True, remat_policy="dot").apply({"params": params}, x)
    with pytest.raises(ValueError, match="unknown attention"):
        Qwen2VL(cfg, attention="flash").apply({"params": params}, x)
