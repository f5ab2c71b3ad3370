"""The update step: group-shared scoring of completions packed by length equals the full
forward of every [prompt, completion] row (values and gradients); the packed update equals
the padded one; one GRPO step and one SFT step run and change the parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import grpo
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.processing import batch as pb
from pr1_jax.rollouts import CompletionShape, completion_extents, pack_completions, rollouts_from_padded
from pr1_jax.train_step import (OptimConfig, completion_log_probs, init_state, make_optimizer, make_sft_fn,
                                make_update_fn)
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


LENGTHS = np.array([[7, 2, 5], [1, 7, 4]])  # [B, G]: each completion's real length (≤ Tc = 7)


def _packed(comp, lengths=LENGTHS):
    mask = np.arange(comp.shape[-1]) < lengths[..., None]
    ext = completion_extents(mask)
    # rows of 8 tokens, and a third row left empty
    packed = pack_completions(comp, ext, int(ext.max()) + 1, 3, 8, PAD)
    return jax.tree.map(jnp.asarray, packed), mask


def test_packed_scoring_equals_full_forward(setup):
    """Completions packed back to back by length: every real token's log-prob and its gradient
    equal the full forward of its own [prompt, completion] row."""
    cfg, params, rows, images, prompts, comp = setup
    model = Qwen2VL(cfg)
    packed, mask = _packed(comp)
    assert packed.tokens.shape == (2, 3, 8) and packed.unpack.shape == (2, 3, 8)
    assert (np.asarray(packed.sample)[:, 2] == -1).all()  # first-fit decreasing: 7 + 1 | 4 and 7 | 5 + 2
    ours_fn = lambda p: completion_log_probs(model, p, jax.tree.map(jnp.asarray, prompts), packed,  # noqa: E731
                                             chunk_size=3)[0][..., :7]
    full_fn = _full_forward_logp(cfg, params, rows, images, comp)
    np.testing.assert_allclose(np.asarray(ours_fn(params))[mask], np.asarray(full_fn(params))[mask], atol=1e-4)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(comp.shape) * mask, jnp.float32)
    g_ours = jax.grad(lambda p: (ours_fn(p) * w).sum())(params)
    g_full = jax.grad(lambda p: (full_fn(p) * w).sum())(params)
    for path, a in hf_io.flatten(g_ours).items():
        b = hf_io.flatten(g_full)[path]
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-3, err_msg=path)


def test_packed_update_equals_padded(setup):
    """The GRPO step on completions packed by length and cut to the longest — each prompt's in
    rows of its own, or a block of prompts sharing its rows, with the block's prompts packed or
    left-padded — equals the step on every completion padded to Tc: loss, metrics and gradients
    (float32, ≤ 1e-6)."""
    cfg, params, _, _, prompts, comp = setup
    model = Qwen2VL(cfg)
    mask = (np.arange(comp.shape[-1]) < LENGTHS[..., None])[None]
    adv = np.asarray([[[1.0, -0.5, 0.2], [0.3, -1.0, 0.7]]], np.float32)
    args = (jax.tree.map(lambda a: a[None], prompts), comp[None], mask, adv,
            np.random.default_rng(3).standard_normal(mask.shape).astype(np.float32), np.ones((1, 2, 3), np.float32))
    packed = rollouts_from_padded(*args, pad_id=PAD)
    padded = rollouts_from_padded(*args, pad_id=PAD, trim=False)
    assert packed.completions.tokens.shape[-2:] == (1, LENGTHS.sum(-1).max())  # one row: all of a group
    assert padded.completions.tokens.shape[-2:] == (3, 7)  # a row per completion
    grpo_cfg = grpo.GRPOConfig(num_generations=3)
    from pr1_jax.train_step import grpo_update

    # lr 1, eps 1: Adam's first step is g/(|g| + 1) ≈ the gradient itself (not its sign), so the
    # parameter change compares the gradients
    opt = make_optimizer(OptimConfig(learning_rate=1.0, eps=1.0, total_steps=10, schedule="constant"))
    ref = jax.tree.map(lambda a: a * 1.01, params)  # a reference unequal to the policy: the KL term counts
    run = lambda b: jax.jit(lambda s, r, x: grpo_update(model, opt, grpo_cfg, s, r, x, chunk_size=4))(  # noqa: E731
        init_state(params, opt), ref, jax.tree.map(jnp.asarray, b))
    blocks = rollouts_from_padded(*args, pad_id=PAD, shape=CompletionShape(length=7, rows=4, row_len=8,
                                                                         prompts_per_block=2))
    # both prompts' completions in one block of 4 rows: 7 | 5 + 2 (prompt 0), 7 + 1 | 4 (prompt 1)
    assert blocks.completions.tokens.shape[-3:] == (1, 4, 8)
    np.testing.assert_array_equal(blocks.completions.group[0, 0], [0, 0, 1, 1])
    # ... and the block's prompts packed back to back (their real tokens, then 5 spare positions)
    real = int(np.asarray(prompts.attention_mask).sum())
    assert real < np.asarray(prompts.attention_mask).size  # left padding to drop
    both = rollouts_from_padded(*args, pad_id=PAD, shape=CompletionShape(length=7, rows=4, row_len=8,
                                                                       prompts_per_block=2, prompt_tokens=real + 5))
    assert both.completions.prompt_pack.shape == (1, 1, real + 5)
    (s1, m1), (s2, m2) = run(packed), run(padded)
    for s, m in (run(blocks), run(both)):
        for k in m1:
            np.testing.assert_allclose(float(m[k]), float(m2[k]), rtol=1e-6, atol=1e-6, err_msg=k)
        for path, a in hf_io.flatten(s.params).items():
            np.testing.assert_allclose(np.asarray(a), np.asarray(hf_io.flatten(s2.params)[path]), atol=1e-6,
                                       err_msg=path)
    assert m1.keys() == m2.keys()
    for k in m1:
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    for path, a in hf_io.flatten(s1.params).items():
        np.testing.assert_allclose(np.asarray(a), np.asarray(hf_io.flatten(s2.params)[path]), atol=1e-6, err_msg=path)


def test_update_with_packed_images_equals_one_image_per_row(setup):
    """The step's images packed into one row (`StepShapes.image_rows`) instead of one per row:
    the same GRPO step — loss, metrics and parameters (float32, ≤ 1e-6)."""
    cfg, params, rows, images, prompts, comp = setup
    sizes = [im[0].shape[0] for im in images]
    packed_prompts = pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=PAD, num_rows=1,
                                     row_of=[0, 0], row_len=-(-sum(sizes) // 64) * 64, image_len=max(sizes))
    prompts = pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=PAD, num_rows=2,
                              row_of=[0, 1])
    assert packed_prompts.image_patches.shape[:2] == (1, 2) and prompts.image_patches.shape[:2] == (2, 1)
    mask = (np.arange(comp.shape[-1]) < LENGTHS[..., None])[None]
    adv = np.asarray([[[1.0, -0.5, 0.2], [0.3, -1.0, 0.7]]], np.float32)
    rest = (comp[None], mask, adv, np.zeros(mask.shape, np.float32), np.ones((1, 2, 3), np.float32))
    from pr1_jax.train_step import grpo_update

    opt = make_optimizer(OptimConfig(learning_rate=1.0, eps=1.0, total_steps=10, schedule="constant"))
    ref = jax.tree.map(lambda a: a * 1.01, params)
    step = jax.jit(lambda s, r, x: grpo_update(Qwen2VL(cfg), opt, grpo.GRPOConfig(num_generations=3), s, r, x,
                                               chunk_size=4))
    run = lambda p: step(init_state(params, opt), ref, jax.tree.map(jnp.asarray, rollouts_from_padded(  # noqa: E731
        jax.tree.map(lambda a: a[None], p), *rest, pad_id=PAD)))
    (s1, m1), (s2, m2) = run(packed_prompts), run(prompts)
    for k in m1:
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    for path, a in hf_io.flatten(s1.params).items():
        np.testing.assert_allclose(np.asarray(a), np.asarray(hf_io.flatten(s2.params)[path]), atol=1e-6, err_msg=path)


def _rollouts(prompts, comp, adv):
    b, g, tc = comp.shape
    return jax.tree.map(jnp.asarray, rollouts_from_padded(
        jax.tree.map(lambda a: a[None], prompts), comp[None], np.ones((1, b, g, tc), bool), adv.reshape(1, b, g),
        np.zeros((1, b, g, tc), np.float32), np.ones((1, b, g), np.float32), pad_id=PAD))


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
    x, (c, mask) = jax.tree.map(jnp.asarray, prompts), _packed(comp)
    w = jnp.asarray(np.pad(np.random.default_rng(2).standard_normal(mask.shape) * mask, [(0, 0), (0, 0), (0, 1)]),
                    jnp.float32)

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
