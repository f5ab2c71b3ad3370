"""OCR rewards and the bit-parallel Levenshtein distance."""

import numpy as np
import pytest

from pr1_jax import rewards
from pr1_jax.rewards import levenshtein


def dp_levenshtein(a, b):
    """Textbook O(len(a)·len(b)) DP, vectorised over b with a running-min for insertions."""
    prev = np.arange(len(b) + 1)
    bb = np.array([ord(c) for c in b])
    for i, ch in enumerate(a, 1):
        sub = prev[:-1] + (bb != ord(ch))
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, sub)
        cur = np.minimum.accumulate(cur - np.arange(len(b) + 1)) + np.arange(len(b) + 1)
        prev = cur
    return int(prev[-1])


@pytest.mark.parametrize("a, b, d", [("", "", 0), ("", "abc", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
                                     ("abc", "abc", 0), ("ab", "ba", 2), ("日本語", "日本", 1)])
def test_levenshtein_known(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_levenshtein_matches_dp():
    rng = np.random.default_rng(0)
    for _ in range(300):
        alphabet = "ab" if rng.random() < 0.5 else "abcdefgh é字\n"
        a = "".join(rng.choice(list(alphabet), rng.integers(0, 90)))
        b = "".join(rng.choice(list(alphabet), rng.integers(0, 90)))
        assert levenshtein(a, b) == dp_levenshtein(a, b), (a, b)
    a = "".join(rng.choice(list("abcd"), 700))   # longer than one machine word several times
    b = "".join(rng.choice(list("abcd"), 650))
    assert levenshtein(a, b) == dp_levenshtein(a, b)


@pytest.mark.parametrize("name, text, gt, expected", [
    ("pr1_ocr", "Hello  world", "Hello World!", 1 - 2 / 12),
    ("pr1_ocr", "  Hello\n\tworld ", "Hello world", 1.0),                 # whitespace collapsed
    ("pr1_ocr", "Hello world<|im_end|><|endoftext|>", "Hello world", 1 - 23 / 34),
    ("pr1_ocr", "", "", 0.0), ("pr1_ocr", "", "abc", 0.0), ("pr1_ocr", "abc", "", 0.0),
    ("pr1_ocr", "xyz", "abc", 0.0), ("pr1_ocr", "abc", None, 0.0),
    ("ocr_edit_distance", "Hello world<|im_end|><|endoftext|>", "Hello world", 1.0),
    ("ocr_edit_distance", "Hello  world", "Hello World!", 1 - 2 / 12),
    ("ocr_edit_distance", "", "", 1.0), ("ocr_edit_distance", "", "abc", 0.0),
    ("ocr_edit_distance", "123", 123, 1.0),
])
def test_ocr_values(name, text, gt, expected):
    out = rewards.get(name)([text], solution=[gt], prompts=["OCR this image."])
    assert out.dtype == np.float32
    assert float(out[0]) == pytest.approx(expected, rel=1e-6)
