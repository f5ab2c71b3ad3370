"""Rollouts on device: one jitted program = vision + prefill once per prompt, then G samples
per prompt decoded together in a loop with a KV cache.

    sampler = Sampler(model, eos_ids=special.eos_ids, pad_id=special.pad_id)
    out = sampler(params, prompts, rng, SamplingConfig(num_samples=8, max_new_tokens=768,
                                                       temperature=1.0, top_p=0.9, top_k=50))

Group prefix sharing: the image is encoded and the prompt prefilled once per prompt; its
K/V become a *shared prefix* [L, B, K, P, Dh] that the G samples of the group attend to
(read once per step for the whole group, never copied G times), next to their own cache
[L, B, G, K, Tc, Dh]. PR1 (vLLM) re-encodes the image and prompt for each of the G requests.

A decode step is a few hundred small kernels (latency-bound, not bandwidth-bound), so:
  * the loop is chunked: a `lax.while_loop` over chunks of `steps_per_check` tokens, each a
    `lax.fori_loop` with a static trip count. On GPU a while loop copies its predicate to the
    host at every iteration, a sync that drains the launch queue; a known trip count needs
    none, so the "all rows done?" check (and its sync) happens once per chunk. Buffers are
    padded to whole chunks (sliced back at the end); steps past Tc record nothing.
  * the caches are stored in the layouts the attention matmuls read in place (batch dims
    major, K before P/Tc; see `layers.cached_attention`), the prefix transposed once after
    prefill: no per-token transpose of cache-sized arrays.

Rows that have ended still cost a decode step (each reads its cache and makes V logits).
Answer lengths are long-tailed (grounding: mean 40 tokens, the longest of a step ≈ 200), so
most steps run for a few rows: once at most a quarter (then a sixteenth) of the B·G rows
are left, the live rows are gathered into a compact batch [C, 1] (each with its group's
prefix) and the loop goes on with those (`compact_sizes`). Each row draws from its own
random stream (the key folded with its index in B·G), so its samples do not depend on the
layout: compacted or not, the same tokens (`tests/test_sampler.py`).

Sampling follows vLLM/HF order: temperature → top-k → top-p (smallest set with
cumulative probability ≥ top_p) → categorical. Returned log-probs: `logp` at temperature 1
over the full vocabulary (what PR1's loss uses) and `logp_sample` under the sampling
distribution. Shape letters: B prompts, G samples, Tc new tokens, P prompt tokens, V vocab.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from pr1_jax.model.decoder import DecoderContext, mrope, unstack_layers
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.structs import ModelInputs, SampleOutput, SamplingConfig  # noqa: F401  (re-exported)

Array = jax.Array
# Decode-step attention: XLA einsums, the fused GPU kernel (Pallas Triton), the TPU kernel (Pallas Mosaic).
DECODE_ATTENTION = ("xla", "pallas", "pallas_tpu")


@flax.struct.dataclass
class _LoopState:
    step: Array  # [] int32: tokens generated so far
    last: Array  # [B, G] int32: token to feed next
    done: Array  # [B, G] bool
    lengths: Array  # [B, G] int32
    tokens: Array  # [B, G, Tp] int32 (Tp ≥ Tc: padded to whole chunks)
    logp: Array  # [B, G, Tp] float32
    logp_sample: Array  # [B, G, Tp] float32
    cache: list[tuple[Array, Array]]  # per layer (K, V), each [B, G, K, Tc, Dh]
    logits: Array | None  # [B, G, Tp, V] float32 or None


@flax.struct.dataclass
class _Rows:
    """What the rows of a decode loop need besides their state: the full [B, G] layout, or a
    compacted [C, 1] one (each row with its group's prefix)."""

    ids: Array  # [b, g] int32: each row's index in the full B·G (its random stream, its output row)
    prefixes: list[tuple[Array, Array]]  # per layer (K, V), each [b, K, P, Dh]
    prefix_mask: Array  # [b, P] bool
    next_pos: Array  # [b] int32
    end_at: Array | None  # [b, g] int32 (benchmarks)


def compact_sizes(rows: int) -> tuple[int, ...]:
    """Row counts the decode loop compacts to when that few rows are left: a quarter, then a
    sixteenth of `rows` (multiples of 8 from 64 rows on), each smaller than the last."""
    out = []
    for frac in (4, 16):
        c = -(-rows // frac)
        c = -(-c // 8) * 8 if rows >= 64 else c
        if c < (out[-1] if out else rows):
            out.append(c)
    return tuple(out)


def _top_p_sorted(sorted_logits: Array, top_p: Array) -> Array:
    """Keeps the smallest prefix of descending-sorted logits whose probability mass ≥ top_p."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    return jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)  # always keeps the best


# Vocabulary reductions of a decode step run over [rows, V/VOCAB_BLOCK, VOCAB_BLOCK]: a few
# dozen rows × 151,936 logits as one row reduction each leaves most of the GPU idle (one
# such kernel took 58 µs of a ~2.2 ms step); per block, then over the block results, it is
# a reduction over ~10⁵ short rows that fills the GPU.
VOCAB_BLOCK = 128


def _blocked(x: Array, block: int) -> Array:
    """[..., V] → [..., ceil(V/block), block], padded with -inf (never drawn, adds no mass)."""
    v = x.shape[-1]
    nb = -(-v // block)
    if nb * block != v:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - v)], constant_values=-jnp.inf)
    return x.reshape(*x.shape[:-1], nb, block)


def _pick(a: Array, i: Array) -> Array:
    return jnp.take_along_axis(a, i[..., None], -1)[..., 0]


def _categorical_blocked(rng: Array, z_bk: Array) -> tuple[Array, Array]:
    """An exact draw from softmax(z) for z blocked [..., nb, block] (`_blocked`), in two stages:
    a block with probability ∝ its mass (its logsumexp), then a token within it ∝ exp(z).
    P(block)·P(token | block) = exp(z_token)/Σexp(z). Gumbel noise is drawn for nb + block
    values per row instead of V. Returns (token index into the unblocked V, z[token])."""
    k_block, k_token = jax.random.split(rng)
    lse_b = jax.nn.logsumexp(z_bk, axis=-1)  # [..., nb]
    blk = jax.random.categorical(k_block, lse_b, axis=-1)
    inner = jnp.take_along_axis(z_bk, blk[..., None, None], -2)[..., 0, :]  # [..., block]
    j = jax.random.categorical(k_token, inner, axis=-1)
    return blk * z_bk.shape[-1] + j, _pick(inner, j)


def _argmax_blocked(x_bk: Array) -> Array:
    """argmax over the unblocked V (first maximum, as jnp.argmax), in two stages."""
    blk = jnp.argmax(jnp.max(x_bk, axis=-1), axis=-1)
    inner = jnp.take_along_axis(x_bk, blk[..., None, None], -2)[..., 0, :]
    return blk * x_bk.shape[-1] + jnp.argmax(inner, axis=-1)


def _top_k_blocked(x: Array, k: int, block: int = VOCAB_BLOCK) -> tuple[Array, Array]:
    """`lax.top_k(x, k)` over the last axis, exactly (values, indices, ties to the lower index),
    at a fraction of the cost: with PR1's top_k 50, `lax.top_k` over 64 × 151,936 logits took
    ~1.1 ms of each decode step on an H200 (an 8 × 8 × 256 rollout: 0.81 s → 0.53 s).

    The k best tokens lie in the k blocks with the best maxima: a token outside them is
    beaten by each of those k maxima (ties: they sit in lower blocks, so at lower indices).
    So: top-k of the block maxima, those blocks in vocabulary order, top-k of their k·block
    values.
    """
    x_bk = _blocked(x, block)
    if k >= x_bk.shape[-2]:
        return jax.lax.top_k(x, k)
    _, blocks = jax.lax.top_k(jnp.max(x_bk, axis=-1), k)
    blocks = jnp.sort(blocks, axis=-1)  # vocabulary order: ties resolve as in lax.top_k
    cand = jnp.take_along_axis(x_bk, blocks[..., None], axis=-2)  # [..., k, block]
    values, pos = jax.lax.top_k(cand.reshape(*cand.shape[:-2], k * block), k)
    return values, jnp.take_along_axis(blocks, pos // block, axis=-1) * block + pos % block


def _logsumexp_blocked(x_bk: Array) -> Array:
    return jax.nn.logsumexp(jax.nn.logsumexp(x_bk, axis=-1), axis=-1)


def _choose(logits: Array, rng: Array, temperature: Array, top_p: Array, *, top_k: int, use_top_p: bool,
            greedy: bool, block: int = VOCAB_BLOCK) -> tuple[Array, Array, Array]:
    """logits [..., V] float32 → (token, logp at T=1 over V, logp under sampling), each [...].

    With top-k the candidates are the k best (`_top_k_blocked`, no full-vocabulary sort);
    top-p then trims them. Without top-k, top-p sorts the vocabulary. Plain temperature
    sampling and greedy decoding reduce the vocabulary in blocks (`VOCAB_BLOCK`).
    """
    x_bk = _blocked(logits, block)
    logp_of = lambda token: _pick(logits, token) - _logsumexp_blocked(x_bk)  # noqa: E731  log_softmax(logits)[token]
    if greedy:
        token = _argmax_blocked(x_bk).astype(jnp.int32)
        return token, logp_of(token), jnp.zeros(token.shape, jnp.float32)
    if not top_k and not use_top_p:
        z_bk = x_bk / temperature
        token, z_token = _categorical_blocked(rng, z_bk)
        token = token.astype(jnp.int32)
        return token, logp_of(token), z_token - _logsumexp_blocked(z_bk)
    scaled = logits / temperature
    if top_k:
        scaled, cand_ids = _top_k_blocked(scaled, top_k, block)  # sorted descending
    else:
        cand_ids = jnp.argsort(-scaled, axis=-1)
        scaled = jnp.take_along_axis(scaled, cand_ids, -1)
    if use_top_p:
        scaled = _top_p_sorted(scaled, top_p)
    choice = jax.random.categorical(rng, scaled, axis=-1)
    token = _pick(cand_ids, choice).astype(jnp.int32)
    return token, logp_of(token), _pick(jax.nn.log_softmax(scaled, axis=-1), choice)


def _choose_rows(logits_bgv: Array, keys_n: Array, temperature: Array, top_p: Array,
                 **static) -> tuple[Array, Array, Array]:
    """`_choose` for every row with its own key: [B, G, V] logits, B·G keys → [B, G] each."""
    b, g, v = logits_bgv.shape
    one = lambda x, k: _choose(x, k, temperature, top_p, **static)  # noqa: E731
    out = jax.vmap(one)(logits_bgv.reshape(b * g, v), keys_n)
    return tuple(a.reshape(b, g) for a in out)


@flax.struct.dataclass
class Prefix:
    """What the prefill hands the decode loop: the group's shared prompt cache and first logits."""

    logits: Array  # [B, V] float32: the next-token logits after each prompt
    k: Array  # [L, B, 1, P, K, Dh] the prompt's keys, every layer
    v: Array  # [L, B, 1, P, K, Dh]
    mask: Array  # [B, P] bool: valid prompt keys (left padding)
    next_pos: Array  # [B] int32: M-RoPE position of the first new token (max position + 1)


def prefill(model: Qwen2VL, params, prompts: ModelInputs) -> Prefix:
    """Vision once per prompt, the prompt prefilled once per prompt → the group's shared prefix."""
    logits, (k, v) = model.apply({"params": params}, prompts, method=Qwen2VL.prefill)
    # Text after the prompt continues at max position + 1 on all three M-RoPE axes.
    next_pos = jnp.max(jnp.where(prompts.attention_mask[None], prompts.positions, 0), axis=(0, 2)) + 1
    return Prefix(logits=logits, k=k, v=v, mask=prompts.attention_mask, next_pos=next_pos)


def decode_windows(max_new_tokens: int, chunk: int, decode_attention: str, first: int = 64) -> tuple[int, ...]:
    """Static own-cache lengths the decode loop runs in: `first`, doubling, each a multiple of
    `chunk`, the last = max_new_tokens. The XLA decode attention reads every slot it is
    given, so a step reads the smallest window that holds the tokens so far (≤ 2× their
    number), not all Tc slots. The Pallas steps (GPU, TPU) visit only written blocks already:
    one window. first=0: one window (the whole cache at every step)."""
    if decode_attention in ("pallas", "pallas_tpu") or first <= 0:
        return (max_new_tokens,)
    w, out = -(-first // chunk) * chunk, []
    while w < max_new_tokens:
        out.append(w)
        w *= 2
    return tuple(out) + (max_new_tokens,)


def decode(model: Qwen2VL, params, prefix: Prefix, rng: Array, temperature: Array, top_p: Array,
           end_at: Array | None = None, *, num_samples: int, max_new_tokens: int, top_k: int, use_top_p: bool,
           greedy: bool, eos_ids: tuple[int, ...], pad_id: int, ignore_eos: bool, return_logits: bool,
           steps_per_check: int = 16, decode_attention: str = "xla", decode_splits: int = 0,
           first_window: int = 64, compact: bool = True) -> SampleOutput:
    """G samples per prompt from its prefix, in a loop with a KV cache (wrapped in `jax.jit`).

    steps_per_check: decode steps per chunk between "all rows done?" checks (module docstring).
    first_window: the XLA attention's first cache window (`decode_windows`; 0: none).
    decode_attention: "xla", "pallas" (one fused kernel per layer, `model.decode_attention`) or
    "pallas_tpu" (`model.tpu_decode_attention`);
    decode_splits: with "pallas", key splits per program (0: automatic).
    compact: gather the live rows into smaller batches as rows end (`compact_sizes`).
    end_at [B, G] int32 (benchmarks only, `Sampler.__call__`): completion lengths at which
    EOS is forced.
    """
    b, p = prefix.mask.shape
    g, tc = num_samples, max_new_tokens
    n = b * g
    # Token 0 comes from the prefill, tokens 1..Tc-1 from decode steps run in whole chunks.
    chunk = max(1, min(steps_per_check, tc - 1))
    tp = 1 + -(-(tc - 1) // chunk) * chunk  # padded buffer length
    num_layers = model.cfg.text.num_layers
    # Per-layer views in the decode layout, made once here rather than at every step (see
    # decode_layer_by_layer and layers.cached_attention).
    prefixes = unstack_layers((jnp.swapaxes(prefix.k[:, :, 0], 2, 3), jnp.swapaxes(prefix.v[:, :, 0], 2, 3)),
                              num_layers)  # each [B, K, P, Dh]
    weights = model.decoding_weights(params)  # per layer, fused: read in place at every step

    eos = jnp.asarray(eos_ids, jnp.int32)
    stop = (lambda tok: jnp.zeros(tok.shape, bool)) if ignore_eos else (lambda tok: jnp.isin(tok, eos))
    choose = functools.partial(_choose_rows, temperature=temperature, top_p=top_p, top_k=top_k,
                               use_top_p=use_top_p, greedy=greedy)

    def record(state: _LoopState, rows: _Rows, logits_bgv: Array) -> _LoopState:
        step_key = jax.random.fold_in(rng, state.step)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, rows.ids.reshape(-1))  # one per row
        token, lp, lps = choose(logits_bgv, keys)
        if rows.end_at is not None:  # the benchmark hook: EOS at the drawn length
            forced = state.step == rows.end_at - 1
            # log_softmax at EOS from the chosen token's: lp = z_tok − lse (no second pass over V)
            eos_lp = lp + logits_bgv[..., eos_ids[0]] - _pick(logits_bgv, token)
            token, lp = jnp.where(forced, eos_ids[0], token), jnp.where(forced, eos_lp, lp)
        live = ~state.done & (state.step < tc)  # padding steps past Tc record nothing
        token = jnp.where(live, token, pad_id)
        at = lambda buf, val: jax.lax.dynamic_update_slice_in_dim(buf, val[..., None], state.step, axis=2)  # noqa: E731
        logits_buf = state.logits
        if return_logits:
            logits_buf = jax.lax.dynamic_update_slice_in_dim(state.logits, logits_bgv[:, :, None], state.step, 2)
        return state.replace(
            step=state.step + 1, last=token, done=state.done | (live & stop(token)),
            lengths=state.lengths + live, tokens=at(state.tokens, token),
            logp=at(state.logp, jnp.where(live, lp, 0.0)), logp_sample=at(state.logp_sample, jnp.where(live, lps, 0.0)),
            logits=logits_buf)

    # Step t writes slot t-1 < Tc-1; padding steps (t ≥ Tc) write slot min(t-1, Tc-1) (clamped),
    # which no real step reads, so the cache keeps Tc slots whatever the chunk.
    cache_shape = (b, g, prefix.k.shape[-2], tc, prefix.k.shape[-1])  # [B, G, K, Tc, Dh]
    vocab = prefix.logits.shape[-1]
    state = _LoopState(
        step=jnp.zeros((), jnp.int32), last=jnp.zeros((b, g), jnp.int32), done=jnp.zeros((b, g), bool),
        lengths=jnp.zeros((b, g), jnp.int32), tokens=jnp.full((b, g, tp), pad_id, jnp.int32),
        logp=jnp.zeros((b, g, tp), jnp.float32), logp_sample=jnp.zeros((b, g, tp), jnp.float32),
        cache=[(jnp.zeros(cache_shape, prefix.k.dtype), jnp.zeros(cache_shape, prefix.v.dtype))
               for _ in range(num_layers)],
        logits=jnp.zeros((b, g, tp, vocab), jnp.float32) if return_logits else None)
    rows = _Rows(ids=jnp.arange(n, dtype=jnp.int32).reshape(b, g), prefixes=prefixes, prefix_mask=prefix.mask,
                 next_pos=prefix.next_pos, end_at=end_at)
    # The G first tokens are G draws from the prompt's next-token distribution.
    state = record(state, rows, jnp.broadcast_to(prefix.logits[:, None], (b, g, vocab)))

    # Feed token t-1 (position next_pos + t-1), write its K/V at slot t-1, attend over the
    # window's first `window` slots (all written slots: t-1 < window).
    def body(state: _LoopState, rows: _Rows, window: int) -> _LoopState:
        t = state.step
        rb, rg = rows.ids.shape
        pos = jnp.broadcast_to((rows.next_pos + t - 1)[None, :, None, None], (3, rb, rg, 1))
        mask = jnp.broadcast_to(jnp.arange(window) <= t - 1, (rb, rg, 1, window))
        cos, sin = mrope(pos, model.cfg.text)
        ctx = DecoderContext(cos=cos, sin=sin, mask=mask, prefix_mask=rows.prefix_mask, cache_index=t - 1)
        logits, cache = model.decode_step(params, weights, state.last, ctx, state.cache, rows.prefixes,
                                          decode_attention, decode_splits)
        return record(state.replace(cache=cache), rows, logits)

    # Per stage of rows (all, then compacted), one while loop per window; a chunk runs only if
    # all its steps fit the window (the last window is the whole cache) and more rows are live
    # than the next stage holds. A loop whose rows are all done exits at once.
    windows = decode_windows(tc, chunk, decode_attention, first_window)
    sizes = compact_sizes(n) if compact else ()
    out = None  # [B·G, ...] outputs of the rows compacted away
    for stage, keep in enumerate(sizes + (0,)):
        for window in windows:
            fits = (lambda s: True) if window == tc else (lambda s, w=window: s.step + chunk - 1 <= w)

            def cond(s: _LoopState, fits=fits, keep=keep) -> Array:
                return (s.step < tc) & (jnp.sum(~s.done) > keep) & fits(s)

            def run_chunk(s: _LoopState, rows=rows, window=window) -> _LoopState:  # static trip count
                return jax.lax.fori_loop(0, chunk, lambda _, x: body(x, rows, window), s)

            state = jax.lax.while_loop(cond, run_chunk, state)
        out = _put_home(out, state, rows, n)
        if keep:
            state, rows = _compacted(state, rows, keep)
    cut = lambda a: None if a is None else a.reshape(b, g, *a.shape[1:])[:, :, :tc]  # noqa: E731
    return SampleOutput(tokens=cut(out["tokens"]), logp=cut(out["logp"]), logp_sample=cut(out["logp_sample"]),
                        lengths=out["lengths"].reshape(b, g), decode_steps=state.step, logits=cut(out["logits"]))


_OUTPUTS = ("tokens", "logp", "logp_sample", "lengths", "logits")


def _put_home(out: dict | None, state: _LoopState, rows: _Rows, n: int) -> dict:
    """The loop's outputs written to their rows of the full B·G layout (`out`; None: the first,
    full-layout stage, whose rows are all of them in order). A row listed twice (the filler
    of a compacted batch, done) carries the same values both times."""
    flat = {k: None if getattr(state, k) is None else getattr(state, k).reshape(-1, *getattr(state, k).shape[2:])
            for k in _OUTPUTS}
    if out is None:
        return flat
    ids = rows.ids.reshape(-1)
    return {k: None if v is None else out[k].at[ids].set(v) for k, v in flat.items()}


def _compacted(state: _LoopState, rows: _Rows, size: int) -> tuple[_LoopState, _Rows]:
    """The live rows of a loop (at most `size` once its loop has run) gathered into [size, 1],
    each with its group's prefix; fillers are a done row (which records nothing)."""
    done = state.done.reshape(-1)
    idx = jnp.nonzero(~done, size=size, fill_value=jnp.argmax(done))[0]  # [size]
    take = lambda a: None if a is None else a.reshape(-1, *a.shape[2:])[idx][:, None]  # noqa: E731
    group = idx // rows.ids.shape[1]
    state = state.replace(last=take(state.last), done=take(state.done), lengths=take(state.lengths),
                          tokens=take(state.tokens), logp=take(state.logp), logp_sample=take(state.logp_sample),
                          cache=[(take(k), take(v)) for k, v in state.cache], logits=take(state.logits))
    rows = _Rows(ids=take(rows.ids), prefixes=[(k[group], v[group]) for k, v in rows.prefixes],
                 prefix_mask=rows.prefix_mask[group], next_pos=rows.next_pos[group], end_at=take(rows.end_at))
    return state, rows


def generate(model: Qwen2VL, params, prompts: ModelInputs, rng: Array, temperature: Array, top_p: Array,
             end_at: Array | None = None, **static) -> SampleOutput:
    """`prefill` then `decode` in one traced function (the two programs `Sampler` runs)."""
    return decode(model, params, prefill(model, params, prompts), rng, temperature, top_p, end_at, **static)


class Sampler:
    """Compiles `prefill` and `decode` once per (shape bucket, static sampling options).

    steps_per_check: decode steps between checks whether every row is done (module docstring):
    larger saves host syncs, at the cost of up to steps_per_check − 1 wasted steps at the end.
    decode_attention: "xla" (default) or "pallas": each layer's decode attention as one fused
    Pallas kernel (`model.decode_attention`; interpreted on CPU), its keys split over
    `decode_splits` programs per (row, sample, kv head) (0: enough programs to fill the GPU);
    "pallas_tpu": the TPU kernel (`model.tpu_decode_attention`; interpreted off TPU).
    compact: as rows end, decode only the live ones in smaller batches (module docstring).
    """

    STATIC = ("num_samples", "max_new_tokens", "top_k", "use_top_p", "greedy", "eos_ids", "pad_id", "ignore_eos",
              "return_logits", "steps_per_check", "decode_attention", "decode_splits", "first_window", "compact")

    def __init__(self, model: Qwen2VL, eos_ids: Sequence[int], pad_id: int, steps_per_check: int = 16,
                 decode_attention: str = "xla", decode_splits: int = 0, first_window: int = 64,
                 compact: bool = True):
        if steps_per_check <= 0:
            raise ValueError(f"steps_per_check must be positive, got {steps_per_check}")
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        if decode_splits < 0:
            raise ValueError(f"decode_splits must be ≥ 0, got {decode_splits}")
        self.decode_attention, self.decode_splits = decode_attention, int(decode_splits)
        self.model = model
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self.steps_per_check = int(steps_per_check)
        self.first_window = int(first_window)
        self.compact = bool(compact)
        self._prefill = jax.jit(functools.partial(prefill, model))
        self._decode = jax.jit(functools.partial(decode, model), static_argnames=self.STATIC)

    def static_args(self, cfg: SamplingConfig, return_logits: bool = False) -> dict:
        return dict(num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k,
                    use_top_p=cfg.top_p < 1.0, greedy=cfg.temperature == 0, eos_ids=self.eos_ids,
                    pad_id=self.pad_id, ignore_eos=cfg.ignore_eos, return_logits=return_logits,
                    steps_per_check=self.steps_per_check, decode_attention=self.decode_attention,
                    decode_splits=self.decode_splits, first_window=self.first_window, compact=self.compact)

    def scalars(self, cfg: SamplingConfig) -> tuple[Array, Array]:
        """The decode's traced sampling options: (temperature, top_p)."""
        return jnp.float32(max(cfg.temperature, 1e-6)), jnp.float32(cfg.top_p)

    def __call__(self, params, prompts: ModelInputs, rng: Array, cfg: SamplingConfig,
                 return_logits: bool = False, end_at: Array | None = None,
                 timings: dict | None = None) -> SampleOutput:
        """Samples `cfg.num_samples` completions per prompt: [B, G, Tc] tokens and log-probs.

        end_at [B, G] int32 (benchmarks): forces EOS as token end_at − 1 of each completion, so
        that random weights, which never end an answer, give a task's answer lengths
        (`pr1_jax.workload`). timings: when a dict, the prefill and decode are each waited
        for and timed into it ("prefill_s", "decode_s"): two host syncs per rollout.
        """
        t0 = time.perf_counter()
        pre = self._prefill(params, prompts)
        if timings is not None:
            jax.block_until_ready(pre)
            timings["prefill_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = self._decode(params, pre, rng, *self.scalars(cfg), end_at, **self.static_args(cfg, return_logits))
        if timings is not None:
            jax.block_until_ready(out)
            timings["decode_s"] = time.perf_counter() - t1
        return out

    def num_compiled(self) -> int:
        """How many programs have been compiled so far (tests: no recompiles per batch)."""
        return self._prefill._cache_size() + self._decode._cache_size()
