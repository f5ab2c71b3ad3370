"""The demo's promise, guarded: on the shortened demo (`configs/demo.py:short`: the same SFT
warm-up, then 10 GRPO steps) GRPO improves held-out Acc@0.5 over the SFT-only start.

The recorded full run is in the README; this is the same program with fewer GRPO steps and
no evaluations in between (~3–4 min on 2 CPU cores). Runs on one device of the fake ones.
"""

import json

import jax

from configs import demo
from pr1_jax import train


def test_short_demo_grpo_improves_over_sft(tmp_path):
    c = demo.get_config("short")
    c.workdir = str(tmp_path)
    summary = train.train_and_evaluate(c, devices=jax.devices()[:1])

    start, end = summary["eval_at_grpo_start"], summary["eval_last"]
    print(f"held-out Acc@0.5: {start:.1f} after SFT -> {end:.1f} after {summary['steps']} GRPO steps")
    evals = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(e["phase"], e["step"]) for e in evals] == [("grpo", 0), ("grpo", 10)]
    assert all(e["n"] == 64 for e in evals)
    assert evals[0]["parse_fail"] < 35 and evals[1]["parse_fail"] <= evals[0]["parse_fail"]
    assert 10 <= start <= 70  # SFT alone localises some, not most, of the shapes
    assert end >= start + 15, (start, end)  # GRPO: +15 points or more (recorded, 10 steps of the full run: 32.8 -> 59.4)
    assert evals[1]["iou"] > evals[0]["iou"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 10
    for name in ("reward.png", "eval.png", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "checkpoints" / "step_10").is_dir()
