"""OCR rewards (PageOCR, Qwen2-VL): 1 − normalised Levenshtein distance.

Decode convention: special tokens SKIPPED (`skip_special_tokens=True`, as PR1's OCR
evaluation); `ocr_edit_distance` also tolerates kept `<|…|>` tokens.
Ground truth `solution[i]`: the page text.
PR1 did not release its OCR reward; `pr1_ocr` follows its authors' predecessor (MMR1).
"""

from __future__ import annotations

import re

import numpy as np

from pr1_jax.rewards.parsing import as_text, collapse_whitespace, solution_column
from pr1_jax.rewards.registry import register


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert/delete/substitute cost 1, no transpositions), equal to
    `nltk.edit_distance(a, b)`.

    Bit-parallel (Myers 1999 / Hyyrö 2001): the DP column of the shorter string is held as
    bit vectors in Python integers, so one step per character of the longer string costs a
    few big-int operations — O(len(a)·len(b)/64) word operations.
    Example: levenshtein("kitten", "sitting") → 3.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    mask, last = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        if ph & last:
            score += 1
        elif mh & last:
            score -= 1
        ph = ((ph << 1) | 1) & mask  # row 0 of the DP grows by 1 per column: shift in a +1
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def _similarity(pred: str, gt: str, empty: float) -> float:
    n = max(len(pred), len(gt))
    if n == 0:
        return empty
    return max(0.0, 1.0 - levenshtein(pred, gt) / n)


@register("pr1_ocr")
def pr1_ocr(completions: list[str], solution=None, **columns) -> np.ndarray:
    """MMR1's `perpo_ocr_edit_distance_reward` (PR1's probable OCR reward). Range [0, 1].

    Both strings are whitespace-collapsed (`" ".join(s.split())`), then
    r = max(0, 1 − lev(pred, gt)/max(len(pred), len(gt))); both empty → 0; a non-string
    GT → 0 (MMR1 raises inside its try → 0). Special tokens are NOT removed.
    Example: pred "Hello  world", GT "Hello World!" → lev("Hello world", "Hello World!") = 2,
    r = 1 − 2/12 = 0.8333.
    """
    texts = [as_text(c) for c in completions]
    sols = solution_column({"solution": solution, **columns}, len(texts), "solution")
    return np.array([_similarity(collapse_whitespace(t), collapse_whitespace(s), 0.0) if isinstance(s, str) else 0.0
                     for t, s in zip(texts, sols)], np.float32)


_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


@register("ocr_edit_distance")
def ocr_edit_distance(completions: list[str], solution=None, **columns) -> np.ndarray:
    """Twin of `pr1_ocr`, robust to the decode convention. Range [0, 1].

    Differences: Qwen special tokens (`<|im_end|>`, `<|endoftext|>`, …) are removed from the
    completion first; a non-string GT is converted with str(); an empty answer to an empty
    page is correct (1.0 instead of 0.0).
    Example: "Hello world<|im_end|><|endoftext|>" vs "Hello world" → 1.0 (pr1_ocr: 1 − 23/34 = 0.3235).
    """
    texts = [as_text(c) for c in completions]
    sols = solution_column({"solution": solution, **columns}, len(texts), "solution")
    return np.array([_similarity(collapse_whitespace(_SPECIAL.sub("", t)), collapse_whitespace(str(s)), 1.0)
                     for t, s in zip(texts, sols)], np.float32)
