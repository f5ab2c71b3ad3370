"""Does the curriculum do what it is for? A CPU demonstration on synthetic grounding whose
examples vary in difficulty (1 to 4 shapes per image: the more distractors, the harder).

    python -m benchmarks.curriculum_demo [--out=runs/curriculum_demo] [--grpo_steps=40]

1. SFT warm-up of the tiny demo model (configs/demo.py, 1–4 shapes), exported: the starting policy.
2. The offline pass (`pr1_jax.data.curriculum`) scores every training example with it.
3. GRPO from the starting policy twice, the same steps, G and data: without a curriculum, and
   with two stages (the easy half first, both halves from mid-run; `data.curriculum`).
Prints both held-out curves (Acc@0.5) and the first step at which each reaches the target
(the starting policy's score + `--gain` points), and appends a line to
benchmarks/results/curriculum_demo.jsonl.
Every stage runs the product's code (`pr1_jax.train`, `pr1_jax.data.curriculum`, `pr1_jax.export`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from configs import demo
from pr1_jax import export, train
from pr1_jax.data import curriculum

SCENES = dict(min_side=112, max_side=112, min_shapes=1, max_shapes=4, colors=("red", "blue"), size_frac=(0.7, 0.9),
              background="coords", grid=2)


def base_config(workdir: Path, examples: int):
    c = demo.get_config()
    c.workdir = str(workdir)
    c.data.synthetic = examples
    c.data.synthetic_kwargs = dict(SCENES)
    c.data.eval_examples = 64
    c.checkpoint_every = 10**6
    return c


def eval_curve(workdir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (workdir / "eval.jsonl").read_text().splitlines()]
    return [(r["step"], r["acc@0.5"]) for r in rows if r["phase"] == "grpo"]


def first_at(curve, target: float) -> int | None:
    return next((step for step, score in curve if score >= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/curriculum_demo")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--sft_steps", type=int, default=160)
    p.add_argument("--grpo_steps", type=int, default=40)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--gain", type=float, default=5.0, help="target: the starting score + this many points")
    p.add_argument("--results", default="benchmarks/results/curriculum_demo.jsonl")
    args = p.parse_args()
    out = Path(args.out)
    t0 = time.time()
    devices = jax.devices()[:1]

    # 1. The starting policy: the demo's SFT warm-up on 1–4 shapes, then one GRPO step at lr 0.
    c = base_config(out / "sft", args.examples)
    c.sft.steps, c.total_steps, c.optim.learning_rate = args.sft_steps, 1, 0.0
    if not (out / "start").is_dir():
        train.train_and_evaluate(c, devices=devices)
        export.export(out / "sft" / "checkpoints", out / "start", step=0)

    # 2. The offline pass with the starting policy (same seed: the same synthetic rows).
    c = base_config(out / "pass_run", args.examples)
    c.model_dir, c.sft.steps = str(out / "start"), 0
    diff = curriculum.score_pass(c, out / "difficulty", samples=args.samples, buckets=2, devices=devices)

    # 3. GRPO from the starting policy, without and with the curriculum.
    curves = {}
    for name in ("baseline", "curriculum"):
        c = base_config(out / name, args.examples)
        c.model_dir, c.sft.steps, c.total_steps, c.eval_every = str(out / "start"), 0, args.grpo_steps, 5
        if name == "curriculum":
            c.data.curriculum.difficulty = str(out / "difficulty" / "difficulty.json")
            c.data.curriculum.stage_steps = (0, args.grpo_steps // 2)
        if not (out / name / "summary.json").is_file():
            train.train_and_evaluate(c, devices=devices)
        curves[name] = eval_curve(out / name)

    target = curves["baseline"][0][1] + args.gain  # step 0: the starting policy, the same in both runs
    result = {"date": time.strftime("%Y-%m-%d"), "device": "CPU (2 cores)", "command": "python -m "
              "benchmarks.curriculum_demo " + " ".join(f"--{k}={v}" for k, v in vars(args).items()),
              "bucket_reward_range": diff.get("reward_range"), "target_acc@0.5": target,
              **{f"{k}_curve": v for k, v in curves.items()},
              **{f"{k}_first_step_at_target": first_at(v, target) for k, v in curves.items()},
              "seconds": round(time.time() - t0)}
    print(f"{'step':>5} {'baseline':>9} {'curriculum':>11}")
    for (s, a), (_, b) in zip(curves["baseline"], curves["curriculum"]):
        print(f"{s:>5} {a:>9.1f} {b:>11.1f}")
    print(f"target {target:.1f}: baseline at step {result['baseline_first_step_at_target']}, "
          f"curriculum at step {result['curriculum_first_step_at_target']}")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
