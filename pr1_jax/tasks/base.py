"""What a task is: everything the rest of the package asks about one perception task.

    from pr1_jax import tasks
    task = tasks.get("grounding")
    task.question_key, task.default_rewards, task.skip_special_tokens   # prompt column, rewards, decoding
    task.sft_target(example)            # the answer in the model's native format (SFT warm-up)
    task.score(answers)                 # the paper's metrics of greedy answers, per-row records, gallery
    task.metrics(texts, examples)       # ... the metrics alone, for answers to prepared rows
    task.headline                       # which of them the paper reports (eval.png, summary.json)

One module per task (`grounding.py`, `counting.py`, `detection.py`, `ocr.py`) builds its `Task`
and registers it; `train.py`, `rollouts.py`, `evaluate.py`, `data/stats.py` and `workload.py` ask
the task instead of branching on its name. Examples are the normalised rows of
`pr1_jax.data.readers` after `pipeline.load_and_resize` (`solution`, `problem`, `orig_hw`,
`resized_hw`, ...). Both evaluations (training's and `python -m pr1_jax.evaluate`) score through
`task.score`, by way of `pr1_jax.evaluator`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from pr1_jax.errors import ConfigError

Example = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Answer:
    """A greedy answer to one example, as the evaluation scores it."""

    example: Example  # the reader's row (image, problem, solution, ...)
    text: str  # decoded without the stop token, special tokens as the task decodes them
    original_hw: tuple[int, int]  # (height, width) of the image as given
    resized_hw: tuple[int, int]  # ... and as the model saw it

    def row(self) -> dict:
        """The example with the image sizes the rewards read (`orig_hw`, `resized_hw`)."""
        return {**self.example, "orig_hw": self.original_hw, "resized_hw": self.resized_hw}


class Scores(NamedTuple):
    metrics: dict[str, float]  # the paper's metrics (`Task.headline` among them) and `n`
    records: list[dict]  # one per answer, for reports (parsed prediction, per-row score, ...)
    gallery: list[dict]  # `viz.gallery` items without their "image", one per answer ([] : no picture)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    prompt: str  # the training user text; "{question}" is filled with the example's `question_key` column
    question_key: str | None  # the example column the prompt's {question} is filled with (None: a fixed prompt)
    eval_prompt: str  # the user text of PR1's evaluation scripts (sent without a system message)
    default_rewards: tuple[str, ...]  # PR1's reward functions for this task (`pr1_jax.rewards`)
    skip_special_tokens: bool  # how PR1's scripts decode the answers before scoring them
    eval_max_new_tokens: int  # PR1's evaluation scripts' generation cap
    end_lengths: str  # answer lengths for benchmarks on random weights (`pr1_jax.workload`)
    headline: str  # the key of `metrics` the paper reports
    headline_label: str  # ... as a person reads it (plot titles)
    paper: str  # the paper's numbers for this task, for reports
    # answers → Scores; `options` are the task's own (detection: coco_gt, backend, robust, rescale, pr1_exact)
    score: Callable[..., Scores]
    num_objects: Callable[[Example], int]  # ground-truth objects of one example (data statistics)
    write_synthetic: Callable[..., Any]  # `pr1_jax.data.synthetic` writer of this task's files
    sft_target: Callable[[Example], str] | None = None  # None: no native-format answer (counting)
    # the reader formats `pr1_jax.evaluate` tries in turn (default: the task's training rows)
    eval_formats: tuple[str, ...] = ()
    # A task whose rows the readers do not know (PR1's four are read by `data/rows.py`, quirks and
    # all) declares its (image, problem, answer) columns and parses the answer column itself:
    # `parse_solution(value, row)` → the example's `solution`, raising `data.rows.Malformed`.
    columns: tuple[str, str, str] | None = None
    parse_solution: Callable[[Any, Mapping[str, Any]], Any] | None = None

    def question(self, example: Example, *, paper_eval: bool = False) -> str:
        """The training user text for one example (`paper_eval`: the evaluation scripts' text)."""
        template = self.eval_prompt if paper_eval else self.prompt
        return template.format(question=str(example.get(self.question_key, "")) if self.question_key else "")

    def metrics(self, texts: Sequence[str], examples: Sequence[Example], **options) -> dict[str, float]:
        """`score`'s metrics of answers to prepared rows (rows with `orig_hw` / `resized_hw`)."""
        answers = [Answer(ex, text, tuple(ex.get("orig_hw", (0, 0))), tuple(ex.get("resized_hw", (0, 0))))
                   for text, ex in zip(texts, examples, strict=True)]
        return self.score(answers, **options).metrics

    def target(self, example: Example) -> str:
        """`sft_target`, or a one-line error for a task without one."""
        if self.sft_target is None:
            raise ConfigError(f"task {self.name!r} has no SFT answer format (sft.steps must be 0)")
        return self.sft_target(example)


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in _REGISTRY and _REGISTRY[task.name] is not task:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def get(name: str) -> Task:
    """The task registered as `name`; a one-line error naming the closest one otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown task {name!r}; the tasks: {', '.join(sorted(_REGISTRY))}{hint}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)
