"""GRPO against an independent PyTorch re-derivation of PR1's trainer (docs/method.md §3.4–3.10).

The torch side is written from the spec, not from pr1_jax.grpo: torch's unbiased `.std()`,
the first-<|im_end|> mask, per-sequence token mean then batch mean, autograd gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pr1_jax import grpo
from pr1_jax.grpo import GRPOConfig

G = 8
EOS, PAD = 5, 7
TOL = dict(rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- torch reference


def torch_advantages(r, *, g=G, eps=1e-4, scale=1.0, no_mean=False, fullkimi=False):
    r = scale * torch.as_tensor(r, dtype=torch.float32)
    mean = r.view(-1, g).mean(dim=1).repeat_interleave(g)
    std = r.view(-1, g).std(dim=1).repeat_interleave(g)  # unbiased (N − 1)
    if no_mean:
        m = (std != 0).float()
        return ((r - m * mean) / (std + eps)).clamp(-1, 1)
    if fullkimi:
        return r - mean
    return (r - mean) / (std + eps)


def torch_mask(ids, eos):
    ids = torch.as_tensor(ids)
    is_eos = ids == eos
    idx = torch.full((ids.size(0),), ids.size(1), dtype=torch.long)
    found = is_eos.any(dim=1)
    idx[found] = is_eos.int().argmax(dim=1)[found]
    return (torch.arange(ids.size(1)).expand(ids.size(0), -1) <= idx.unsqueeze(1)).int()


def torch_loss(logp, ref, adv, mask, *, kl="k3", use_kl=True, beta=0.04, entropy=None, entropy_weight=None,
               old=None, eps_lo=0.2, eps_hi=0.2, token_mean=False, weight=None):
    """Returns (loss, d loss/d logp, d loss/d entropy or None) as NumPy."""
    logp = torch.tensor(logp, dtype=torch.float32, requires_grad=True)
    ref = torch.tensor(ref, dtype=torch.float32)
    a = torch.tensor(np.array(adv), dtype=torch.float32).unsqueeze(1)
    mask = torch.as_tensor(mask, dtype=torch.float32)
    if kl == "fullkimi":
        per_tok = -torch.exp(logp) * a
    elif old is None:
        per_tok = -torch.exp(logp - logp.detach()) * a
    else:
        ratio = torch.exp(logp - torch.tensor(old, dtype=torch.float32))
        per_tok = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * a)
    if use_kl:
        if kl == "k1":
            k = logp - ref
        elif kl == "k3":
            k = torch.exp(ref - logp) - (ref - logp) - 1
        else:
            k = 0.5 * (logp - ref) ** 2
        per_tok = per_tok + beta * k
    ent = None
    if entropy_weight is not None:
        ent = torch.tensor(entropy, dtype=torch.float32, requires_grad=True)
        per_tok = per_tok + entropy_weight * (-ent)
    w = torch.ones(mask.size(0)) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    if token_mean:
        loss = (per_tok * mask * w[:, None]).sum() / (mask * w[:, None]).sum()
    else:
        seq = (per_tok * mask).sum(dim=1) / mask.sum(dim=1)
        loss = (seq * w).sum() / w.sum()
    loss.backward()
    return (loss.item(), logp.grad.numpy(), None if ent is None else ent.grad.numpy())


# ----------------------------------------------------------------------------- inputs


def make_batch(seed=0, n_groups=4, t=12, equal_value=0.5):
    """Rewards with: a continuous group, a binary group with ties, an all-`equal_value` group,
    an all-zero group (then more continuous ones); tokens with EOS at random places, some rows
    without EOS (PR1 quirk: whole row counts); log-probs and entropies."""
    rng = np.random.default_rng(seed)
    n = n_groups * G
    groups = [rng.uniform(0, 2, G), rng.integers(0, 2, G).astype(float), np.full(G, equal_value), np.zeros(G)]
    groups += [rng.uniform(-1, 1, G) for _ in range(n_groups - 4)]
    rewards = np.concatenate(groups[:n_groups]).astype(np.float32)
    tokens = rng.integers(8, 30, (n, t))
    for i in range(n):
        if rng.random() < 0.7:  # EOS somewhere (position 0 and T−1 included), else none
            e = rng.integers(0, t)
            tokens[i, e] = EOS
            tokens[i, e + 1:] = np.where(rng.random(t - e - 1) < 0.3, EOS, PAD)  # later EOS ignored
    tokens[0, :] = 9  # no EOS at all
    tokens[1, 0] = EOS  # EOS first
    logp = -rng.uniform(0.01, 4.0, (n, t)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.4, (n, t))).astype(np.float32)
    ref = np.minimum(ref, -1e-3).astype(np.float32)
    entropy = rng.uniform(0, 3, (n, t)).astype(np.float32)
    return rewards, tokens.astype(np.int32), logp, ref, entropy


def jax_loss_and_grads(logp, ref, adv, mask, cfg, **kw):
    ent = kw.pop("entropy_bt", None)

    def f(lp, en):
        return grpo.per_token_loss(lp, jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask), cfg,
                                   entropy_bt=en, **kw)

    (loss, metrics), (g_logp, g_ent) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(logp), None if ent is None else jnp.asarray(ent))
    return float(loss), np.asarray(g_logp), None if g_ent is None else np.asarray(g_ent), metrics


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("mode", ["default", "no_mean", "fullkimi", "no_mean+fullkimi"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_advantages_match_torch(mode, scale):
    equal_value = 0.3 if "no_mean" in mode else 0.5  # 0.5: torch's mean is exact (see below)
    rewards = make_batch(seed=1, n_groups=6, equal_value=equal_value)[0]
    cfg = GRPOConfig(no_mean_for_same_reward="no_mean" in mode,
                     kl_approximator="fullkimi" if "fullkimi" in mode else "k3", reward_scale=scale)
    adv, stats = grpo.group_advantages(jnp.asarray(rewards), cfg)
    ref = torch_advantages(rewards, scale=scale, no_mean=cfg.no_mean_for_same_reward,
                           fullkimi="fullkimi" in mode and "no_mean" not in mode).numpy()
    np.testing.assert_allclose(np.asarray(adv), ref, rtol=1e-5, atol=1e-5)
    r = scale * rewards.reshape(-1, G)
    np.testing.assert_allclose(np.asarray(stats["std_g"]), r.std(axis=1, ddof=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["mean_g"]), r.mean(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats["zero_std_g"]), [False, False, True, True, False, False])
    np.testing.assert_allclose(float(stats["reward_std"]), r.std(axis=1, ddof=1).mean(), rtol=1e-5)
    if "no_mean" in mode:  # all-equal groups: +1 for r > 0, 0 for r = 0
        np.testing.assert_array_equal(np.asarray(adv)[2 * G:3 * G], 1.0)
        np.testing.assert_array_equal(np.asarray(adv)[3 * G:4 * G], 0.0)
        assert np.abs(np.asarray(adv)).max() <= 1.0


def test_advantages_ddof_is_one_and_not_clamped():
    r = np.array([0, 1] * 4, np.float32)
    adv, stats = grpo.group_advantages(jnp.asarray(r), GRPOConfig())
    std1 = np.sqrt(8 * 0.25 / 7)  # unbiased: Σ(r − ½)² / (G − 1)
    assert float(stats["std_g"][0]) == pytest.approx(std1, rel=1e-6)
    np.testing.assert_allclose(np.asarray(adv), (r - 0.5) / (std1 + 1e-4), rtol=1e-6)
    big = np.array([10, 0, 0, 0, 0, 0, 0, 0], np.float32)  # default mode: |A| > 1 survives
    assert float(grpo.group_advantages(jnp.asarray(big), GRPOConfig())[0][0]) > 2.4


def test_all_equal_group_is_exactly_zero():
    """torch's mean of 8 × 0.3 is off by an ulp, so PR1 gives |A| ~ 1e-4 noise; we give exact 0."""
    r = np.full(G, 0.3, np.float32)
    adv, stats = grpo.group_advantages(jnp.asarray(r), GRPOConfig())
    assert np.all(np.asarray(adv) == 0.0) and float(stats["std_g"][0]) == 0.0
    assert np.abs(torch_advantages(r).numpy()).max() < 1e-2  # PR1's noise, for the record


def test_advantages_skip_zero_std_weights_and_shape_errors():
    rewards = make_batch(seed=2, n_groups=4)[0]
    _, stats = grpo.group_advantages(jnp.asarray(rewards), GRPOConfig(skip_zero_std_groups=True))
    np.testing.assert_array_equal(np.asarray(stats["loss_weight"]), np.repeat([1, 1, 0, 0], G))
    assert float(stats["frac_zero_std"]) == 0.5
    _, stats = grpo.group_advantages(jnp.asarray(rewards), GRPOConfig())
    np.testing.assert_array_equal(np.asarray(stats["loss_weight"]), 1.0)
    with pytest.raises(ValueError, match="multiple of G"):
        grpo.group_advantages(jnp.zeros(12), GRPOConfig())


# ----------------------------------------------------------------------------- mask


def test_completion_mask_pr1_quirk():
    tokens = make_batch(seed=3)[1]
    mask = grpo.completion_mask(jnp.asarray(tokens), EOS)
    np.testing.assert_array_equal(np.asarray(mask), torch_mask(tokens, EOS).numpy().astype(bool))
    assert np.asarray(mask)[0].all()  # no EOS: the whole row, padding included
    assert np.asarray(mask)[1].tolist() == [True] + [False] * 11  # EOS itself counts


def test_completion_mask_without_quirk():
    tokens = np.array([[3, 4, EOS, PAD, PAD],  # EOS: up to and including it (as PR1)
                       [3, 4, 6, PAD, PAD],  # stopped on another token, then padding
                       [3, 4, 6, 8, 9],  # truncated at max tokens
                       [PAD, PAD, PAD, PAD, PAD],  # nothing generated
                       [3, 4, PAD, PAD, PAD]], np.int32)  # stopped on <|endoftext|> == pad id
    lengths = np.array([3, 3, 5, 0, 3])
    want = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], bool)
    got = grpo.completion_mask(jnp.asarray(tokens), EOS, pr1_mask_quirk=False, lengths_b=jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(got), want)
    got = grpo.completion_mask(jnp.asarray(tokens), EOS, PAD, pr1_mask_quirk=False)
    want[4, 2] = False  # by pad id, the final <|endoftext|> looks like padding (documented)
    np.testing.assert_array_equal(np.asarray(got), want)
    quirk = np.asarray(grpo.completion_mask(jnp.asarray(tokens), EOS))
    assert quirk[1:].all()  # PR1 counts all of rows 1–4
    with pytest.raises(ValueError, match="lengths_b or pad_id"):
        grpo.completion_mask(jnp.asarray(tokens), EOS, pr1_mask_quirk=False)


# ----------------------------------------------------------------------------- loss vs torch


@pytest.mark.parametrize("kl", ["k3", "k1", "kimikl", "fullkimi"])
@pytest.mark.parametrize("entropy_reg", [False, True])
@pytest.mark.parametrize("no_mean", [False, True])
def test_loss_and_grads_match_torch(kl, entropy_reg, no_mean):
    rewards, tokens, logp, ref, entropy = make_batch(seed=4, n_groups=5, equal_value=0.3 if no_mean else 0.5)
    cfg = GRPOConfig(kl_approximator=kl, entropy_reg=entropy_reg, no_mean_for_same_reward=no_mean)
    adv_t = torch_advantages(rewards, no_mean=no_mean, fullkimi=kl == "fullkimi" and not no_mean).numpy()
    mask_t = torch_mask(tokens, EOS).numpy()
    want = torch_loss(logp, ref, adv_t, mask_t, kl=kl, entropy=entropy,
                      entropy_weight=0.01 if entropy_reg else None)

    adv, _ = grpo.group_advantages(jnp.asarray(rewards), cfg)
    mask = grpo.completion_mask(jnp.asarray(tokens), EOS)
    loss, g_logp, g_ent, metrics = jax_loss_and_grads(logp, ref, adv, mask, cfg, entropy_bt=entropy)
    assert loss == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g_logp, want[1], **TOL)
    if entropy_reg:
        np.testing.assert_allclose(g_ent, want[2], **TOL)
    else:
        np.testing.assert_array_equal(g_ent, 0.0)

    # Metrics: per-sequence masked mean, then batch mean.
    m = mask_t.astype(np.float64)
    seq_mean = lambda x: ((x * m).sum(1) / m.sum(1)).mean()
    d = logp.astype(np.float64) - ref
    k3 = np.exp(-d) + d - 1
    used = {"k1": d, "k3": k3, "kimikl": 0.5 * d ** 2, "fullkimi": 0.5 * d ** 2}[kl]
    for name, val in [("kl", used), ("k1", d), ("k3", k3), ("kimi", 0.5 * d ** 2), ("entropy", entropy)]:
        assert float(metrics[name]) == pytest.approx(seq_mean(val), rel=1e-5), name
    ppl = np.exp(-((logp * m).sum(1) / m.sum(1))).mean()
    assert float(metrics["ppl"]) == pytest.approx(ppl, rel=1e-5)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["completion_length"]) == pytest.approx(m.sum(1).mean())


def test_pr1_gradient_closed_form():
    """d loss/d logp = (−A + β(1 − exp(ref − logp)))·mask / (|o_b|·B) for the defaults."""
    rewards, tokens, logp, ref, _ = make_batch(seed=5)
    cfg = GRPOConfig()
    adv, _ = grpo.group_advantages(jnp.asarray(rewards), cfg)
    mask = np.asarray(grpo.completion_mask(jnp.asarray(tokens), EOS), np.float32)
    loss, g, _, _ = jax_loss_and_grads(logp, ref, adv, mask, cfg)
    a = np.asarray(adv)[:, None]
    want = (-a + 0.04 * (1 - np.exp(ref - logp))) * mask / (mask.sum(1, keepdims=True) * len(mask))
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_use_kl_off_and_no_reference():
    rewards, tokens, logp, ref, _ = make_batch(seed=6)
    cfg = GRPOConfig(use_kl=False)
    adv, _ = grpo.group_advantages(jnp.asarray(rewards), cfg)
    mask_t = torch_mask(tokens, EOS).numpy()
    want = torch_loss(logp, ref, np.asarray(adv), mask_t, use_kl=False)
    loss, g, _, metrics = jax_loss_and_grads(logp, ref, adv, mask_t, cfg)
    assert loss == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g, want[1], **TOL)
    assert "kl" in metrics  # still logged when a reference is given
    loss2, _ = grpo.per_token_loss(jnp.asarray(logp), None, adv, jnp.asarray(mask_t), cfg)
    assert float(loss2) == pytest.approx(loss, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp_bt is required"):
        grpo.per_token_loss(jnp.asarray(logp), None, adv, jnp.asarray(mask_t), GRPOConfig())
    with pytest.raises(ValueError, match="entropy_bt is required"):
        grpo.per_token_loss(jnp.asarray(logp), jnp.asarray(ref), adv, jnp.asarray(mask_t),
                            GRPOConfig(entropy_reg=True))


# ----------------------------------------------------------------------------- beyond PR1


def test_token_mean_aggregation():
    rewards, tokens, logp, ref, entropy = make_batch(seed=7)
    cfg = GRPOConfig(loss_aggregation="token_mean", entropy_reg=True)
    adv, _ = grpo.group_advantages(jnp.asarray(rewards), cfg)
    mask_t = torch_mask(tokens, EOS).numpy()
    want = torch_loss(logp, ref, np.asarray(adv), mask_t, entropy=entropy, entropy_weight=0.01, token_mean=True)
    loss, g, g_ent, metrics = jax_loss_and_grads(logp, ref, adv, mask_t, cfg, entropy_bt=entropy)
    assert loss == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g, want[1], **TOL)
    np.testing.assert_allclose(g_ent, want[2], **TOL)
    assert float(metrics["loss_weight_sum"]) == mask_t.sum()
    seq, *_ = jax_loss_and_grads(logp, ref, adv, mask_t, GRPOConfig(entropy_reg=True), entropy_bt=entropy)
    assert abs(seq - loss) > 1e-4  # the two aggregations really differ on ragged lengths


@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_ppo_clipping(eps_high, aggregation):
    rewards, tokens, logp, ref, _ = make_batch(seed=8)
    rng = np.random.default_rng(0)
    old = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)  # ratio ≠ 1
    cfg = GRPOConfig(num_iterations=2, epsilon=0.2, epsilon_high=eps_high, loss_aggregation=aggregation)
    hi = cfg.eps_high
    assert hi == (0.2 if eps_high is None else 0.28)
    adv, _ = grpo.group_advantages(jnp.asarray(rewards), cfg)
    mask_t = torch_mask(tokens, EOS).numpy()
    a = np.asarray(adv)
    want = torch_loss(logp, ref, a, mask_t, old=old, eps_lo=0.2, eps_hi=hi, token_mean=aggregation == "token_mean")
    loss, g, _, metrics = jax_loss_and_grads(logp, ref, adv, mask_t, cfg, old_logp_bt=jnp.asarray(old))
    assert loss == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g, want[1], **TOL)

    ratio = np.exp(logp - old)
    clipped = ((ratio > 1 + hi) & (a[:, None] > 0)) | ((ratio < 1 - 0.2) & (a[:, None] < 0))
    frac = (clipped * mask_t).sum() / mask_t.sum()
    assert 0.05 < frac < 0.95
    assert float(metrics["clip_fraction"]) == pytest.approx(frac, rel=1e-6)
    # Clipped tokens get no policy gradient: with β = 0 their gradient is exactly zero.
    cfg0 = dataclasses.replace(cfg, beta=0.0)
    _, g0, _, _ = jax_loss_and_grads(logp, ref, adv, mask_t, cfg0, old_logp_bt=jnp.asarray(old))
    sel = clipped & (mask_t > 0)
    assert np.all(g0[sel] == 0.0)
    assert np.all(g0[~clipped & (mask_t > 0) & (np.abs(a[:, None]) > 1e-3)] != 0.0)


def test_ratio_one_reproduces_pr1():
    """old_logp = logp (μ = 1 on the rollout's own log-probs): the clipped form equals PR1's."""
    rewards, tokens, logp, ref, _ = make_batch(seed=9)
    cfg = GRPOConfig()
    adv, _ = grpo.group_advantages(jnp.asarray(rewards), cfg)
    mask = grpo.completion_mask(jnp.asarray(tokens), EOS)
    l1, g1, _, _ = jax_loss_and_grads(logp, ref, adv, mask, cfg)
    l2, g2, _, m2 = jax_loss_and_grads(logp, ref, adv, mask, cfg, old_logp_bt=jnp.asarray(logp))
    assert l1 == pytest.approx(l2, rel=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-9)
    assert float(m2["clip_fraction"]) == 0.0
    with pytest.raises(ValueError, match="fullkimi"):
        grpo.per_token_loss(jnp.asarray(logp), jnp.asarray(ref), adv, mask, GRPOConfig(kl_approximator="fullkimi"),
                            old_logp_bt=jnp.asarray(logp))


@pytest.mark.parametrize("mu", [1, 2])
def test_sampler_logp_gap_is_a_metric_only(mu):
    """The rollout's log-probs given for the gap metric leave the loss and its gradient bit-equal
    (μ = 1: PR1's ratio-free loss; μ = 2: the clipped loss on old_logp), and the metric is
    mean |sampler − logp| over the masked tokens the sampler decoded (not its 0 on padding)."""
    rewards, tokens, logp, ref, entropy = make_batch(seed=12)
    rng = np.random.default_rng(1)
    sampler = np.minimum(logp + rng.normal(0, 0.05, logp.shape), -1e-4).astype(np.float32)
    tokens[0, 3:] = PAD  # row 0 has no EOS: it stopped on <|endoftext|> (the pad id), then padding
    mask = np.asarray(grpo.completion_mask(jnp.asarray(tokens), EOS))
    padding = tokens == PAD
    assert (mask & padding).sum() >= 3  # padding that PR1's mask counts: the sampler wrote 0 there
    sampler[padding] = 0.0
    cfg = GRPOConfig(num_iterations=mu, entropy_reg=True)
    adv, _ = grpo.group_advantages(jnp.asarray(rewards), cfg)
    old = {"old_logp_bt": jnp.asarray(sampler)} if mu > 1 else {}
    base = jax_loss_and_grads(logp, ref, adv, mask, cfg, entropy_bt=entropy, **old)
    with_gap = jax_loss_and_grads(logp, ref, adv, mask, cfg, entropy_bt=entropy, sampler_logp_bt=sampler, **old)
    assert with_gap[0] == base[0]
    np.testing.assert_array_equal(with_gap[1], base[1])
    np.testing.assert_array_equal(with_gap[2], base[2])
    assert "sampler_logp_gap" not in base[3]
    assert {k: float(v) for k, v in with_gap[3].items() if k != "sampler_logp_gap"} == \
        {k: float(v) for k, v in base[3].items()}
    decoded = mask & ~padding
    want = np.abs(sampler.astype(np.float64) - logp)[decoded].mean()
    assert float(with_gap[3]["sampler_logp_gap"]) == pytest.approx(want, rel=1e-5)
    assert 0.02 < want < 0.06  # the injected N(0, 0.05) noise, padding left out (it would add ~2)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_skip_zero_std_groups(aggregation):
    rewards, tokens, logp, ref, _ = make_batch(seed=10, n_groups=5)
    cfg = GRPOConfig(skip_zero_std_groups=True, loss_aggregation=aggregation)
    adv, stats = grpo.group_advantages(jnp.asarray(rewards), cfg)
    w = np.asarray(stats["loss_weight"])
    mask_t = torch_mask(tokens, EOS).numpy()
    keep = w > 0
    # Reference: the loss over the kept sequences only.
    want = torch_loss(logp[keep], ref[keep], np.asarray(adv)[keep], mask_t[keep],
                      token_mean=aggregation == "token_mean")
    loss, g, _, _ = jax_loss_and_grads(logp, ref, adv, mask_t, cfg, group_weight_b=stats["loss_weight"])
    assert loss == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g[keep], want[1], **TOL)
    assert np.all(g[~keep] == 0.0)  # no KL pull either on skipped groups
    with pytest.raises(ValueError, match="group_weight_b"):
        grpo.per_token_loss(jnp.asarray(logp), jnp.asarray(ref), adv, jnp.asarray(mask_t), cfg)
    # Everything skipped: loss 0, not NaN.
    loss0, _ = grpo.per_token_loss(jnp.asarray(logp), jnp.asarray(ref), adv, jnp.asarray(mask_t), cfg,
                                   group_weight_b=jnp.zeros(len(w)))
    assert float(loss0) == 0.0


def test_jit_pipeline_matches_eager():
    rewards, tokens, logp, ref, entropy = make_batch(seed=11)
    cfg = GRPOConfig(entropy_reg=True)

    def step(rewards, tokens, logp, ref, entropy):
        adv, stats = grpo.group_advantages(rewards, cfg)
        mask = grpo.completion_mask(tokens, EOS)
        return grpo.per_token_loss(logp, ref, adv, mask, cfg, entropy_bt=entropy, group_weight_b=stats["loss_weight"])

    args = tuple(map(jnp.asarray, (rewards, tokens, logp, ref, entropy)))
    eager, _ = step(*args)
    jitted, metrics = jax.jit(step)(*args)
    assert float(jitted) == pytest.approx(float(eager), rel=1e-6)
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


# ----------------------------------------------------------------------------- temperature


def test_temperature_schedule():
    assert grpo.temperature_at(123, GRPOConfig()) == 0.9
    assert grpo.temperature_at(0, GRPOConfig(temperature=1.0)) == 1.0
    cfg = GRPOConfig(temperature_func="linear")
    # PR1's total: len(dataset)·G / per_device_batch = micro-batches of one rank (not optimizer steps).
    total = grpo.pr1_linear_total_steps(num_examples=5000, num_generations=8, per_device_batch=8)
    assert total == 5000
    # Grounding: 5000 prompts / (7 ranks × GA 2) ≈ 357 optimizer steps → the schedule ends near 0.164.
    assert grpo.temperature_at(0, cfg, total) == pytest.approx(0.1)
    assert grpo.temperature_at(357, cfg, total) == pytest.approx(0.1 + 0.9 * 357 / 5000)
    assert grpo.temperature_at(2500, cfg, total) == pytest.approx(0.55)
    assert grpo.temperature_at(9999, cfg, total) == pytest.approx(1.0)  # clipped at T_end
    traced = jax.jit(lambda s: grpo.temperature_at(s, cfg, total))(jnp.int32(357))
    assert float(traced) == pytest.approx(0.1 + 0.9 * 357 / 5000, rel=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        grpo.temperature_at(1, cfg)


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_pr1():
    c = GRPOConfig()
    assert (c.num_generations, c.beta, c.use_kl, c.kl_approximator, c.std_eps) == (8, 0.04, True, "k3", 1e-4)
    assert (c.no_mean_for_same_reward, c.entropy_reg, c.entropy_weight, c.reward_scale) == (False, False, 0.01, 1.0)
    assert (c.temperature_func, c.temperature, c.temperature_begin, c.temperature_end) == ("constant", 0.9, 0.1, 1.0)
    assert (c.num_iterations, c.loss_aggregation, c.skip_zero_std_groups, c.pr1_mask_quirk) == \
        (1, "sequence_mean", False, True)
    hash(c)  # usable as a jit static argument


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_generations=1), "num_generations"),
    (dict(num_generations=0), "num_generations"),
    (dict(kl_approximator="k2"), "kl_approximator"),
    (dict(loss_aggregation="sum"), "loss_aggregation"),
    (dict(temperature_func="cosine"), "temperature_func"),
    (dict(beta=-0.1), "beta"),
    (dict(std_eps=0.0), "std_eps"),
    (dict(reward_scale=0.0), "reward_scale"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature_begin=1.0, temperature_end=0.5), "temperature_begin"),
    (dict(num_iterations=0), "num_iterations"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=1.0), "epsilon"),
    (dict(epsilon_high=-0.1), "epsilon_high"),
    (dict(kl_approximator="fullkimi", use_kl=False), "fullkimi"),
    (dict(kl_approximator="fullkimi", num_iterations=2), "fullkimi"),
    (dict(skip_zero_std_groups=True, no_mean_for_same_reward=True), "skip_zero_std_groups"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


# ----------------------------------------------------------------------------- log-probs


def test_token_log_probs_matches_torch():
    rng = np.random.default_rng(12)
    logits = rng.normal(0, 3, (3, 7, 50)).astype(np.float32)
    targets = rng.integers(0, 50, (3, 7))
    logp, ent = grpo.token_log_probs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(targets))
    lt = torch.log_softmax(torch.tensor(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))), -1)
    np.testing.assert_allclose(np.asarray(logp), lt.gather(-1, torch.tensor(targets)[..., None])[..., 0].numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(ent), -(lt.exp() * lt).sum(-1).numpy(), rtol=1e-5, atol=1e-5)
    assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
    # Gradients w.r.t. the logits (the loss uses log-probs, an entropy bonus the entropy).
    ca, cb = rng.normal(size=(3, 7)).astype(np.float32), rng.normal(size=(3, 7)).astype(np.float32)
    g = jax.grad(lambda z: jnp.sum(ca * grpo.token_log_probs(z, jnp.asarray(targets))[0]
                                   + cb * grpo.token_log_probs(z, jnp.asarray(targets))[1]))(jnp.asarray(logits))
    zt = torch.tensor(logits, requires_grad=True)
    lt = torch.log_softmax(zt, -1)
    (torch.tensor(ca) * lt.gather(-1, torch.tensor(targets)[..., None])[..., 0]
     - torch.tensor(cb) * (lt.exp() * lt).sum(-1)).sum().backward()
    np.testing.assert_allclose(np.asarray(g), zt.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_log_probs_equal_unchunked(chunk):
    rng = np.random.default_rng(13)
    b, t, d, v = 2, 13, 16, 40
    hidden = jnp.asarray(rng.normal(0, 1, (b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 0.5, (d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    ca, cb = jnp.asarray(rng.normal(size=(b, t)), jnp.float32), jnp.asarray(rng.normal(size=(b, t)), jnp.float32)

    def objective(hidden, w, chunked):
        fn = lambda h: h @ w
        if chunked:
            lp, en = grpo.chunked_token_log_probs(hidden, targets, fn, chunk)
        else:
            lp, en = grpo.token_log_probs(fn(hidden), targets)
        return jnp.sum(ca * lp + cb * en), (lp, en)

    (_, (lp1, en1)), g1 = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(hidden, w, False)
    (_, (lp2, en2)), g2 = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True),
                                  static_argnums=2)(hidden, w, True)
    assert lp2.shape == (b, t) and en2.shape == (b, t)
    np.testing.assert_allclose(np.asarray(lp2), np.asarray(lp1), **TOL)
    np.testing.assert_allclose(np.asarray(en2), np.asarray(en1), **TOL)
    np.testing.assert_allclose(np.asarray(g2[0]), np.asarray(g1[0]), rtol=1e-5, atol=1e-5)  # w.r.t. hidden
    np.testing.assert_allclose(np.asarray(g2[1]), np.asarray(g1[1]), rtol=1e-5, atol=1e-5)  # w.r.t. lm_head
