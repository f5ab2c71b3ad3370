"""The task registry: each task's answer format scores perfectly under its own paper metric,
and what the rest of the package asks of a task comes from its module."""

import numpy as np
import pytest

from pr1_jax import tasks, workload
from pr1_jax.data import readers, stats
from pr1_jax.errors import ConfigError
from pr1_jax.evaluation import counting as counting_eval


def _examples(task, tmp_path, n=6):
    files = tasks.get(task).write_synthetic(tmp_path, n, seed=3)
    rows, _ = readers.read(files.path, task, image_dir=files.image_dir)
    out = []
    for ex in rows:
        h, w = (int(ex.get("height", 0)) or 100, int(ex.get("width", 0)) or 100)
        out.append(dict(ex, orig_hw=(h, w), resized_hw=(h, w)))
    return out


def test_registry():
    assert tasks.names() == ["counting", "detection", "grounding", "ocr"]
    with pytest.raises(ConfigError, match="unknown task 'groundng'.*did you mean 'grounding'"):
        tasks.get("groundng")
    assert str(workload.EndLengths.parse("task", "ocr")) == tasks.get("ocr").end_lengths


@pytest.mark.parametrize("task", ["grounding", "detection", "ocr"])
def test_sft_answers_score_perfectly(task, tmp_path):
    t = tasks.get(task)
    examples = _examples(task, tmp_path)
    perfect = t.metrics([t.target(ex).removesuffix("<|im_end|>") for ex in examples], examples)  # decoded: no EOS
    wrong = t.metrics(["no answer"] * len(examples), examples)
    best, sign = {"grounding": (100.0, 1), "detection": (1.0, 1), "ocr": (0.0, -1)}[task]  # OCR: edit distance
    assert perfect[t.headline] == pytest.approx(best), perfect
    assert sign * (perfect[t.headline] - wrong[t.headline]) > 0.5 * abs(best or 100.0), wrong


def test_counting_scores_the_number_of_boxes(tmp_path):
    t = tasks.get("counting")
    examples = _examples("counting", tmp_path)
    counts = [t.num_objects(ex) for ex in examples]
    boxes = lambda k: "".join("<|box_start|>(1,1),(5,5)<|box_end|>" for _ in range(k))  # noqa: E731
    assert counting_eval.parse_count(boxes(3)) == 3
    answers = [boxes(k) if i % 2 == 0 else boxes(k + 1) for i, k in enumerate(counts)]
    m = t.metrics(answers, examples)
    assert m[t.headline] == pytest.approx(100.0 * np.mean([i % 2 == 0 for i in range(len(counts))]))
    with pytest.raises(ConfigError, match="no SFT answer format"):
        t.target(examples[0])


def test_statistics_ask_the_task(tmp_path):
    examples = _examples("detection", tmp_path)
    assert [stats.num_objects(ex, "detection") for ex in examples] == [len(ex["solution"]["target_id"])
                                                                        for ex in examples]
    assert stats.matchings(1, "grounding") == 1 and stats.matchings(3, "counting") == 6
