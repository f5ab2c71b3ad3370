"""GRPO as Perception-R1 implements it (docs/method.md §3.4–3.10): pure jax.numpy functions.

    cfg = GRPOConfig()                                        # PR1's defaults
    adv_n, stats = group_advantages(rewards_n, cfg)           # rewards in gathered order
    mask_bt = completion_mask(tokens_bt, eos_id=151645)       # <|im_end|>, EOS included
    logp_bt, ent_bt = chunked_token_log_probs(hidden_btd, targets_bt, logits_fn, 256)
    loss, metrics = per_token_loss(logp_bt, ref_logp_bt, adv_n, mask_bt, cfg, entropy_bt=ent_bt)

Everything is float32, traceable and free of Python control flow on values, so it runs
inside the jitted update step. Shape letters: N completions (= B in a micro-batch),
G completions per prompt, T completion tokens, D width, V vocabulary.

PR1 in one line: A = (r − mean_g)/(std_g + 1e-4) with torch's unbiased std; per token
−exp(logp − sg(logp))·A + β·k3(logp, ref); token mean per sequence, then mean over
sequences; one gradient step per rollout (ratio ≡ 1, no clipping). Options beyond PR1
(μ > 1 with PPO clipping, token-mean aggregation, skipping zero-std groups) are off by
default, so `GRPOConfig()` reproduces PR1.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

KL_APPROXIMATORS = ("k3", "k1", "kimikl", "fullkimi")
LOSS_AGGREGATIONS = ("sequence_mean", "token_mean")
TEMPERATURE_FUNCS = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyper-parameters with the paper's symbols; defaults are PR1's (§3.7–3.10).

    Objective (paper Eq. 1; §2), per completion o_i of a group of G:
        J = mean_i (1/|o_i|) Σ_t [ min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1−ε, 1+ε_high) Â_i) − β D_KL ]
    with ρ = π_θ/π_old. PR1 takes one gradient step per rollout (μ = 1), so ρ ≡ 1.
    """

    # --- PR1 (§3.7, §3.8) ---
    num_generations: int = 8  # G: completions per prompt; ≥ 2 (torch's unbiased std of 1 value is NaN)
    beta: float = 0.04  # β: KL coefficient (TRL default; PR1's scripts keep it)
    use_kl: bool = True  # add β·KL to the loss (PR1 `use_kl`; forced on by 'fullkimi')
    kl_approximator: str = "k3"  # D_KL: k3 | k1 | kimikl (½(logp−ref)²) | fullkimi (kimikl, −p·A policy, A = r − mean)
    no_mean_for_same_reward: bool = False  # A = clamp((r − m·mean_g)/(std_g+eps), −1, 1), m = [std_g ≠ 0]
    std_eps: float = 1e-4  # eps in A = (r − mean_g)/(std_g + eps) (not the PPO clip ε)
    entropy_reg: bool = False  # add entropy_weight·(−H) per token; weight > 0 pushes entropy H up
    entropy_weight: float = 0.01
    reward_scale: float = 1.0  # r = reward_scale · Σ_funcs reward, applied before the advantages
    # --- Sampling temperature schedule (§3.10) ---
    temperature_func: str = "constant"  # constant | linear
    temperature: float = 0.9  # TRL default (PR1 grounding); PR1's counting/detection scripts set 1.0
    temperature_begin: float = 0.1  # linear: T(step) = T_begin + (T_end − T_begin)·step/total_steps
    temperature_end: float = 1.0
    # --- Completion mask (§3.4) ---
    pr1_mask_quirk: bool = True  # a row without <|im_end|> counts whole, padding included (PR1);
    # the caller passes it on: completion_mask(..., pr1_mask_quirk=cfg.pr1_mask_quirk)
    # --- Beyond PR1, all off by default ---
    num_iterations: int = 1  # μ: gradient steps per rollout batch (> 1: PPO epochs with clipping)
    epsilon: float = 0.2  # ε: ratio clip low bound 1 − ε
    epsilon_high: float | None = None  # ε_high: clip high bound 1 + ε_high; None → ε (see `eps_high`)
    loss_aggregation: str = "sequence_mean"  # sequence_mean (PR1) | token_mean (DAPO: Σ tokens / #tokens)
    skip_zero_std_groups: bool = False  # weight 0 for groups whose G rewards are all equal

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"GRPOConfig: {msg}")

        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            bad(f"num_generations (G) must be an int ≥ 2 (the unbiased std of one reward is NaN), "
                f"got {self.num_generations!r}")
        if self.kl_approximator not in KL_APPROXIMATORS:
            bad(f"kl_approximator must be one of {KL_APPROXIMATORS}, got {self.kl_approximator!r}")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            bad(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {self.loss_aggregation!r}")
        if self.temperature_func not in TEMPERATURE_FUNCS:
            bad(f"temperature_func must be one of {TEMPERATURE_FUNCS}, got {self.temperature_func!r}")
        if not self.beta >= 0:
            bad(f"beta (β) must be ≥ 0, got {self.beta}")
        if not self.std_eps > 0:
            bad(f"std_eps must be > 0 (all-equal groups have std 0), got {self.std_eps}")
        if not self.reward_scale > 0:
            bad(f"reward_scale must be > 0, got {self.reward_scale}")
        if not abs(self.entropy_weight) < float("inf"):
            bad(f"entropy_weight must be finite, got {self.entropy_weight}")
        if not self.temperature > 0:
            bad(f"temperature must be > 0 (GRPO needs sampled groups), got {self.temperature}")
        if not 0 <= self.temperature_begin <= self.temperature_end:
            bad(f"need 0 ≤ temperature_begin ≤ temperature_end (PR1 asserts begin ≤ end), "
                f"got {self.temperature_begin} > {self.temperature_end}")
        if not isinstance(self.num_iterations, int) or self.num_iterations < 1:
            bad(f"num_iterations (μ) must be an int ≥ 1, got {self.num_iterations!r}")
        if not 0 < self.epsilon < 1:
            bad(f"epsilon (ε) must be in (0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            bad(f"epsilon_high (ε_high) must be > 0 or None, got {self.epsilon_high}")
        if self.kl_approximator == "fullkimi":
            if not self.use_kl:
                bad("kl_approximator='fullkimi' requires use_kl=True (PR1 forces it on)")
            if self.num_iterations > 1:
                bad("kl_approximator='fullkimi' has no PPO-ratio form; it needs num_iterations=1")
        if self.skip_zero_std_groups and self.no_mean_for_same_reward:
            bad("skip_zero_std_groups contradicts no_mean_for_same_reward (which exists to give "
                "all-equal groups a non-zero advantage)")

    @property
    def eps_high(self) -> float:
        """ε_high actually used: `epsilon_high`, or ε when it is None."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# ----------------------------------------------------------------------------- advantages


def group_advantages(rewards_n: Array, cfg: GRPOConfig) -> tuple[Array, dict[str, Array]]:
    """Group-relative advantages (§3.7). rewards_n: float [N], G consecutive rows per group.

    1. r = reward_scale · rewards (float32), viewed as [N/G, G].
    2. mean_g, and std_g with ddof=1 (torch's unbiased `.std()`), computed on r − r_first
       so that a group of equal rewards has mean_g = r exactly and std_g = 0 exactly
       (torch's mean carries rounding noise there: PR1 gets |A| ≈ ulp(r)/1e-4 instead of 0).
    3. A per mode (first match wins):
       - no_mean_for_same_reward: m = [std_g ≠ 0]; A = clamp((r − m·mean_g)/(std_g + eps), −1, 1)
         (an all-equal group gets sign(r): +1 for r > 0, 0 for r = 0);
       - kl_approximator 'fullkimi': A = r − mean_g (no std normalisation);
       - default: A = (r − mean_g)/(std_g + eps), no clamp.

    Returns (advantages [N] float32, stats) with stats:
      "reward" []: mean scaled reward; "reward_std" []: mean over groups of std_g (TRL's
      `reward_std`); "frac_zero_std" []: fraction of groups with std_g = 0;
      "mean_g", "std_g" [N/G]; "zero_std_g" [N/G] bool;
      "loss_weight" [N] float32: 0 for members of zero-std groups if skip_zero_std_groups,
      else 1 (pass it to `per_token_loss(..., group_weight_b=)`).
    """
    g = cfg.num_generations
    if rewards_n.ndim != 1 or rewards_n.shape[0] % g:
        raise ValueError(f"rewards must be [N] with N a multiple of G={g}, got shape {rewards_n.shape}")
    r = (cfg.reward_scale * rewards_n.astype(jnp.float32)).reshape(-1, g)  # [N/G, G]
    d = r - r[:, :1]  # shifted: exact zeros for an all-equal group
    d_mean = d.mean(axis=1, keepdims=True)
    centered = d - d_mean  # = r − mean_g
    std_g = jnp.sqrt(jnp.sum(centered * centered, axis=1) / (g - 1))  # ddof=1
    zero_std_g = jnp.all(r == r[:, :1], axis=1)  # std_g ≠ 0 tested exactly, as in torch
    std_g = jnp.where(zero_std_g, 0.0, std_g)
    mean_g = r[:, 0] + d_mean[:, 0]

    denom = std_g[:, None] + cfg.std_eps
    if cfg.no_mean_for_same_reward:
        num = jnp.where(zero_std_g[:, None], r, centered)  # r − m·mean_g
        adv = jnp.clip(num / denom, -1.0, 1.0)
    elif cfg.kl_approximator == "fullkimi":
        adv = centered
    else:
        adv = centered / denom

    keep_g = jnp.logical_not(zero_std_g) if cfg.skip_zero_std_groups else jnp.ones_like(zero_std_g)
    stats = {
        "reward": r.mean(),
        "reward_std": std_g.mean(),
        "frac_zero_std": zero_std_g.astype(jnp.float32).mean(),
        "mean_g": mean_g,
        "std_g": std_g,
        "zero_std_g": zero_std_g,
        "loss_weight": jnp.repeat(keep_g.astype(jnp.float32), g),
    }
    return adv.reshape(-1), stats


# ----------------------------------------------------------------------------- mask


def completion_mask(tokens_bt: Array, eos_id: int, pad_id: int | None = None, *,
                    lengths_b: Array | None = None, pr1_mask_quirk: bool = True) -> Array:
    """Loss mask over completion tokens (§3.4). Returns bool [B, T].

    A row with `eos_id` (<|im_end|>, 151645) counts up to and including its first one.
    A row without it:
      - pr1_mask_quirk=True (PR1): counts whole, padding included (happens when generation
        stops on <|endoftext|> or at max_tokens);
      - pr1_mask_quirk=False: counts only its generated tokens: t < lengths_b[b] if
        `lengths_b` [B] is given (exact; e.g. `SampleOutput.lengths`), else the tokens
        before the first `pad_id`. Note the latter drops a final <|endoftext|> when it is
        also the pad id (151643 for Qwen2-VL); pass lengths_b to keep it.
    """
    t = tokens_bt.shape[1]
    pos = jnp.arange(t)
    is_eos = tokens_bt == eos_id
    has_eos = is_eos.any(axis=1)
    first_eos = jnp.argmax(is_eos, axis=1)  # 0 when absent; guarded by has_eos
    if pr1_mask_quirk:
        end = jnp.where(has_eos, first_eos + 1, t)
    else:
        if lengths_b is not None:
            n_gen = jnp.minimum(lengths_b.astype(jnp.int32), t)
        elif pad_id is not None:
            is_pad = tokens_bt == pad_id
            n_gen = jnp.where(is_pad.any(axis=1), jnp.argmax(is_pad, axis=1), t)
        else:
            raise ValueError("completion_mask with pr1_mask_quirk=False needs lengths_b or pad_id")
        end = jnp.where(has_eos, first_eos + 1, n_gen)
    return pos[None, :] < end[:, None]


# ----------------------------------------------------------------------------- loss


def _seq_mean(x_bt: Array, mask_bt: Array) -> Array:
    """[B]: Σ_t x·mask / max(Σ_t mask, 1) (an empty row gives 0, not torch's NaN)."""
    return jnp.sum(x_bt * mask_bt, axis=1) / jnp.maximum(jnp.sum(mask_bt, axis=1), 1.0)


def per_token_loss(logp_bt: Array, ref_logp_bt: Array | None, advantages_b: Array, mask_bt: Array,
                   cfg: GRPOConfig, *, old_logp_bt: Array | None = None, entropy_bt: Array | None = None,
                   group_weight_b: Array | None = None,
                   sampler_logp_bt: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """GRPO loss of one micro-batch (§3.8). Inputs [B, T] (advantages [B]); returns (loss [], metrics).

    logp_bt: log π_θ(token) at temperature 1 (differentiable); ref_logp_bt: reference model's
    (None allowed only when the KL term is off: use_kl=False or β=0); old_logp_bt: the
    sampling policy's, for μ > 1 (None → sg(logp), ratio ≡ 1: PR1); entropy_bt: per-token H
    (needed for entropy_reg; differentiable); group_weight_b: per-sequence loss weights
    (`stats["loss_weight"]`; required when skip_zero_std_groups); sampler_logp_bt: the
    rollout's log-probs of the same tokens, for the "sampler_logp_gap" metric only (never in
    the loss: pass it whatever μ is).

    1. Policy term per token:
       - old_logp_bt None (PR1): −exp(logp − sg(logp))·A  (value −A, gradient −A·∇logp);
       - old_logp_bt given: ρ = exp(logp − old_logp), −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A)
         (tokens where the clipped branch wins have zero gradient);
       - 'fullkimi': −exp(logp)·A (probability-weighted; no ratio form).
    2. KL term (if use_kl): +β·KL with δ = ref − logp:
       k1 = logp − ref; k3 = exp(δ) − δ − 1; kimikl/fullkimi = ½(logp − ref)².
    3. Entropy term (if entropy_reg): +entropy_weight·(−H). PR1's sign: a positive weight
       lowers the loss when entropy rises, i.e. pushes entropy up.
    4. Reduction (w_b = group weight, default 1):
       - sequence_mean (PR1): Σ_b w_b·[Σ_t ℓ·mask / Σ_t mask] / Σ_b w_b  (= batch mean for w ≡ 1);
       - token_mean (DAPO): Σ_{b,t} w_b·ℓ·mask / Σ_{b,t} w_b·mask.
       Empty denominators count as 1 (loss 0, not NaN).

    Metrics (no gradient; per-sequence masked token mean, then unweighted mean over the
    batch, like PR1's logged kl): "kl" (the estimator in use), "k1", "k3", "kimi" (when
    ref_logp_bt is given), "entropy" (when entropy_bt is given), "ppl" = mean_b exp(−mean_t
    logp) (per-sequence perplexity of the completion under π_θ, then averaged),
    "clip_fraction" (fraction of masked tokens where the clipped branch wins; 0 when
    old_logp_bt is None), "completion_length" (mean Σ_t mask), "loss_weight_sum" (the
    reduction's denominator: Σ_b w_b or Σ_{b,t} w_b·mask, to re-weight micro-batches),
    "sampler_logp_gap" (when sampler_logp_bt is given: Σ |sampler_logp − logp|·s / Σ s over the
    masked tokens s the sampler decoded, i.e. whose sampler log-prob is not the 0 it writes on
    padding; the gap between the rollout's and the update's log-probs of the same tokens that
    TRL and verl report to catch numerics drift; 0 when there is none).
    """
    f32 = jnp.float32
    logp = logp_bt.astype(f32)
    mask = mask_bt.astype(f32)
    adv = advantages_b.astype(f32)[:, None]
    kl_on = cfg.use_kl and cfg.beta != 0
    if ref_logp_bt is None and kl_on:
        raise ValueError("per_token_loss: ref_logp_bt is required when use_kl and beta ≠ 0")
    if cfg.entropy_reg and entropy_bt is None:
        raise ValueError("per_token_loss: entropy_bt is required when entropy_reg=True")
    if cfg.skip_zero_std_groups and group_weight_b is None:
        raise ValueError("per_token_loss: skip_zero_std_groups needs group_weight_b "
                         "(group_advantages' stats['loss_weight'])")
    fullkimi = cfg.kl_approximator == "fullkimi"
    if fullkimi and old_logp_bt is not None:
        raise ValueError("per_token_loss: 'fullkimi' has no PPO-ratio form; pass old_logp_bt=None")

    # 1. Policy term.
    clipped = jnp.zeros_like(mask)
    if fullkimi:
        policy = -jnp.exp(logp) * adv
    elif old_logp_bt is None:
        policy = -jnp.exp(logp - jax.lax.stop_gradient(logp)) * adv
    else:
        ratio = jnp.exp(logp - old_logp_bt.astype(f32))
        unclipped_obj = ratio * adv
        clipped_obj = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.eps_high) * adv
        policy = -jnp.minimum(unclipped_obj, clipped_obj)
        clipped = (clipped_obj < unclipped_obj).astype(f32)
    per_token = policy

    # 2. KL term.
    metrics: dict[str, Array] = {}
    if ref_logp_bt is not None:
        ref = ref_logp_bt.astype(f32)
        diff = logp - ref
        k1 = diff
        k3 = jnp.exp(-diff) + diff - 1.0  # exp(δ) − δ − 1 with δ = ref − logp
        kimi = 0.5 * diff * diff
        kl = {"k1": k1, "k3": k3, "kimikl": kimi, "fullkimi": kimi}[cfg.kl_approximator]
        if kl_on:
            per_token = per_token + cfg.beta * kl
        sg = jax.lax.stop_gradient
        metrics.update(kl=_seq_mean(sg(kl), mask).mean(), k1=_seq_mean(sg(k1), mask).mean(),
                       k3=_seq_mean(sg(k3), mask).mean(), kimi=_seq_mean(sg(kimi), mask).mean())

    # 3. Entropy term.
    if entropy_bt is not None:
        ent = entropy_bt.astype(f32)
        if cfg.entropy_reg:
            per_token = per_token + cfg.entropy_weight * (-ent)
        metrics["entropy"] = _seq_mean(jax.lax.stop_gradient(ent), mask).mean()

    # 4. Reduction.
    w = jnp.ones(mask.shape[:1], f32) if group_weight_b is None else group_weight_b.astype(f32)
    if cfg.loss_aggregation == "sequence_mean":
        denom = jnp.sum(w)
        loss = jnp.sum(w * _seq_mean(per_token, mask)) / jnp.maximum(denom, 1e-8)
    else:
        tok_w = w[:, None] * mask
        denom = jnp.sum(tok_w)
        loss = jnp.sum(per_token * tok_w) / jnp.maximum(denom, 1e-8)
    # Weights are 0/1 or positive, so a non-empty denominator is ≥ its smallest positive weight;
    # the 1e-8 floor only turns an all-skipped batch into loss 0 (its numerator is 0 too).

    sg_logp = jax.lax.stop_gradient(logp)
    n_tok = jnp.sum(mask)
    metrics.update(
        ppl=jnp.exp(-_seq_mean(sg_logp, mask)).mean(),
        clip_fraction=jnp.sum(clipped * mask) / jnp.maximum(n_tok, 1.0),
        completion_length=jnp.sum(mask, axis=1).mean(),
        loss_weight_sum=jax.lax.stop_gradient(denom),
    )
    if sampler_logp_bt is not None:
        # PR1's mask counts a row without <|im_end|> whole, padding included; the sampler decoded
        # no token there (it writes 0), so those positions would measure the pad token, not drift.
        sampler = sampler_logp_bt.astype(f32)
        decoded = mask * (sampler != 0.0)
        metrics["sampler_logp_gap"] = (jnp.sum(jnp.abs(sg_logp - sampler) * decoded)
                                       / jnp.maximum(jnp.sum(decoded), 1.0))
    return loss, metrics


# ----------------------------------------------------------------------------- temperature


def pr1_linear_total_steps(num_examples: int, num_generations: int, per_device_batch: int) -> float:
    """PR1's `total_step` for the linear temperature schedule (quirk §8.6).

    len(dataset)·G / per_device_batch: the number of per-device micro-batches of one
    process, NOT optimizer steps (it ignores #ranks and gradient accumulation). With PR1's
    7 ranks × GA 2 the schedule therefore only reaches T_begin + (T_end − T_begin)/14.
    """
    return num_examples * num_generations / per_device_batch


def temperature_at(step, cfg: GRPOConfig, total_steps: float | None = None):
    """Sampling temperature at optimizer step `step` (§3.10).

    constant: cfg.temperature. linear: T_begin + (T_end − T_begin)·step/total_steps, clipped
    to [T_begin, T_end] (never active in PR1's regime, where step < total_steps). To
    reproduce PR1, pass total_steps = pr1_linear_total_steps(...). A Python number step gives
    a Python float; a traced step gives a float32 array.
    """
    if cfg.temperature_func == "constant":
        return cfg.temperature
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"temperature_at: linear schedule needs total_steps > 0, got {total_steps}")
    lo, hi = cfg.temperature_begin, cfg.temperature_end
    if isinstance(step, numbers.Real):  # Python / NumPy scalar (not a jax.Array)
        return float(min(max(lo + (hi - lo) * step / total_steps, lo), hi))
    return jnp.clip(lo + (hi - lo) * jnp.asarray(step, jnp.float32) / total_steps, lo, hi)


# ----------------------------------------------------------------------------- log-probs


def token_log_probs(logits_btv: Array, targets_bt: Array) -> tuple[Array, Array]:
    """Per-token log π(target) and entropy H = −Σ_v p log p, float32, full vocabulary (§3.5).

    logits_btv [B, T, V] (any float dtype, finite), targets_bt [B, T] int → ([B, T], [B, T]).
    Temperature 1: PR1 does not divide by the sampling temperature.

    Written as reductions over the logits that XLA fuses side by side (max; Σe, Σe·z and the
    target's logit), with H = lse − Σ p·z: two passes over [.., V] instead of four, and the
    target picked by comparing with an iota rather than a gather, whose gradient would be a
    scatter into a dense float32 [.., V] of zeros.
    """
    z = logits_btv.astype(jnp.float32)
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - m)
    total = jnp.sum(e, axis=-1)
    lse = jnp.log(total) + m[..., 0]
    is_target = jnp.arange(z.shape[-1]) == targets_bt[..., None].astype(jnp.int32)
    logp = jnp.sum(jnp.where(is_target, z, 0.0), axis=-1) - lse
    entropy = lse - jnp.sum(e * z, axis=-1) / total
    return logp, entropy


def chunked_token_log_probs(hidden_btd: Array, targets_bt: Array, logits_fn: Callable[[Array], Array],
                            chunk_size: int) -> tuple[Array, Array]:
    """`token_log_probs(logits_fn(hidden), targets)` without materialising [B, T, V] logits.

    hidden_btd [B, T, D] (final-norm hidden states at the positions that predict targets),
    targets_bt [B, T]; logits_fn maps [B, C, D] → [B, C, V] (e.g. the tied lm_head, closing
    over params — gradients flow to them). Scans over T in chunks of C = chunk_size with
    `lax.map`; each chunk is rematerialised (`jax.checkpoint`) so the backward pass holds one
    chunk's [B, C, V] float32 logits at a time. T not divisible by C is zero-padded, and the
    padding is sliced off. Returns (logp [B, T], entropy [B, T]) float32.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, t, d = hidden_btd.shape
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    hidden_nbcd = hidden_btd.reshape(b, n, c, d).swapaxes(0, 1)
    targets_nbc = targets_bt.reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h_bcd, y_bc = args
        return token_log_probs(logits_fn(h_bcd), y_bc)

    logp_nbc, ent_nbc = jax.lax.map(one_chunk, (hidden_nbcd, targets_nbc))
    logp = logp_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    ent = ent_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    return logp, ent
