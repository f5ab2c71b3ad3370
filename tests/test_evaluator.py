"""The one evaluator: a training run's held-out evaluation reports the same paper metrics as
`python -m pr1_jax.evaluate` on the same checkpoint, data and prompt, for every task."""

import json

import jax
import pytest

from configs import demo
from pr1_jax import evaluate, evaluator, tasks, train
from pr1_jax.errors import ConfigError


def _config(workdir, task):
    c = demo.get_config()
    c.workdir = str(workdir)
    c.task = task
    c.rewards = tasks.get(task).default_rewards
    if task != "grounding":  # the demo's image kwargs are the grounding writer's
        c.data.synthetic_kwargs = dict(min_side=112, max_side=168) if task != "ocr" else {}
    c.data.synthetic = 4
    c.data.eval_examples = 5  # two evaluation batches of 4, the last one padded
    c.data.eval_batch = 4
    c.data.eval_prompt = "training"
    c.sft.steps = 0
    c.total_steps = 1
    c.eval_every = 10
    c.batch.prompts_per_step = 2
    c.batch.prompts_per_micro = 2
    c.grpo.num_generations = 2
    c.sampling.max_new_tokens = 12
    c.batch.seq_len = 256 if task == "detection" else 128
    return c


@pytest.mark.parametrize("task", ["grounding", "counting", "detection", "ocr"])
def test_training_evaluation_equals_the_command_line(task, tmp_path, monkeypatch):
    answered = []  # every decoded batch's texts, padding rows included
    decode = evaluator.greedy_decode

    def spy(*args):
        out = decode(*args)
        answered.append([c.text for c in out])
        return out

    monkeypatch.setattr(evaluator, "greedy_decode", spy)
    c = _config(tmp_path, task)
    train.train_and_evaluate(c, devices=jax.devices()[:1])
    training_texts = answered[:2]  # the evaluation at step 0: two batches
    logged = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    at_start = next(row for row in logged if row["phase"] == "grpo" and row["step"] == 0)
    data = next(p for p in (tmp_path / "data").iterdir() if p.name in ("eval.json", "eval.jsonl"))
    report = evaluate.evaluate(task, tmp_path / "base_model", data, image_dir=tmp_path / "data",
                               batch_size=c.data.eval_batch, max_new_tokens=c.sampling.max_new_tokens,
                               min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels, prompt="training",
                               progress=False)
    assert answered[-2:] == training_texts and any(t for batch in training_texts for t in batch)
    metrics = report["metrics"]
    assert metrics["n"] == c.data.eval_examples and tasks.get(task).headline in metrics
    assert {k: at_start[k] for k in metrics} == metrics
    # The paper's prompt is another prompt: the CLI's default, and what `data.eval_prompt="paper"` sends.
    assert report["config"]["prompt_template"] == tasks.get(task).prompt
    if task == "detection":
        assert tasks.get(task).eval_prompt != tasks.get(task).prompt


def test_prompt_styles(tiny_dir):
    """'paper': the evaluation scripts' user text and no system message (Qwen's template adds its
    default); 'training': the training prompt after the run's system prompt."""
    from pr1_jax.pretrained import Pretrained

    pre = Pretrained.load(tiny_dir)
    row = {"problem": "the red circle"}
    paper = evaluator.Evaluator(pre, "detection", sample=None, batch_size=1, max_new_tokens=1)
    training = evaluator.Evaluator(pre, "detection", sample=None, batch_size=1, max_new_tokens=1, prompt="training",
                                   system_prompt="Be brief.")
    assert paper.user_text(row).startswith("Locate every item") and training.user_text(row).startswith("Please output")
    assert [m["role"] for m in paper.messages("x")] == ["user"]
    assert training.messages("x")[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ConfigError, match="evaluation prompt must be one of"):
        evaluator.Evaluator(pre, "grounding", sample=None, batch_size=1, max_new_tokens=1, prompt="eval")
