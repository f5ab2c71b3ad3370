"""The curriculum's training side: stages of harder data and more rollouts (`data.curriculum`).

    curriculum = Curriculum.from_config(c, num_examples=len(rows))   # one plain stage when off
    data = curriculum.iterator(rows, prepare=prepare, seed=c.seed)  # pipeline.DataIterator when off
    curriculum.advance(data, step)         # the stage of GRPO step `step` (before its prompts are read)
    g = curriculum.num_generations(step)   # G of that stage

Our reading of Perception-R1's curriculum (the paper gives the idea, not the schedule): the
offline pass (`python -m pr1_jax.data.curriculum`) orders the training rows by the starting
policy's mean reward, easiest first. With S stages (`stage_steps`, the GRPO step at which each
begins, the first 0) the order is cut into S buckets of equal size; stage s trains on buckets
0..s — each harder bucket enters at its stage and the easier ones stay — drawn in proportion
to `mix[s]` (default: to the buckets' sizes, i.e. uniformly over the rows seen so far), and
samples `num_generations[s]` answers per prompt (the paper raises the rollouts as the data
hardens, after Kimi-1.5). Config (`configs/common.py`):

    data.curriculum.difficulty = "DIR/difficulty.json"   # "" = no curriculum
    data.curriculum.stage_steps = (0, 100)
    data.curriculum.num_generations = (8, 16)            # () = grpo.num_generations in every stage
    data.curriculum.mix = ()                             # e.g. ((1.0,), (0.3, 0.7))

The iterator's state (the stage, and each stage's position) is part of the checkpoint, so a run
resumes exactly, across a stage change too. A stage's new G gives the rollout's decode and
the update new shapes. The decode's depend only on G and the prompts, so `train.py` compiles
the next stage's on a background thread at the first step of a stage (`executables.py`); the
update's depend on the answers, so it compiles at the switch: one program.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pr1_jax.data import pipeline
from pr1_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    start: int  # first GRPO step of the stage
    num_generations: int  # G
    buckets: tuple[tuple[int, ...], ...]  # example indices of buckets 0..s, easiest first
    weights: tuple[float, ...]  # how often each bucket is drawn (normalised by grain)


@dataclasses.dataclass(frozen=True)
class Curriculum:
    stages: tuple[Stage, ...]
    on: bool  # False: one stage over every row, the plain pipeline iterator

    @classmethod
    def off(cls, num_generations: int) -> "Curriculum":
        return cls((Stage(0, int(num_generations), (), ()),), on=False)

    @classmethod
    def from_config(cls, c, num_examples: int) -> "Curriculum":
        cc = c.data.get("curriculum")
        if cc is None or not cc.get("difficulty"):
            return cls.off(c.grpo.num_generations)
        steps = tuple(int(s) for s in cc.stage_steps)
        key = "--config.data.curriculum"
        if not steps or steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ConfigError(f"{key}.stage_steps must start at 0 and increase, got {steps}")
        gens = tuple(int(g) for g in cc.num_generations) or (int(c.grpo.num_generations),) * len(steps)
        if len(gens) != len(steps) or min(gens) < 2:
            raise ConfigError(f"{key}.num_generations needs one G ≥ 2 per stage ({len(steps)}), got {gens}")
        order = _read_order(cc.difficulty, num_examples)
        buckets = [tuple(int(i) for i in part) for part in np.array_split(np.array(order, np.int64), len(steps))]
        if min(len(b) for b in buckets) == 0:
            raise ConfigError(f"{key}: {len(steps)} stages need at least {len(steps)} scored examples, "
                              f"{cc.difficulty} has {len(order)}")
        mixes = tuple(tuple(float(w) for w in m) for m in cc.get("mix", ()))
        if mixes and (len(mixes) != len(steps) or any(len(m) != s + 1 for s, m in enumerate(mixes))
                      or any(min(m) < 0 or sum(m) <= 0 for m in mixes)):
            raise ConfigError(f"{key}.mix needs, per stage s, s + 1 non-negative weights with a positive sum "
                              f"(for buckets 0..s), got {mixes}")
        stages = []
        for s, (start, g) in enumerate(zip(steps, gens)):
            weights = mixes[s] if mixes else tuple(float(len(b)) for b in buckets[:s + 1])
            stages.append(Stage(start, g, tuple(buckets[:s + 1]), weights))
        return cls(tuple(stages), on=True)

    # ------------------------------------------------------------------ per step
    def stage_at(self, step: int) -> int:
        return max(s for s, stage in enumerate(self.stages) if stage.start <= step)

    def num_generations(self, step: int) -> int:
        return self.stages[self.stage_at(step)].num_generations

    def next_generations(self, step: int) -> int | None:
        """The next stage's G when it differs from the G of `step`'s stage (its rollout has new
        shapes, which `train.py` compiles ahead), else None."""
        s = self.stage_at(step)
        if s + 1 < len(self.stages) and self.stages[s + 1].num_generations != self.stages[s].num_generations:
            return self.stages[s + 1].num_generations
        return None

    @property
    def max_generations(self) -> int:
        return max(stage.num_generations for stage in self.stages)

    def iterator(self, examples: Sequence[dict], *, prepare, seed: int):
        """The run's data: `pipeline.make_iterator` without a curriculum, else a `StagedData`."""
        if not self.on:
            return pipeline.make_iterator(examples, prepare=prepare, seed=seed, num_epochs=None)
        return StagedData(self, examples, prepare=prepare, seed=seed)

    def advance(self, data, step: int) -> None:
        """Moves `data` to the stage of `step` (nothing to do without a curriculum)."""
        if self.on:
            data.enter(self.stage_at(step))

    def describe(self) -> dict[str, Any]:
        """The stages, for the run's curriculum.json and log."""
        return {"stages": [{"start": st.start, "num_generations": st.num_generations,
                            "bucket_sizes": [len(b) for b in st.buckets], "weights": list(st.weights)}
                           for st in self.stages]}

    def metrics(self, step: int, reward: float) -> dict[str, float]:
        """What a step logs about its stage: the stage, its G, and the reward under the stage's
        own name (one TensorBoard curve per stage)."""
        if not self.on:
            return {}
        s = self.stage_at(step)
        return {"curriculum/stage": float(s), "curriculum/num_generations": float(self.stages[s].num_generations),
                f"curriculum/reward_stage_{s}": float(reward)}


def _read_order(path: str, num_examples: int) -> list[int]:
    p = Path(path)
    if p.is_dir():
        p = p / "difficulty.json"
    try:
        diff = json.loads(p.read_text())
        order = [int(i) for i in diff["order"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--config.data.curriculum.difficulty: cannot read {p} ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:120]}); write it with python -m pr1_jax.data.curriculum") from e
    if sorted(order) != list(range(num_examples)):
        raise ConfigError(f"--config.data.curriculum.difficulty: {p} orders {len(order)} examples but the training "
                          f"data has {num_examples} (another file, or another data.train_sample_size?)")
    return order


class StagedData:
    """One mixed iterator per stage (`pipeline.make_mixed_iterator`), the current stage's next
    example on `next`; the state holds the stage and every started stage's position."""

    def __init__(self, curriculum: Curriculum, examples: Sequence[dict], *, prepare, seed: int):
        self._curriculum, self._examples, self._prepare, self._seed = curriculum, examples, prepare, seed
        self._iterators: dict[int, pipeline.DataIterator] = {}
        self.stage = 0
        self.enter(0)

    def _make(self, s: int) -> pipeline.DataIterator:
        stage = self._curriculum.stages[s]
        return pipeline.make_mixed_iterator(self._examples, stage.buckets, stage.weights, prepare=self._prepare,
                                            seed=self._seed * 1000 + s)

    def enter(self, s: int) -> None:
        if s not in self._iterators:
            self._iterators[s] = self._make(s)
        self.stage = s

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterators[self.stage])

    @property
    def report(self) -> pipeline.SkipReport:
        """Skips over every stage so far."""
        total = pipeline.SkipReport()
        for it in self._iterators.values():
            total.yielded += it.report.yielded
            total.skipped += it.report.skipped
            total.reasons.update(it.report.reasons)
        return total

    def get_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "stages": {str(s): it.get_state() for s, it in self._iterators.items()}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "stages" not in state:
            raise ConfigError("the checkpoint's data state is not a curriculum's (the run was started without "
                              "data.curriculum): resume it with the config it was started with")
        for key, st in state["stages"].items():
            self.enter(int(key))
            self._iterators[int(key)].set_state(st)
        self.stage = int(state["stage"])

    def close(self) -> None:
        for it in self._iterators.values():
            it.close()
