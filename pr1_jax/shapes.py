"""Static shapes chosen per step from the step's real sizes, on a small fixed ladder.

A jitted program is compiled once per input shape. Padding every prompt to `seq_len`,
every image to `patch_row_len` and every completion to `max_new_tokens` makes one program
but pays for the caps at every step (7.2–7.6 s per grounding step on an H200 where the
real work is ≈ 1.3 s). Choosing each shape exactly makes a new program almost every step.
The ladder sits between: a size n is padded up to the next rung of

    2^k · {1, 1.25, 1.5, 1.75}      (rounded up to `quantum`, at least `minimum`, at most `cap`)

so padding wastes at most 25% (under 15% on average), and a run sees a handful of rungs
per dimension (COCO's 640-px photos all land on 1–2 patch rungs). A prompt's completions
are packed whole into R rows of T tokens (`rollouts.pack_completions`); (R, T) is the
cheapest by `packing_cost`: one long row for short answers (grounding: 14 × 1 × 576), one
row per answer when they are all long (every completion 256: 8 × 256, attention never
spans two answers). The loss positions L of the `[B, G, L]` log-prob tensors cost almost
nothing, so their ladder is plain powers of two (fewer programs).
The caps (`batch.seq_len`, `batch.patch_row_len`, `sampling.max_new_tokens`) stay the
limits of what a row may hold; they are no longer the shapes.

    shapes = StepShapes.from_config(c)                  # the ladders of a run
    p = shapes.prompt(max_prompt_tokens)                 # prompt tokens of the step
    n = shapes.patches(max_image_patches)                # patches per packed image row
    l = shapes.completion(longest_completion)            # loss positions of the update
    r, t = shapes.rows(...), shapes.row(...)             # completion rows: rollouts.CompletionShape.choose
"""

from __future__ import annotations

import dataclasses
import math

# Fractions of a power of two that are rungs of the ladder.
_STEPS = (1.0, 1.25, 1.5, 1.75)
# Packed image rows hold a whole block's images: their total varies little from step to step,
# so a finer ladder (≤ 12.5% padding) costs few programs.
_FINE_STEPS = (1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875)


@dataclasses.dataclass(frozen=True)
class Ladder:
    """Rungs 2^k·{1, 1.25, 1.5, 1.75} rounded up to `quantum`, from `minimum`, capped at `cap`."""

    cap: int
    quantum: int = 16
    minimum: int = 64
    steps: tuple[float, ...] = _STEPS  # fractions of 2^k that are rungs

    def __post_init__(self):
        if self.cap <= 0 or self.quantum <= 0 or self.minimum <= 0:
            raise ValueError(f"ladder sizes must be positive, got cap={self.cap}, quantum={self.quantum}, "
                             f"minimum={self.minimum}")

    def __call__(self, n: int) -> int:
        """The smallest rung ≥ n (the cap itself when the next rung would pass it)."""
        n = int(n)
        if n > self.cap:
            raise ValueError(f"size {n} is over the cap {self.cap}")
        if n <= self.minimum:
            return min(self.cap, _round_up(self.minimum, self.quantum))
        k = max(0, math.floor(math.log2(n)) - 1)
        while True:
            for s in self.steps:
                rung = _round_up(math.ceil(s * 2**k), self.quantum)
                if rung >= n:
                    return min(rung, self.cap)
            k += 1

    def rungs(self) -> list[int]:
        """Every rung up to the cap (docs, the AOT report)."""
        out, n = [], 1
        while True:
            r = self(n)
            out.append(r)
            if r >= self.cap:
                return out
            n = r + 1


def _round_up(n: int, q: int) -> int:
    return -(-int(n) // q) * q


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The ladders of one run (caps from the config)."""

    prompt: Ladder  # prompt tokens (left-padded)
    patches: Ladder  # patches per packed image row (one image per row; multiples of merge² = 4)
    completion: Ladder  # L: loss positions [B, G, L] (the longest completion; tensors this small cost ~nothing)
    row: Ladder  # T: length of the rows a prompt's completions are packed into (up to all G in one)
    rows: Ladder  # R ≤ G: rows per prompt
    # Images of a block of prompts packed into `image_rows` rows (the block's share of each batch
    # shard) of a rung of `packed_row` (finer steps; cap: every image at the `patches` cap);
    # 0: one image per row of `patches` (models whose vision attention needs [N, N] masks).
    image_rows: int = 0

    @classmethod
    def from_caps(cls, *, seq_len: int, patch_row_len: int, max_new_tokens: int, num_samples: int,
                  image_rows: int = 0) -> "StepShapes":
        return cls(prompt=Ladder(seq_len, quantum=16, minimum=64),
                   patches=Ladder(patch_row_len, quantum=64, minimum=64),
                   completion=Ladder(max_new_tokens, quantum=16, minimum=16, steps=(1.0,)),
                   row=Ladder(max_new_tokens * num_samples, quantum=16, minimum=16),
                   rows=Ladder(num_samples, quantum=1, minimum=1, steps=(1.0, 1.5)), image_rows=image_rows)

    @classmethod
    def from_config(cls, c, num_samples: int | None = None, image_rows: int = 0) -> "StepShapes":
        """The config's caps; `num_samples`: the largest G of the run (a curriculum may raise it);
        `image_rows`: packed image rows per block of prompts (`packs_images`), 0 for one per image."""
        return cls.from_caps(seq_len=c.batch.seq_len, patch_row_len=c.batch.patch_row_len,
                             max_new_tokens=c.sampling.max_new_tokens,
                             num_samples=num_samples or c.grpo.num_generations, image_rows=image_rows)

    def block_rows(self, prompts_per_block: int) -> Ladder:
        """Rungs for the completion rows of a block of prompts (`rollouts.pack_completions`): R ≤ G
        for one prompt (`rows`), up to G per prompt for a block of several."""
        if prompts_per_block <= 1:
            return self.rows
        return Ladder(self.rows.cap * prompts_per_block, quantum=1, minimum=1)

    def packed_prompts(self, prompts_per_block: int) -> Ladder:
        """Rungs for a block's prompt tokens packed back to back in the update (finer steps)."""
        return Ladder(self.prompt.cap * prompts_per_block, quantum=16, minimum=64, steps=_FINE_STEPS)

    def packed_row(self, images_per_row: int) -> Ladder:
        """Rungs for a packed image row of up to `images_per_row` images at the patch cap."""
        return Ladder(self.patches.cap * images_per_row, quantum=64, minimum=64, steps=_FINE_STEPS)


def packs_images(model_cfg) -> bool:
    """Whether a block's images may share rows: the vision tower attends per image through the
    image table (`model.vision.image_attention`), so a row's length costs only its patches.
    Window attention (Qwen2.5-VL) and Qwen3-VL's position taps still use [N, N] masks."""
    return model_cfg.model_type != "qwen3_vl" and not model_cfg.vision.window_size


def attention_weight(cfg) -> float:
    """Attention FLOPs per key over the weight-matmul FLOPs per token, for one decoder layer of
    `cfg` (a TextConfig): 4·H·Dh against 2·(params of a layer). 6.5e-5 at the 2B size, so a
    token attending to 1,000 keys costs 6.5% more than its matmuls."""
    d, h, k, dh, f = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_layer = d * (h + 2 * k) * dh + h * dh * d + 3 * d * f
    return 4 * h * dh / (2 * per_layer)


def packing_cost(rows: int, row_len: int, prompt_len: int, weight: float) -> float:
    """Relative update cost of a prompt's completions in `rows` rows of `row_len`: every token's
    matmuls, plus attention over the prompt and the whole row (masks do not skip work)."""
    return rows * row_len * (1.0 + weight * (prompt_len + row_len))


@dataclasses.dataclass
class ShapeMemo:
    """The shapes a run has used so far (each one a compiled program), and the rule that reuses
    them: a step takes the cheapest used shape that holds its sizes when that costs at most
    `slack` more than its own rungs; else its own rungs, which are then remembered.

    Rungs alone compile a new program whenever one of a step's sizes crosses a rung of any
    dimension (prompt tokens, packed image row, loss positions, completion rows × length):
    on the grounding recipe that was a new program at most of the first ten steps, each
    costing seconds to a minute and a half on an H200. With a 10% slack a run settles on a few
    shapes and pays at most 10% more padding on the side (prompts or completions) it reuses.
    Shapes never change the math (padding is masked), so the choice is free to depend on the
    run's history; the memo is checkpointed so that a resumed run chooses as the first did.

        memo = ShapeMemo(slack=0.1)
        shape = memo.pick(fresh, fits=lambda s: ..., cost=lambda s: ...)
    """

    slack: float = 0.1
    used: list = dataclasses.field(default_factory=list)

    def pick(self, fresh, fits, cost):
        """`fresh` (the step's own rungs) or the cheapest used shape of its type for which
        `fits` holds, if `cost` of it is ≤ (1 + slack) · cost(fresh)."""
        held = [s for s in self.used if type(s) is type(fresh) and fits(s)]
        best = min(held, key=cost, default=None)  # the earliest used of equal cost: deterministic
        if best is not None and cost(best) <= (1.0 + self.slack) * cost(fresh):
            return best
        self.used.append(fresh)
        return fresh

    def state(self) -> list[dict]:
        """JSON for the checkpoint: [{"type": class name, fields...}, ...] in the order used."""
        return [dict(type=type(s).__name__, **dataclasses.asdict(s)) for s in self.used]

    def load(self, state: list[dict] | None, types) -> None:
        """Restores `state()`; `types`: the shape classes by name (unknown entries are dropped:
        a checkpoint of another version reuses nothing, which changes speed, not the math)."""
        by_name = {t.__name__: t for t in types}
        self.used = []
        for d in state or ():
            t = by_name.get(d.get("type")) if isinstance(d, dict) else None
            names = {f.name for f in dataclasses.fields(t)} if t else set()
            if t and set(d) - {"type"} == names:
                self.used.append(t(**{k: d[k] for k in names}))
