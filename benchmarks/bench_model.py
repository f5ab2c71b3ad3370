"""GPU benchmark of pr1_jax at the Qwen2-VL-2B architecture (random bf16 weights).

    python3 benchmarks/bench_model.py --modes=forward,rollout,update [--out=FILE.jsonl]

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
The whole GRPO step of the runs users make is `bench_recipes.py`, which drives
  `pr1_jax.train` itself.
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
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax.core import meta  # noqa: E402

from pr1_jax.model.config import PRESETS, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from pr1_jax.model.qwen2_vl import Qwen2VL, init_params  # noqa: E402
from pr1_jax.processing import batch as pb  # noqa: E402
from pr1_jax.sampler import Sampler, SamplingConfig  # noqa: E402

SIDE, TEXT_BEFORE, TEXT_AFTER, NEW = 448, 40, 20, 256
PAD = 151643
SMOKE_SIDE, SMOKE_NEW = 56, 16
UPDATE_DEFAULTS = {"micro": 1, "chunk": 256, "remat": "full", "vremat": None, "attn": "xla", "unroll": 1, "vunroll": 1}


def smoke_config() -> ModelConfig:
    return ModelConfig(text=TextConfig(width=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                       head_dim=16, mrope_section=(2, 3, 3)),
                       vision=VisionConfig(depth=2, width=32, num_heads=4, mlp_dim=128, out_width=64))


def prompt_rows(cfg, b: int, seed: int = 0, side: int = SIDE):
    """b prompts of random text around one side×side image: token rows and (pixels, grid)."""
    rng = np.random.default_rng(seed)
    g = side // cfg.vision.patch_size  # 14 px (Qwen2-VL, Qwen2.5-VL), 16 px (Qwen3-VL)
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


def host_rollouts(cfg, b: int, g: int, new: int = NEW, micro: int = 1, side: int = SIDE, shards: int = 1):
    """A `Rollouts` batch of NumPy arrays: b prompts × g random completions of `new` tokens,
    in `micro` micro-batches of b/micro prompts (the micro-batches repeat the same prompts),
    packed as training packs them by default (`batch.completion_blocks`: a block of prompts per
    batch shard, `shards`; `rollouts.CompletionShape.choose` on the run's ladders: every
    completion `new` long gives g rows of `new` per prompt)."""
    from pr1_jax.rollouts import CompletionShape, completion_extents, rollouts_from_padded
    from pr1_jax.shapes import StepShapes, attention_weight

    if b % micro:
        raise ValueError(f"{b} prompts cannot be split into {micro} micro-batches")
    per = b // micro
    inputs = host_prompts(cfg, per, side=side)
    rng = np.random.default_rng(0)
    shape = (micro, per, g, new)
    comp = rng.integers(0, 150000, shape).astype(np.int32)
    mask = np.ones(shape, bool)
    prompt_len = int(inputs.input_ids.shape[-1])
    shapes = StepShapes.from_caps(seq_len=max(prompt_len, 64), patch_row_len=int(inputs.pixels.shape[-2]),
                                  max_new_tokens=new, num_samples=g)
    if per % shards:
        raise ValueError(f"{per} prompts per micro-batch do not split over {shards} batch shards")
    packing = CompletionShape.choose(completion_extents(mask.reshape(-1, g, new)), shapes, prompt_len,
                                     attention_weight(cfg.text), per // shards)
    return rollouts_from_padded(jax.tree.map(lambda a: np.stack([a] * micro), inputs), comp, mask,
                                rng.standard_normal(shape[:3]).astype(np.float32), np.zeros(shape, np.float32),
                                np.ones(shape[:3], np.float32), pad_id=PAD, shape=packing)


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
    """The update program for these options and shapes, built by the program builder training
    uses (`pr1_jax.programs.Programs`) and compiled once per process. state_fn(optimizer) → the state."""
    from pr1_jax import grpo, sharding
    from pr1_jax.programs import Kernels, Programs
    from pr1_jax.train_step import OptimConfig, make_optimizer

    if key not in _COMPILED:
        mesh = sharding.make_mesh(devices=jax.devices()[:1])
        programs = Programs(cfg, mesh, dtype=jnp.bfloat16, optimizer=make_optimizer(OptimConfig()),
                            grpo_cfg=grpo.GRPOConfig(num_generations=g), eos_ids=(151645, PAD), pad_id=PAD,
                            kernels=Kernels(attention=attn, decode_attention="xla"), remat=True, remat_policy=remat,
                            vision_remat_policy=vremat, scan_unroll=unroll, vision_scan_unroll=vunroll,
                            chunk_size=chunk, budget=None)
        t0 = time.perf_counter()
        abstract = jax.eval_shape(lambda: state_fn(programs.optimizer))
        compiled = programs.lower_update(abstract, ref, batch).compile()
        _COMPILED[key] = (programs.optimizer, compiled, time.perf_counter() - t0)
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="forward,rollout", help="any of forward,rollout,update")
    p.add_argument("--rollouts", default="8x8,8x16,64x8", help="BxG list")
    p.add_argument("--out", default=None)
    p.add_argument("--update_shape", default="8x8", help="prompts x G for the update step")
    p.add_argument("--update_variants", default=None,
                   help="';'-separated option lists, e.g. 'remat=full,chunk=256;remat=dots,chunk=128' "
                        "(keys shape, micro, chunk, remat, vremat); implies the update mode")
    p.add_argument("--deadline_s", type=float, default=0,
                   help="skip update variants that would start later than this many seconds after launch (0: never)")
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
    if "update" in args.modes or args.update_variants:
        variants = [v.strip() for v in (args.update_variants or "").split(";") if v.strip()] or [""]
        deadline = start + args.deadline_s if args.deadline_s > 0 else None
        update_sweep(cfg, params, variants, args.update_shape, emit, new, side, deadline)


if __name__ == "__main__":
    main()
