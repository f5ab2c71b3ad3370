"""One step of the real entry point (`pr1_jax.train`), SFT warm-up then GRPO, on a tiny model."""

import json

from configs import demo
from pr1_jax import train


def test_train_entry_point_one_step(tmp_path):
    c = demo.get_config()
    c.workdir = str(tmp_path / "run")
    c.data.synthetic = 16
    c.data.eval_examples = 4
    c.sft.steps = 1
    c.sft.prompts_per_step = 2
    c.total_steps = 1
    c.batch.prompts_per_step = 2
    c.batch.prompts_per_micro = 1
    c.grpo.num_generations = 2
    c.sampling.max_new_tokens = 8
    c.eval_every = 1
    summary = train.train_and_evaluate(c)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["step"] == 1
    for key in ("loss", "reward", "reward_std", "kl", "completion_length", "grad_norm", "tokens_per_s"):
        assert key in lines[0], key
    assert summary["steps"] == 1 and summary["skipped_examples"]["skipped"] == 0
    for name in ("reward.png", "eval.png", "summary.json", "eval.jsonl"):
        assert (run / name).is_file(), name
    assert list(run.glob("gallery_*.png")) and (run / "checkpoints" / "step_1").is_dir()
