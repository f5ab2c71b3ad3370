"""The jitted GRPO (and SFT) update: pure functions of (state, batch) → (state, metrics).

Scoring a group: the image is encoded and the prompt run ONCE per prompt; its K/V are the
shared prefix that the G completions of the group attend to (`Qwen2VL.decode_group`: one
decoder pass over rows [prompt, G completions], split only for attention). This
is exactly the full forward of each [prompt, completion] row — the prompt's activations
are identical across the group and their gradients sum over it — at a fraction of the
FLOPs: 8 × 318 prompt tokens instead of 64 × 318 at PR1's settings. Log-probs come from
the LM head in chunks of tokens (`grpo.chunked_token_log_probs`), so float32 logits
[B·G, Tc, V] are never materialised.

Shape letters: M micro-batches, B prompts per micro-batch, G samples, P prompt tokens,
Tc completion tokens, D width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from pr1_jax import grpo
from pr1_jax.model.qwen2_vl import ModelInputs, Qwen2VL

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array  # [] int32, optimizer steps taken
    params: Any
    opt_state: Any


@flax.struct.dataclass
class Rollouts:
    """One optimizer step's data, split into M micro-batches of B prompts × G completions."""

    prompts: ModelInputs  # every field with a leading [M] axis
    completions: Array  # [M, B, G, Tc] int32
    mask: Array  # [M, B, G, Tc] bool: tokens that count in the loss
    advantages: Array  # [M, B, G] float32
    old_logp: Array  # [M, B, G, Tc] float32 (sampler's log-probs; used when μ > 1)
    group_weight: Array  # [M, B, G] float32 (0 drops a group: skip_zero_std_groups)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """PR1 (HF Trainer defaults): AdamW lr 1e-6 linear decay to 0, no warm-up, clip 1.0."""

    learning_rate: float = 1e-6
    total_steps: int = 1000
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: str = "linear"  # "linear" (to 0) | "constant"


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; steps with non-finite gradients are skipped and counted."""
    if cfg.schedule == "linear":
        lr = optax.linear_schedule(cfg.learning_rate, 0.0, max(cfg.total_steps - cfg.warmup_steps, 1))
        if cfg.warmup_steps:
            lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), lr],
                                      [cfg.warmup_steps])
    else:
        lr = optax.constant_schedule(cfg.learning_rate)
    inner = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.apply_if_finite(inner, max_consecutive_errors=1_000_000)


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def group_hidden(model: Qwen2VL, params, prompts: ModelInputs, completions: Array) -> Array:
    """Hidden states that predict each completion token: [B, G, Tc, D].

    Position t of the result is the state after [prompt, completion[:t]]: the prompt's last
    state for t = 0 (shared by the group), the completion's state t−1 after that.
    """
    b, g, tc = completions.shape

    def forward(m: Qwen2VL):
        vision = m.encode_images(prompts.pixels, prompts.segment_ids, prompts.pos_hw)
        x = m.embed(prompts.input_ids, vision, prompts.vision_index)[:, None]
        next_pos = jnp.max(jnp.where(prompts.attention_mask[None], prompts.positions, 0), axis=(0, 2)) + 1
        pos = jnp.broadcast_to((next_pos[:, None, None] + jnp.arange(tc))[None], (3, b, g, tc))
        hidden_p, hidden_c = m.decode_group(x, m.embed(completions), prompts.positions[:, :, None], pos,
                                            prompts.attention_mask)
        first = jnp.broadcast_to(hidden_p[:, :, -1:], (b, g, 1, hidden_p.shape[-1]))
        return jnp.concatenate([first, hidden_c[:, :, :-1]], axis=2)

    return model.apply({"params": params}, method=forward)


def completion_log_probs(model: Qwen2VL, params, prompts: ModelInputs, completions: Array,
                         chunk_size: int = 128) -> tuple[Array, Array]:
    """log π(token) at temperature 1 over the full vocabulary, and entropy: [B, G, Tc] each."""
    b, g, tc = completions.shape
    hidden = group_hidden(model, params, prompts, completions)
    logits_fn = lambda h: model.apply({"params": params}, h, method=Qwen2VL.logits)  # noqa: E731
    # rows over the batch axes, width whole: the LM head gathers its (FSDP) weight per chunk
    hidden = nn.with_logical_constraint(hidden.reshape(b * g, tc, -1), ("batch", "length", "act_embed"))
    logp, entropy = grpo.chunked_token_log_probs(hidden, completions.reshape(b * g, tc),
                                                 logits_fn, chunk_size)
    return logp.reshape(b, g, tc), entropy.reshape(b, g, tc)


def grpo_update(model: Qwen2VL, optimizer: optax.GradientTransformation, cfg: grpo.GRPOConfig,
                state: TrainState, ref_params, batch: Rollouts, chunk_size: int = 128):
    """One PR1 optimizer step over M micro-batches (the GRPO objective of PR1_REFERENCE §3.8).

    1. For each micro-batch: reference log-probs (frozen initial parameters, no gradient).
    2. Policy log-probs with gradient, PR1's per-token loss, gradients.
    3. Gradients and metrics averaged over micro-batches (PR1: HF Trainer divides by the
       accumulation steps) — equal micro-batches make this the mean over all sequences.
    4. AdamW (clipped; skipped when non-finite) → new parameters.
    """

    def micro_grads(mb: Rollouts):
        ref_logp, _ = completion_log_probs(model, ref_params, mb.prompts, mb.completions, chunk_size)
        ref_logp = jax.lax.stop_gradient(ref_logp)
        flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731  [B, G, ...] → [B·G, ...]

        def loss_fn(params):
            logp, entropy = completion_log_probs(model, params, mb.prompts, mb.completions, chunk_size)
            return grpo.per_token_loss(flat(logp), flat(ref_logp), flat(mb.advantages), flat(mb.mask), cfg,
                                       old_logp_bt=flat(mb.old_logp) if cfg.num_iterations > 1 else None,
                                       entropy_bt=flat(entropy),
                                       group_weight_b=flat(mb.group_weight))

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, dict(metrics, loss=loss)

    return _accumulate_and_apply(optimizer, state, batch, micro_grads)


def _accumulate_and_apply(optimizer, state: TrainState, batch: Rollouts, micro_grads):
    """Sums gradients and metrics over the M micro-batches (lax.scan), averages, applies AdamW."""
    m = batch.completions.shape[0]
    shapes = jax.eval_shape(micro_grads, jax.tree.map(lambda a: a[0], batch))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def add(carry, mb):
        return jax.tree.map(jnp.add, carry, micro_grads(mb)), None

    (grads, metrics), _ = jax.lax.scan(add, zeros, batch)
    grads = jax.tree.map(lambda x: x / m, grads)
    metrics = jax.tree.map(lambda x: x / m, metrics)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["skipped_nonfinite"] = 1 - jnp.asarray(opt_state.last_finite, jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_update_fn(model: Qwen2VL, optimizer, cfg: grpo.GRPOConfig, chunk_size: int = 128):
    """`update(state, ref_params, batch) -> (state, metrics)`, jitted, the state donated."""
    return jax.jit(functools.partial(grpo_update, model, optimizer, cfg, chunk_size=chunk_size),
                   donate_argnums=(0,))


# ------------------------------------------------------------------ SFT on the same data path
def sft_update(model: Qwen2VL, optimizer, state: TrainState, batch: Rollouts, chunk_size: int = 128):
    """Supervised fine-tuning step: mean token NLL of the target completions (G = 1).

    Uses the same scoring path as GRPO (`completion_log_probs`); `batch.mask` selects the
    target tokens. PR1 ships an SFT script and the paper compares SFT with RL (Table 5).
    """

    def micro_grads(mb: Rollouts):
        def loss_fn(params):
            logp, _ = completion_log_probs(model, params, mb.prompts, mb.completions, chunk_size)
            mask = mb.mask.astype(jnp.float32)
            return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return grads, {"loss": loss}

    return _accumulate_and_apply(optimizer, state, batch, micro_grads)


def make_sft_fn(model: Qwen2VL, optimizer, chunk_size: int = 128):
    return jax.jit(functools.partial(sft_update, model, optimizer, chunk_size=chunk_size), donate_argnums=(0,))
