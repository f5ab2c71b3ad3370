"""Perceptual perplexity of a data set (the paper's §5.2, Appendix A.2, Table 9; docs/method.md §5.2).

    python -m pr1_jax.data.stats --task=counting --data=pixmo_count.jsonl
    # counting: 10000 images, 6.4 objects on average (max 45); perceptual perplexity 2.29e+05

The statistic counts the possible matchings between a model's predictions and the ground
truth: 1 for single-target tasks (grounding, OCR), n! (= A_n^n) for an image with n GT
objects (counting: points; detection: boxes). The data-set value is the mean over images
of that count; the paper reports 229,202 for PixMo-Count and 3.47e+83 for COCO2017.
The mean is computed exactly with Python integers (n! overflows float64 at n = 171) and
printed in scientific notation with `format_sci`.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import sys
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

from pr1_jax import cli
from pr1_jax.errors import ConfigError

def num_objects(example: Mapping, task: str) -> int:
    """Number of GT objects of a normalised example (see `readers`): the task's own count
    (`counting_eval`, the evaluation files' format, counts as counting)."""
    from pr1_jax import tasks

    return tasks.get("counting" if task == "counting_eval" else task).num_objects(example)


def matchings(n: int, task: str) -> int:
    """Possible prediction↔GT matchings of one image with n objects: n! (1 for grounding/OCR's one target)."""
    del task  # the same rule for every task
    return math.factorial(n)


@dataclasses.dataclass(frozen=True)
class Perplexity:
    task: str
    images: int
    mean: Fraction  # exact mean of the per-image matching counts
    mean_objects: float
    max_objects: int

    @property
    def log10(self) -> float:
        """log10 of the mean (finite for any size)."""
        return math.log10(self.mean.numerator) - math.log10(self.mean.denominator)

    def __str__(self) -> str:
        return (f"{self.task}: {self.images} images, {self.mean_objects:.1f} objects on average "
                f"(max {self.max_objects}); perceptual perplexity {format_sci(self.mean)}")


def perceptual_perplexity(examples: Iterable[Mapping], task: str) -> Perplexity:
    """Mean over examples of the number of GT permutations (n! per image; 1 for grounding/OCR)."""
    total, images, objects, most = 0, 0, 0, 0
    for ex in examples:
        n = num_objects(ex, task)
        total += matchings(n, task)
        images += 1
        objects += n
        most = max(most, n)
    if images == 0:
        raise ValueError("perceptual perplexity of an empty data set")
    return Perplexity(task, images, Fraction(total, images), objects / images, most)


def format_sci(x: int | Fraction, digits: int = 2) -> str:
    """Scientific notation like Python's '{:.2e}' for numbers of any size: 3.47e+83."""
    x = Fraction(x)
    ctx = decimal.Context(prec=max(30, digits + 10), Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
    value = ctx.divide(decimal.Decimal(x.numerator), decimal.Decimal(x.denominator))
    mantissa, _, exponent = format(value, f".{digits}e").partition("e")
    return f"{mantissa}e{int(exponent):+03d}"  # two exponent digits at least, as float formatting


NAME = "pr1_jax.data.stats"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pr1_jax.data.stats --task=counting --data=FILE`. Expected failures (bad flags,
    a missing file, one without usable rows) print one line and exit 2 (`pr1_jax.cli`)."""
    return cli.run(NAME, _main, argv)


def _main(argv: Sequence[str] | None) -> None:
    from pr1_jax.data import readers

    parser = cli.ArgumentParser(NAME, description="Perceptual perplexity of a PR1 data set (paper Table 9).")
    parser.add_argument("--task", required=True, choices=readers.all_tasks())
    parser.add_argument("--data", required=True, help="a data file or directory that readers.read accepts")
    parser.add_argument("--image_dir", default=None)
    parser.add_argument("--train_sample_size", type=int, default=None, help="only the first N rows (≥ 1)")
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    if args.train_sample_size is not None and args.train_sample_size < 1:
        raise ConfigError(f"--train_sample_size={args.train_sample_size}: must be ≥ 1 (leave it out for every row)")
    examples, report = readers.read(args.data, args.task, image_dir=args.image_dir,
                                    train_sample_size=args.train_sample_size, split=args.split)
    print(report)
    print(perceptual_perplexity(examples, args.task))


if __name__ == "__main__":
    sys.exit(main())
