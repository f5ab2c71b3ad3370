"""The jitted GRPO (and SFT) update: pure functions of (state, batch) → (state, metrics).

Scoring a group: the image is encoded and the prompt run ONCE per prompt; its K/V are the
shared prefix that the G completions of the group attend to (`Qwen2VL.decode_group`: one
decoder pass over rows [prompt, the G completions back to back], split only for
attention). The completions are packed whole, by their real length, into R ≤ G rows of T
tokens (`Completions`; R and T chosen per step by `shapes.packing_cost`), so the update's
cost follows the tokens the policy wrote, not `max_new_tokens`: a grounding step of 14
prompts × 8 answers of ≈ 40 tokens scores 14 × 1 × 512–640 positions, not 14 × 8 × 768.
A row's attention is masked to each completion's own tokens but computed over the whole
row, so long answers get a row each (every answer 256 tokens: 8 rows of 256, not one of
2,048 — that cost 0.709 s against 0.61 s for the 64 × 574 update on the H200).
This is exactly the full forward of each [prompt, completion] row — a token sees the
prompt and its own completion's earlier tokens, nothing else — and the loss reads each
completion's log-probs back as [B, G, T] (`Completions.unpack`), so `grpo.per_token_loss`
is unchanged. Log-probs come from the LM head in chunks of tokens
(`grpo.chunked_token_log_probs`), so float32 logits [tokens, V] are never materialised.

Shape letters: M micro-batches, B prompts per micro-batch, G samples, P prompt tokens,
R rows of T packed completion tokens per prompt, L completion positions of the loss, D width.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pr1_jax import grpo
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.structs import Completions, ModelInputs, Rollouts, TrainState  # noqa: F401  (re-exported)

Array = jax.Array


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


def packed_hidden(model: Qwen2VL, params, prompts: ModelInputs, comp: Completions) -> Array:
    """Hidden states that predict each packed completion token: [K, R, T, D].

    The state before a completion's token 0 is its prompt's last state (shared by the group);
    before token j > 0, the state after its token j − 1: the previous position of its row.
    """
    k, r, t = comp.tokens.shape
    bs = prompts.input_ids.shape[0] // k  # prompts per block

    def of_row(x_b: Array) -> Array:
        """[B, ...] per prompt → [K, R, ...] per completion row (its prompt's), inside each block:
        a gather batched over the blocks, which stay on their devices."""
        if bs == 1:
            return jnp.broadcast_to(x_b[:, None], (k, r) + x_b.shape[1:])
        return jax.vmap(lambda x, i: x[i])(x_b.reshape(k, bs, *x_b.shape[1:]), comp.group)

    def forward(m: Qwen2VL):
        vision = m.encode_images(prompts.pixels, prompts.segment_ids, prompts.pos_hw, prompts.image_patches)
        x = m.embed(prompts.input_ids, vision, prompts.vision_index)[:, None]
        next_pos = jnp.max(jnp.where(prompts.attention_mask[None], prompts.positions, 0), axis=(0, 2)) + 1
        pos = jnp.broadcast_to((of_row(next_pos)[:, :, None] + comp.offset)[None], (3, k, r, t))
        idx = jnp.arange(t)
        # own earlier tokens of the same completion; a padding token sees itself (no empty row)
        same = comp.sample[..., :, None] == comp.sample[..., None, :]
        mask = (same & (idx[:, None] >= idx[None, :]) & (comp.sample[..., :, None] >= 0)) | (idx[:, None] == idx)
        hidden_p, hidden_c = m.decode_group(x, m.embed(comp.tokens), prompts.positions[:, :, None], pos,
                                            prompts.attention_mask, mask, comp.group, comp.prompt_pack)
        last = of_row(hidden_p[:, 0, -1])[:, :, None]  # [K, R, 1, D]: its prompt's last state
        before = jnp.concatenate([last, hidden_c[:, :, :-1]], axis=2)
        return jnp.where((comp.offset == 0)[..., None], last, before)

    return model.apply({"params": params}, method=forward)


def completion_log_probs(model: Qwen2VL, params, prompts: ModelInputs, comp: Completions,
                         chunk_size: int = 128) -> tuple[Array, Array]:
    """log π(token) at temperature 1 over the full vocabulary, and entropy: [B, G, L] each."""
    k, r, t = comp.tokens.shape
    b, g, length = comp.unpack.shape
    # The LM head runs over [K·R, T] (rows as batch): chunks of `chunk_size` positions of every
    # row at once, as many chunks as a row has — not R times more chunks of K rows each.
    hidden = packed_hidden(model, params, prompts, comp).reshape(k * r, t, -1)
    logits_fn = lambda h: model.apply({"params": params}, h, method=Qwen2VL.logits)  # noqa: E731
    # rows over the batch axes, width whole: the LM head gathers its (FSDP) weight per chunk
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "act_embed"))
    logp, entropy = grpo.chunked_token_log_probs(hidden, comp.tokens.reshape(k * r, t), logits_fn, chunk_size)
    at = comp.unpack.reshape(k, (b // k) * g, length)  # each prompt's positions in its block's flat R·T
    unpack = lambda a: jnp.take_along_axis(a.reshape(k, 1, r * t), at, axis=-1).reshape(b, g, length)  # noqa: E731
    return unpack(logp), unpack(entropy)


def grpo_update(model: Qwen2VL, optimizer: optax.GradientTransformation, cfg: grpo.GRPOConfig,
                state: TrainState, ref_params, batch: Rollouts, chunk_size: int = 128):
    """One PR1 optimizer step over M micro-batches (the GRPO objective of docs/method.md §3.8).

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
                                       group_weight_b=flat(mb.group_weight),
                                       sampler_logp_bt=flat(mb.old_logp))  # a metric only: the loss is unchanged

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, dict(metrics, loss=loss)

    return _accumulate_and_apply(optimizer, state, batch, micro_grads)


def _accumulate_and_apply(optimizer, state: TrainState, batch: Rollouts, micro_grads):
    """Sums gradients and metrics over the M micro-batches (lax.scan), averages, applies AdamW."""
    m = batch.advantages.shape[0]
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
