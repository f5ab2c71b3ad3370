"""Perceptual perplexity against hand computations."""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from pr1_jax.data import readers, stats, synthetic

REPO = Path(__file__).resolve().parents[1]


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


def _cli(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "pr1_jax.data.stats", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.returncode, out.stdout, out.stderr


def test_cli_in_a_subprocess(tmp_path):
    files = synthetic.write_counting(tmp_path, 4, seed=0)
    code, out, err = _cli("--task=counting", f"--data={files.eval_path}", cwd=tmp_path)
    assert code == 0, err
    assert "read 4 of 4 rows" in out and "4 images" in out


@pytest.mark.parametrize("args, says", [
    (["--task=counting", "--data=nope.jsonl"], "nope.jsonl: no such data file or directory (check the path"),
    (["--task=count", "--data=c/counting.jsonl"], "argument --task: invalid choice: 'count'"),
    (["--data=c/counting.jsonl"], "the following arguments are required: --task"),
    (["--task=grounding", "--data=c/counting.jsonl"], "c/counting.jsonl: none of its 2 rows is a usable grounding row"),
    (["--task=counting", "--data=c/counting.jsonl", "--train_sample_size=0"], "--train_sample_size=0: must be ≥ 1"),
    (["--task=counting", "--data=c/x.csv"], "c/x.csv: unknown data format '.csv'"),
])
def test_cli_expected_failures_are_one_line(tmp_path, args, says):
    synthetic.write_counting(tmp_path / "c", 2, seed=0)
    (tmp_path / "c" / "x.csv").write_text("a,b\n")
    code, out, err = _cli(*args, cwd=tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pr1_jax.data.stats: error: ") and says in err, err
    assert "Traceback" not in err
