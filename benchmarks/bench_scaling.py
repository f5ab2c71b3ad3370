"""Weak scaling of the whole GRPO step as users run it: `pr1_jax.train` on one recipe over 1, 2,
4, 8 GPUs of one host, the batch growing with the GPU count, per phase.

    python3 -m benchmarks.bench_scaling --recipe=grounding --gpus=1,2,4,8 --steps=12 \
        [--prompts_per_gpu=8] [--mesh=fsdp|data] [--out=benchmarks/results/FILE.jsonl]
    python3 -m benchmarks.bench_scaling --smoke --gpus=1,2,8      # the script on 8 fake CPU devices

Each point runs `benchmarks.bench_recipes.run_recipe` (the training loop itself, random weights
at the real size, data-set-sized images, answers ended at the task's lengths) on the first n
devices with `prompts_per_gpu · n` prompts per step and a mesh of n devices on `fsdp` (or
`data`). Weak-scaling efficiency of a phase = its time on 1 GPU / its time on n GPUs (the same
work per GPU), from the medians `bench_recipes.summarize` prints (steady steps; else the
steps whose rollout compiled nothing, update compiles taken out). On several GPUs the decode
runs XLA's attention (the fused Pallas step is one-device only). NCCL's NVLink multicast stays
off (the device tool's hosts set NCCL_NVLS_ENABLE=0; keep it so).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import jax

from benchmarks import bench_recipes
from pr1_jax.model.config import ModelConfig

PHASES = ("prefill", "decode", "rewards", "update", "step")


def run_point(recipe: str, n: int, args, model_dirs: dict, root: Path) -> dict:
    """One (recipe, n devices) point: the summary of `bench_recipes`, plus n and the batch."""
    prompts = args.prompts_per_gpu * n

    def configure(c):
        c.batch.prompts_per_step = prompts
        c.data.synthetic = prompts * args.steps
        if args.mesh == "data":
            c.mesh.update(data=n, fsdp=1)
        else:
            c.mesh.update(data=1, fsdp=n)
        if args.smoke:
            c.batch.prompts_per_step, c.data.synthetic = 2 * n, 2 * n * args.steps

    run_dir = root / f"run_{recipe}_{n}"
    rows, c = bench_recipes.run_recipe(recipe, args.steps, run_dir, model_dirs, args.set, args.smoke,
                                       devices=jax.devices()[:n], configure=configure)
    preset = bench_recipes.RECIPES[recipe][1]
    cfg = ModelConfig.from_pretrained(model_dirs[preset] if not args.smoke else run_dir / "base_model")
    rec = bench_recipes.summarize(recipe, rows, c, bench_recipes.model_sizes(cfg), args.flops, args.bandwidth)
    rec.update(devices=n, mesh=dict(c.mesh), prompts_per_step=c.batch.prompts_per_step)
    return rec


def seconds(rec: dict, phase: str) -> float:
    """The point's median seconds of a phase: steady steps if any, else compile-excluded."""
    steady = rec["measured_s"].get(phase, float("nan"))
    return steady if steady == steady and rec["steady_steps"] else rec["measured_excl_s"][phase]


def print_table(recs: list[dict]) -> None:
    base = recs[0]
    print(f"\n{base['recipe']}: weak scaling, {recs[0]['prompts_per_step'] // recs[0]['devices']} prompts per device; "
          f"seconds per step (efficiency vs {base['devices']} device)")
    print(f"{'devices':>8s}{'prompts':>9s}" + "".join(f"{p:>18s}" for p in PHASES))
    for r in recs:
        cells = []
        for p in PHASES:
            s, s0 = seconds(r, p), seconds(base, p)
            cells.append(f"{s:9.3f} ({100 * s0 / s:5.1f}%)" if s > 0 else f"{s:9.3f}        ")
        print(f"{r['devices']:8d}{r['prompts_per_step']:9d}" + "".join(f"{x:>18s}" for x in cells))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="grounding", choices=sorted(bench_recipes.RECIPES))
    p.add_argument("--gpus", default="1,2,4,8", help="device counts, the first is the baseline")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prompts_per_gpu", type=int, default=8)
    p.add_argument("--mesh", choices=("fsdp", "data"), default="fsdp")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    p.add_argument("--out", default=None, help="append one JSON line per point here")
    p.add_argument("--workdir", default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny model on fake CPU devices: checks the script")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    counts = [int(x) for x in args.gpus.split(",")]
    if max(counts) > jax.device_count():
        p.error(f"--gpus={args.gpus}: this host has {jax.device_count()} devices")
    from benchmarks.bench_model import copy_bandwidth

    device = jax.devices()[0].device_kind
    peak = bench_recipes.PEAK_TFLOPS.get(device, 989.0)
    args.flops = bench_recipes.MFU * peak * 1e12
    args.bandwidth = copy_bandwidth(1 << 30 if jax.default_backend() != "cpu" else 1 << 22)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pr1_scaling_"))
    preset = bench_recipes.RECIPES[args.recipe][1]
    model_dirs = {preset: "tiny"} if args.smoke else {
        preset: bench_recipes.write_random_checkpoint(root / "models", preset, max_pixels=1_000_000)}
    recs = []
    for n in counts:
        t0 = time.perf_counter()
        rec = run_point(args.recipe, n, args, model_dirs, root)
        rec.update(device=device, date=time.strftime("%Y-%m-%d"), jax=jax.__version__, wall_s=time.perf_counter() - t0,
                   nccl_nvls=os.environ.get("NCCL_NVLS_ENABLE"),
                   command="python3 -m benchmarks.bench_scaling " + " ".join(
                       [f"--recipe={args.recipe}", f"--gpus={args.gpus}", f"--steps={args.steps}",
                        f"--prompts_per_gpu={args.prompts_per_gpu}", f"--mesh={args.mesh}"]
                       + [f"--set={s}" for s in args.set] + (["--smoke"] if args.smoke else [])))
        recs.append(rec)
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    print_table(recs)


if __name__ == "__main__":
    main()
