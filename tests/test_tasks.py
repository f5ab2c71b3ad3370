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
    assert tasks.names() == ["counting", "detection", "grounding", "ocr", "pointing"]
    with pytest.raises(ConfigError, match="unknown task 'groundng'.*did you mean 'grounding'"):
        tasks.get("groundng")
    assert str(workload.EndLengths.parse("task", "ocr")) == tasks.get("ocr").end_lengths


@pytest.mark.parametrize("task", ["grounding", "detection", "ocr", "pointing"])
def test_sft_answers_score_perfectly(task, tmp_path):
    t = tasks.get(task)
    examples = _examples(task, tmp_path)
    perfect = t.metrics([t.target(ex).removesuffix("<|im_end|>") for ex in examples], examples)  # decoded: no EOS
    wrong = t.metrics(["no answer"] * len(examples), examples)
    best, sign = {"grounding": (100.0, 1), "detection": (1.0, 1), "ocr": (0.0, -1), "pointing": (100.0, 1)}[task]
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


def test_pointing_rewards_and_metric():
    """The fifth task (one file, pr1_jax/tasks/pointing.py): a point scores when it is in the box."""
    from pr1_jax import rewards
    from pr1_jax.tasks import pointing

    box = [100, 200, 300, 400]
    texts = ["(200,300)<|im_end|><|endoftext|>", "( 100 , 400 )", "(99,300)", "(1e3,5)", "no point",
             "(200,300) and (0,0)", ""]
    hit = rewards.get("point_in_box")(texts, solution=[box] * len(texts))
    fmt = rewards.get("point_format")(texts)
    np.testing.assert_array_equal(hit, [1, 1, 0, 0, 0, 1, 0])  # edges count; the first point is the answer
    np.testing.assert_array_equal(fmt, [1, 1, 1, 0, 0, 0, 0])
    # Malformed ground truths and non-strings never raise: they score 0.
    bad = [None, [1, 2], ["a", "b", "c", "d"]]
    assert rewards.get("point_in_box")(["(1,1)"] * 3, solution=bad).tolist() == [0, 0, 0]
    assert pointing.parse_point("(nan,1)") is None and pointing.parse_point(None) is None
    with pytest.raises(ValueError, match="entries for 2 completions"):
        rewards.get("point_in_box")(["(1,1)"] * 2, solution=[box])
    m = tasks.get("pointing").metrics(texts[:5], [{"solution": box}] * 5)
    assert m == {"accuracy": 40.0, "parse_fail": 40.0, "n": 5}  # "(1e3,5)": exponents are not coordinates


def test_a_task_of_its_own_is_read_through_its_columns(tmp_path):
    """pointing's rows are read by the readers through the task's `columns` and `parse_solution`:
    the same rows as grounding's, bad boxes skipped with a counted reason."""
    import json

    files = tasks.get("pointing").write_synthetic(tmp_path, 5, seed=0)
    rows = json.loads(files.path.read_text())
    rows[0]["solution"] = "[5, 5, 1, 1]"  # x2 < x1
    files.path.write_text(json.dumps(rows))
    examples, report = readers.read(files.path, "pointing", image_dir=files.image_dir)
    same, _ = readers.read(files.path, "grounding", image_dir=files.image_dir)
    assert [ex["solution"] for ex in examples] == [ex["solution"] for ex in same] and len(examples) == 4
    assert report.reasons == {"bad_box": 1}


def test_qwen3_vl_boxes_are_scored_at_their_scale():
    """Qwen3-VL answers JSON boxes in [0, 1000]: scored as such with its model_type (PR1's
    evaluation would multiply them by 1000); detection's are mapped to the image's pixels."""
    from pr1_jax.tasks.base import Answer

    t = tasks.get("grounding")
    ex = {"solution": [100, 100, 500, 500], "problem": "the dog"}
    texts = ['```json\n[{"bbox_2d": [100, 100, 500, 500], "label": "the dog"}]\n```',
             '{"bbox_2d": [300, 300, 700, 700], "label": "the dog"}', "no box"]
    answers = [Answer(ex, text, (480, 640), (476, 644)) for text in texts]
    m = t.score(answers, model_type="qwen3_vl").metrics
    assert m["acc@0.5"] == pytest.approx(100 / 3) and m["parse_fail"] == pytest.approx(100 / 3)
    assert t.score(answers[:1]).metrics["acc@0.5"] == 0.0  # PR1's reading of the same answer

    det = {"solution": {"target_id": [18], "target_box": [[64, 48, 320, 240]]}}  # pixels of a 640×480 image
    qwen3 = '[{"bbox_2d": [100, 100, 500, 500], "label": "dog"}]'  # the same box in [0, 1000]
    m = tasks.get("detection").score([Answer(det, qwen3, (480, 640), (476, 644))], model_type="qwen3_vl").metrics
    assert m["AP"] == pytest.approx(1.0)
