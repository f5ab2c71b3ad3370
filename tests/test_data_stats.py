"""Perceptual perplexity against hand computations."""

import json
import math
from fractions import Fraction

import pytest

from pr1_jax.data import readers, stats, synthetic


def _counting(sizes):
    return [{"solution": [[0, 0]] * n} for n in sizes]


def test_hand_computed_values():
    # counting: (1! + 2! + 3! + 0!) / 4 = (1 + 2 + 6 + 1) / 4 = 2.5
    p = stats.perceptual_perplexity(_counting([1, 2, 3, 0]), "counting")
    assert p.mean == Fraction(5, 2) and p.images == 4 and p.max_objects == 3 and p.mean_objects == 1.5
    assert stats.format_sci(p.mean) == "2.50e+00"
    # detection: (3! + 5!) / 2 = (6 + 120) / 2 = 63
    det = [{"solution": {"target_id": [1] * n, "target_box": [[0, 0, 1, 1]] * n}} for n in (3, 5)]
    assert stats.perceptual_perplexity(det, "detection").mean == 63
    # counting_eval counts come from ground_truth: (4! + 4!) / 2 = 24
    assert stats.perceptual_perplexity([{"solution": 4}, {"solution": 4}], "counting_eval").mean == 24
    # single-target tasks: 1 whatever the rows hold
    assert stats.perceptual_perplexity([{"solution": [1, 2, 3, 4]}] * 3, "grounding").mean == 1
    assert stats.perceptual_perplexity([{"solution": "text"}], "ocr").mean == 1
    with pytest.raises(ValueError):
        stats.perceptual_perplexity([], "counting")


def test_astronomical_means():
    # (100! + 60!) / 2 ≈ 4.6663e157: still a float, so compare with float formatting.
    p = stats.perceptual_perplexity(_counting([100, 60]), "counting")
    assert p.mean == Fraction(math.factorial(100) + math.factorial(60), 2)
    assert stats.format_sci(p.mean) == f"{(math.factorial(100) + math.factorial(60)) / 2:.2e}" == "4.67e+157"
    # 200! / 1 overflows float64; log10(200!) = lgamma(201) / ln 10 = 374.897... → 7.89e+374.
    big = stats.perceptual_perplexity(_counting([200]), "counting")
    assert big.log10 == pytest.approx(math.lgamma(201) / math.log(10))
    assert stats.format_sci(big.mean) == "7.89e+374"
    assert stats.format_sci(229202) == "2.29e+05" and stats.format_sci(Fraction(1, 8)) == "1.25e-01"


def test_cli(tmp_path, capsys):
    files = synthetic.write_counting(tmp_path, 6, seed=0)
    counts = [json.loads(line)["count"] for line in files.path.read_text().splitlines()]
    expected = stats.format_sci(Fraction(sum(math.factorial(c) for c in counts), len(counts)))
    stats.main(["--task=counting", f"--data={files.path}"])
    out = capsys.readouterr().out
    assert f"perceptual perplexity {expected}" in out and "6 images" in out
    examples, _ = readers.read(files.eval_path, "counting_eval")
    assert stats.format_sci(stats.perceptual_perplexity(examples, "counting_eval").mean) == expected
