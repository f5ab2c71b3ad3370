"""The runs users make: `pr1_jax.train` itself on each recipe of `configs/`, timed per phase
against the ideal cost of the step's real tokens.

    python3 -m benchmarks.bench_recipes --recipes=grounding,counting,detection,ocr --steps=16 \
        [--set=sampling.max_new_tokens=1536] [--out=benchmarks/results/FILE.jsonl]

Each recipe runs its config unchanged (defaults: kernels, micro-batch and remat chosen by
`pr1_jax.programs`) except: random bf16 weights at the real size (Qwen2-VL-2B; Qwen2.5-VL-3B
for detection) written as an HF directory here; synthetic PR1-format data with images of
the data set's size (`RECIPES`); answers ended at lengths drawn from the task's
distribution (`sampling.end_lengths=task`, `pr1_jax/workload.py`: random weights never emit
EOS); no evaluation; `total_steps=--steps`. Everything else is the training loop's own code.

Per phase it prints the median over the steps that compiled nothing (`compiled == 0` in
metrics.jsonl; the first and last steps left out), the median over the steps whose rollout
compiled nothing with the update's exactly-measured compile time taken out ("excl": a short
benchmark sees a new shape rung at most steps; a long run stops compiling), and the ideal:
  update   8·N_dec·T_real + 8·N_vit·patches + attention (4 passes × 4·context·width per token
           and layer), at 45% of the chip's dense bf16 peak (`--peak_tflops`);
  prefill  2·N_dec·prompt tokens + 2·N_vit·patches + attention, at the same rate;
  decode   one step per token of the longest completion, each reading the decoder weights,
           the LM head and the KV cache so far (the prompt's once per group), at the copy
           bandwidth measured in this process;
  host     (data, rewards): 0 — they should be small, and overlap is not yet done.
ratio = measured / ideal for the step (sum of the above).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs import counting, detection, grounding, ocr

PEAK_TFLOPS = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "cpu": 1.0}
MFU = 0.45
# recipe → (config module, model preset, synthetic writer kwargs): COCO photos of 480–640 px a
# side (RefCOCO, COCO detection); web photos near 1 MP (PixMo-Count); pages near 1 MP (PageOCR).
RECIPES = {
    "grounding": (grounding, "qwen2_vl_2b", dict(min_side=480, max_side=640)),
    "counting": (counting, "qwen2_vl_2b", dict(min_side=800, max_side=1200)),
    "detection": (detection, "qwen2_5_vl_3b", dict(min_side=480, max_side=640)),
    "ocr": (ocr, "qwen2_vl_2b", dict(width=1000, height=1000, max_lines=30, font_size=24)),
}
PHASES = ("data", "prefill", "decode", "rewards", "update", "checkpoint")


def write_random_checkpoint(out: Path, preset: str, max_pixels: int) -> Path:
    """An HF directory with random bf16 weights of `preset`'s size: the processor and tokenizer
    files of a tiny transformers-written checkpoint, our weights in HF layout (`hf_io`)."""
    from flax.core import meta

    from pr1_jax import export, tiny
    from pr1_jax.model import hf_io
    from pr1_jax.model.config import PRESETS
    from pr1_jax.model.qwen2_vl import init_params

    out = Path(out)
    model_dir = out / preset
    if (model_dir / "config.json").is_file():  # written by an earlier run into the same --workdir
        return model_dir
    base = tiny.write_tiny_checkpoint(out / "base", max_pixels=max_pixels)
    cfg = PRESETS[preset]()
    params = jax.device_get(jax.jit(lambda: meta.unbox(init_params(cfg, dtype=jnp.bfloat16)))())
    model_dir.mkdir(parents=True, exist_ok=True)
    export.write_safetensors(model_dir, hf_io.to_hf_state_dict(params, cfg), export.parse_size("4GB"))
    (model_dir / "config.json").write_text(json.dumps(dict(cfg.to_hf_dict(), torch_dtype="bfloat16"), indent=2))
    for name in os.listdir(base):
        if not name.startswith(("model", "config.json")):
            shutil.copyfile(base / name, model_dir / name)
    return model_dir


def model_sizes(cfg) -> dict[str, float]:
    """Parameter counts (decoder incl. the LM head, vision) and shapes for the FLOP model."""
    from pr1_jax.model import hf_io

    shapes = hf_io.param_shapes(cfg)
    n_vit = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("visual"))
    n_dec = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("decoder"))
    t = cfg.text
    n_dec += t.vocab_size * t.width  # the LM head (tied or not; the embedding lookup is free)
    weight_bytes = 2 * n_dec
    kv_per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 2  # K and V, bf16
    return dict(n_dec=n_dec, n_vit=n_vit, layers=t.num_layers, width=t.width, vit_layers=cfg.vision.depth,
                vit_width=cfg.vision.width, weight_bytes=weight_bytes, kv_per_token=kv_per_token)


def ideal_seconds(row: dict, m: dict, prompts: int, g: int, flops_per_s: float, bytes_per_s: float) -> dict:
    """The ideal time of each phase for one step's real sizes (module docstring)."""
    p_tok, c_tok, patches = row["tokens/prompt_real"], row["tokens/completion_real"], row["tokens/patches_real"]
    p_mean, c_mean = p_tok / prompts, c_tok / max(prompts * g, 1)
    # Σ context over tokens: each prompt token sees ~P/2, each completion token P + L/2.
    ctx_prompt = prompts * p_mean ** 2 / 2
    ctx_comp = c_tok * (p_mean + c_mean / 2)
    ctx_vit = patches * (patches / prompts)  # full attention within an image (window attention: less)
    attn = lambda ctx, layers, width: 4 * ctx * width * layers  # noqa: E731  one pass
    update = (8 * m["n_dec"] * (p_tok + c_tok) + 8 * m["n_vit"] * patches
              + 4 * (attn(ctx_prompt + ctx_comp, m["layers"], m["width"])) + 4 * attn(ctx_vit, m["vit_layers"],
                                                                                         m["vit_width"]))
    prefill = (2 * m["n_dec"] * p_tok + 2 * m["n_vit"] * patches + attn(ctx_prompt, m["layers"], m["width"])
               + attn(ctx_vit, m["vit_layers"], m["vit_width"]))
    steps = int(row["completion_length_max"])
    # KV read per step: the prompts' once per group + all rows' own tokens so far (≈ half the longest on average)
    kv = m["kv_per_token"] * (p_tok + prompts * g * steps / 2)
    decode = steps * (m["weight_bytes"] + kv) / bytes_per_s
    return {"update": update / flops_per_s, "prefill": prefill / flops_per_s, "decode": decode}


def run_recipe(name: str, steps: int, workdir: Path, model_dirs: dict, overrides: list[str], smoke: bool = False,
               devices=None, configure=None):
    """`pr1_jax.train` on recipe `name` (on `devices`, default all); `configure(c)` edits the
    config after the benchmark's settings and before `overrides` (bench_scaling: batch, mesh)."""
    from pr1_jax import train

    module, preset, synth = RECIPES[name]
    c = module.get_config()
    c.model_dir = str(model_dirs[preset])
    if smoke:  # a tiny model, small images and batches: checks the script on a CPU
        c.model_dir, c.dtype, c.batch.prompts_per_step = "tiny", "float32", 2
        c.sampling.max_new_tokens, c.batch.seq_len, c.batch.patch_row_len = 32, 256, 256
        synth = dict(min_side=56, max_side=112) if name != "ocr" else dict(width=112, height=56, max_lines=2)
    c.workdir = str(workdir)
    c.total_steps = steps
    c.data.synthetic = c.batch.prompts_per_step * steps
    c.data.synthetic_kwargs = synth
    c.data.eval_examples = 0
    c.data.train_sample_size = -1
    c.sampling.end_lengths = "task"
    c.checkpoint_every = 10**9  # the last step still saves one
    if configure is not None:
        configure(c)
    for item in overrides:
        key, value = item.split("=", 1)
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value.lower() == "true"
    train.train_and_evaluate(c, devices=devices)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return rows, c


def summarize(name: str, rows: list[dict], c, sizes: dict, flops_per_s: float, bw: float) -> dict:
    """Medians per phase over the steady steps: steps that compiled nothing, and (`_excl`)
    steps whose rollout compiled nothing, with the update programs' compile time taken out of
    their update phase (`time/update_compile_s` is measured exactly: programs compile before
    they run). The first step and the last (its checkpoint) are left out of both, and a
    profiled step (`--profile_update`)."""
    body = [r for r in rows[1:-1] if not r.get("traced")] or rows
    steady = [r for r in body if r["compiled"] == 0]
    excl = [r for r in body if r["compiled_rollout"] == 0] or body
    med = lambda key, rs: statistics.median(r.get(key, 0.0) for r in rs)  # noqa: E731
    minus = lambda r, k: r.get(k, 0.0) - (r.get("time/update_compile_s", 0.0) if k in ("time/update_s",  # noqa: E731
                                                                                       "time/step_s") else 0.0)
    measured = {p: med(f"time/{p}_s", steady) if steady else float("nan") for p in PHASES + ("step",)}
    measured_excl = {p: statistics.median(minus(r, f"time/{p}_s") for r in excl) for p in PHASES + ("step",)}
    ideals = [ideal_seconds(r, sizes, c.batch.prompts_per_step, c.grpo.num_generations, flops_per_s, bw)
              for r in excl]
    ideal = {k: statistics.median(i[k] for i in ideals) for k in ideals[0]}
    ideal["step"] = sum(ideal.values())
    tokens = {k: med(k, excl) for k in excl[0] if k.startswith("tokens/")}
    r3 = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
    return {"recipe": name, "steps": len(rows), "steady_steps": len(steady), "excl_steps": len(excl),
            "compiles": [r["compiled"] for r in rows], "measured_s": r3(measured), "measured_excl_s": r3(measured_excl),
            "ideal_s": r3(ideal), "ratio": round(measured["step"] / ideal["step"], 3),
            "ratio_excl": round(measured_excl["step"] / ideal["step"], 3),
            "tokens": tokens, "decode_steps": med("decode_steps", excl),
            "completion_length_mean": med("completion_length_mean", excl),
            "completion_length_max": med("completion_length_max", excl),
            "max_new_tokens": c.sampling.max_new_tokens, "end_lengths": c.sampling.end_lengths,
            "prompts_per_step": c.batch.prompts_per_step, "G": c.grpo.num_generations,
            "update_choice": sorted({(r["update/prompts_per_micro"], r["update/remat"]) for r in rows}),
            "decode_attention": c.sampling.decode_attention}


def print_table(rec: dict) -> None:
    print(f"\n{rec['recipe']}: {rec['steps']} steps, compiled per step {rec['compiles']}; {rec['steady_steps']} "
          f"compiled nothing, {rec['excl_steps']} compiled no rollout program (excl: their update compile time "
          f"taken out). Mean answer {rec['completion_length_mean']:.0f} tokens, longest "
          f"{rec['completion_length_max']:.0f}, max_new_tokens {rec['max_new_tokens']}; update (prompts per "
          f"micro-batch, remat): {rec['update_choice']}")
    print(f"{'phase':12s}{'steady s':>10s}{'excl s':>10s}{'ideal s':>10s}{'ratio':>8s}")
    for k, v in rec["measured_excl_s"].items():
        ideal = rec["ideal_s"].get(k, 0.0)
        ratio = f"{v / ideal:8.2f}" if ideal else f"{'':8s}"
        print(f"{k:12s}{rec['measured_s'][k]:10.3f}{v:10.3f}{ideal:10.3f}{ratio}")


def profile_updates(k: int, top: int, trace_dir: Path) -> dict:
    """Wraps `Programs.update` so that its first call from the k-th on whose program is compiled
    already runs under `jax.profiler.trace`, and prints the kernels of that update taking most
    time: the training loop's own update, not a copy of it. Returns the counters (`main` resets
    them per recipe and leaves the traced step out of the timings)."""
    from benchmarks.profile_rollout import kernel_times
    from pr1_jax import programs

    real, calls = programs.Programs.update, {"n": 0, "traced": False}

    def update(self, state, ref_params, batch):
        calls["n"] += 1
        compiled = ("update",) + programs._shape_key(batch) in self._compiled
        if calls["traced"] or calls["n"] < k or not compiled:
            return real(self, state, ref_params, batch)
        calls["traced"] = calls["n"]  # = the GRPO step (one update per step)
        with jax.profiler.trace(str(trace_dir)):
            out = jax.block_until_ready(real(self, state, ref_params, batch))
        total, count = kernel_times(str(trace_dir))
        print(f"# update call {calls['n']}: {sum(total.values()) / 1e6:.1f} ms of kernels; top {top}:")
        for name, ns in total.most_common(top):
            print(f"{ns / 1e6:10.3f} ms {count[name]:6d}x  {name[:110]}")
        return out

    programs.Programs.update = update
    return calls


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="grounding")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    p.add_argument("--out", default=None, help="append one JSON line per recipe here")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak (default: by device)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny model and small shapes, to check the script on a CPU")
    p.add_argument("--profile_update", type=int, default=0,
                   help="trace the K-th GRPO update of each recipe (leave it to the last step: that step's time "
                        "then includes the trace) and print its kernels taking most time")
    p.add_argument("--profile_top", type=int, default=30)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)  # pr1_jax's lines: compiles, the update's micro-batch choice
    from benchmarks.bench_model import copy_bandwidth

    device = jax.devices()[0].device_kind
    peak = args.peak_tflops or PEAK_TFLOPS.get(device, 989.0)
    bw = copy_bandwidth(1 << 30 if jax.default_backend() != "cpu" else 1 << 22)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pr1_recipes_"))
    names = args.recipes.split(",")
    t0 = time.perf_counter()
    model_dirs = {}
    for name in names:
        preset = RECIPES[name][1]
        if preset not in model_dirs and not args.smoke:
            model_dirs[preset] = write_random_checkpoint(root / "models", preset, max_pixels=1_000_000)
        model_dirs.setdefault(preset, "tiny")
    print(f"# checkpoints written in {time.perf_counter() - t0:.0f} s; copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"peak {peak:.0f} TFLOP/s × {MFU}")
    calls = profile_updates(args.profile_update, args.profile_top, root / "trace") if args.profile_update else None
    for name in names:
        run_dir = root / f"run_{name}_{len(list(root.glob(f'run_{name}_*')))}"
        if calls is not None:
            calls.update(n=0, traced=False)
        rows, c = run_recipe(name, args.steps, run_dir, model_dirs, args.set, args.smoke)
        for r in rows:  # the traced step's time includes the trace: left out of the medians
            r["traced"] = calls is not None and r["step"] == calls["traced"]
        from pr1_jax.model.config import ModelConfig

        model_cfg = ModelConfig.from_pretrained(model_dirs[RECIPES[name][1]] if not args.smoke
                                                else run_dir / "base_model")
        rec = summarize(name, rows, c, model_sizes(model_cfg), MFU * peak * 1e12, bw)
        rec.update(device=device, date=time.strftime("%Y-%m-%d"), jax=jax.__version__, overrides=args.set,
                   copy_bandwidth=bw, peak_tflops=peak,
                   command="python3 -m benchmarks.bench_recipes " + " ".join(
                       [f"--recipes={name}", f"--steps={args.steps}"] + [f"--set={s}" for s in args.set]))
        print_table(rec)
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
