"""GPU benchmark of pr1_jax at the Qwen2-VL-2B architecture (random bf16 weights).

    python3 benchmarks/bench_model.py --modes=forward,rollout [--out=FILE.jsonl]

forward: 8 × (448×448 image = 1,024 patches → 256 tokens, + 62 text tokens = 318) → logits.
rollout: B prompts × G samples, 256 new tokens each (EOS ignored so lengths are fixed),
  temperature 1, no top-p/top-k — the settings of the transformers peer
  (`hf_qwen2vl_generate.py`), which runs in the same device call.
Also measures the device-to-device copy bandwidth for the roofline: decode must read the
decoder weights, the (tied) output embedding, the prompt K/V once per group and the
completion K/V so far at every step.
Prints one JSON line per measurement; `benchmarks/RESULTS.md` keeps the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def prompts(cfg, b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = SIDE // 14
    n_tok = g * g // 4
    rows, images = [], []
    for _ in range(b):
        rows.append(np.concatenate([rng.integers(0, 150000, TEXT_BEFORE), [cfg.vision_start_token_id],
                                    np.full(n_tok, cfg.image_token_id), [cfg.vision_end_token_id],
                                    rng.integers(0, 150000, TEXT_AFTER)]).astype(np.int32))
        images.append((rng.standard_normal((g * g, cfg.vision.patch_dim)).astype(np.float32), (1, g, g)))
    inputs = pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=151643,
                             seq_len=len(rows[0]), row_len=g * g, num_rows=b)
    return jax.tree.map(jnp.asarray, inputs)


def timeit(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth() -> float:
    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
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


def bench_update(cfg, params, shape: str) -> dict:
    import optax  # noqa: F401

    from pr1_jax import grpo
    from pr1_jax.train_step import OptimConfig, Rollouts, init_state, make_optimizer, make_update_fn

    b, g = (int(x) for x in shape.split("x"))
    model = Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True)
    inputs = prompts(cfg, b)
    rng = np.random.default_rng(0)
    comp = jnp.asarray(rng.integers(0, 150000, (1, b, g, NEW)), jnp.int32)
    batch = Rollouts(prompts=jax.tree.map(lambda a: a[None], inputs), completions=comp,
                     mask=jnp.ones(comp.shape, bool), advantages=jnp.asarray(rng.standard_normal((1, b, g)), jnp.float32),
                     old_logp=jnp.zeros(comp.shape, jnp.float32), group_weight=jnp.ones((1, b, g), jnp.float32))
    optimizer = make_optimizer(OptimConfig())
    update = make_update_fn(model, optimizer, grpo.GRPOConfig(num_generations=g), chunk_size=256)
    ref = jax.tree.map(jnp.copy, params)
    state = init_state(jax.tree.map(jnp.copy, params), optimizer)
    state, m = update(state, ref, batch)  # compile
    jax.block_until_ready(m)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        state, m = update(state, ref, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    s = min(times)
    flops = update_flops(cfg, b, g, int(inputs.input_ids.shape[1]), NEW, int(inputs.pixels.shape[1]))
    mem = jax.devices()[0].memory_stats() or {}
    return {"measure": "update", "prompts": b, "samples": g, "sequences": b * g,
            "seq": int(inputs.input_ids.shape[1]) + NEW, "seconds": round(s, 3),
            "needed_tflop": round(flops / 1e12, 1), "mfu_989": round(flops / s / 989e12, 3),
            "peak_gb": round(mem.get("peak_bytes_in_use", 0) / 2**30, 1),
            "sequences_per_s": round(b * g / s, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="forward,rollout")
    p.add_argument("--rollouts", default="8x8,8x16,64x8", help="BxG list")
    p.add_argument("--out", default=None)
    p.add_argument("--update_shape", default="8x8", help="prompts x G for the update step")
    p.add_argument("--unroll", type=int, default=1, help="decoder layers unrolled per scan step when sampling")
    p.add_argument("--smoke", action="store_true", help="a tiny model, to check the script on a CPU")
    p.add_argument("--preset", default="qwen2_vl_2b", choices=sorted(PRESETS))
    args = p.parse_args()
    cfg = PRESETS[args.preset]()
    if args.smoke:
        cfg = ModelConfig(text=TextConfig(width=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                          head_dim=16, mrope_section=(2, 3, 3)),
                          vision=VisionConfig(depth=2, width=32, num_heads=4, mlp_dim=128, out_width=64))
    device = jax.devices()[0].device_kind
    params = jax.jit(lambda: meta.unbox(init_params(cfg, dtype=jnp.bfloat16)))()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    model = Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    results = []

    def emit(rec):
        rec.update(device=device, jax=jax.__version__, date=time.strftime("%Y-%m-%d"), preset=args.preset)
        results.append(rec)
        print(json.dumps(rec), flush=True)

    bw = copy_bandwidth()
    emit({"measure": "copy_bandwidth", "bytes_per_s": bw, "params": int(n_params)})
    if "forward" in args.modes:
        inputs = prompts(cfg, 8)
        fwd = jax.jit(lambda prm, x: model.apply({"params": prm}, x))
        s = timeit(lambda: fwd(params, inputs), 5)
        emit({"measure": "forward", "batch": 8, "seq": int(inputs.input_ids.shape[1]), "seconds": round(s, 4)})
    if "rollout" in args.modes:
        decode_model = Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_unroll=args.unroll)
        sampler = Sampler(decode_model, eos_ids=(151645, 151643), pad_id=151643)
        t_ = cfg.text
        dec_bytes = 2 * sum(x.size for x in jax.tree.leaves(params["decoder"]))
        head_bytes = 2 * t_.vocab_size * t_.width
        kv_tok = 2 * t_.num_layers * t_.num_kv_heads * t_.head_dim * 2  # K and V, bf16, per token
        for spec in args.rollouts.split(","):
            b, g = (int(v) for v in spec.split("x"))
            inputs = prompts(cfg, b)
            scfg = SamplingConfig(num_samples=g, max_new_tokens=NEW, temperature=1.0, ignore_eos=True)
            key = jax.random.PRNGKey(0)
            s = timeit(lambda: sampler(params, inputs, key, scfg).tokens, 2)
            out = sampler(params, inputs, key, scfg)
            assert int(out.lengths.min()) == NEW
            step_bytes = dec_bytes + head_bytes + kv_tok * (b * inputs.input_ids.shape[1] + b * g * NEW / 2)
            roofline_s = NEW * step_bytes / bw
            emit({"measure": "rollout", "prompts": b, "samples": g, "sequences": b * g, "new_tokens": NEW,
                  "prompt_tokens": int(inputs.input_ids.shape[1]), "seconds": round(s, 3),
                  "tokens_per_s": round(b * g * NEW / s, 1), "roofline_fraction": round(roofline_s / s, 3),
                  "ms_per_step": round(1e3 * s / NEW, 3), "unroll": args.unroll,
                  "xla_flags": os.environ.get("XLA_FLAGS", "")})
    if "update" in args.modes:
        emit(bench_update(cfg, params, args.update_shape))
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
