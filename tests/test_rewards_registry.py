"""The reward registry contract: names, get(), columns, dtypes, chat-format completions."""

import numpy as np
import pytest

from pr1_jax import rewards

PR1_NAMES = {"pr1_grounding", "pr1_grounding_format", "pr1_counting", "pr1_detection", "pr1_ocr"}
TWINS = {"grounding_iou", "grounding_format_strict", "counting_strict", "detection_robust", "ocr_edit_distance"}

GT = {"pr1_grounding": "[0, 0, 100, 100]", "grounding_iou": "[0, 0, 100, 100]",
      "pr1_counting": [[50, 50]], "counting_strict": [[50, 50]],
      "pr1_detection": {"target_id": [1], "target_box": [[0, 0, 10, 10]]},
      "detection_robust": {"target_id": [1], "target_box": [[0, 0, 10, 10]]},
      "pr1_ocr": "text", "ocr_edit_distance": "text", "pr1_grounding_format": None, "grounding_format_strict": None}


def test_names():
    assert PR1_NAMES | TWINS <= set(rewards.names())
    assert rewards.names() == sorted(rewards.names())


def test_unknown_name():
    with pytest.raises(KeyError, match="registered"):
        rewards.get("nope")


def test_get_binds_knobs():
    fn = rewards.get("pr1_detection", do_penalty=False)
    assert fn.__name__ == "pr1_detection" and "PR1" in fn.__doc__
    text = '[{"bbox_2d": [0, 0, 10, 10], "label": "person"}, {"bbox_2d": [50, 50, 60, 60], "label": "cat"}]'
    sol = [{"target_id": [1], "target_box": [[0, 0, 10, 10]]}]
    assert fn([text], solution=sol)[0] > rewards.get("pr1_detection")([text], solution=sol)[0]
    assert fn([text], solution=sol, do_penalty=True)[0] == rewards.get("pr1_detection")([text], solution=sol)[0]


@pytest.mark.parametrize("name", sorted(PR1_NAMES | TWINS))
def test_contract(name):
    fn = rewards.get(name)
    extra = dict(problem=["p"] * 3, image=[None] * 3, current_step=7, prompts=["x"] * 3, whatever=object())
    out = fn(["", "<", "junk"], solution=[GT[name]] * 3, **extra)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3,)
    assert fn([], solution=[]).shape == (0,)
    # PR1/TRL chat-format completions are accepted too
    chat = [[{"role": "assistant", "content": "<"}]]
    assert fn(chat, solution=[GT[name]]).shape == (1,)


@pytest.mark.parametrize("name", sorted((PR1_NAMES | TWINS) - {"pr1_grounding_format", "grounding_format_strict"}))
def test_solution_length_mismatch_raises(name):
    with pytest.raises(ValueError):
        rewards.get(name)(["a", "b"], solution=[GT[name]])
