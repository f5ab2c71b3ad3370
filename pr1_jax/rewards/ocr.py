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

    Bit-parallel (Myers 1999 / Hyyrö 2001): the DP column of the LONGER string is held as bit
    vectors in Python integers and the loop runs over the shorter one, so the Python-level
    steps are min(len) and each costs a few big-int operations of max(len)/64 words. (Looping
    over the longer string instead costs ~1 µs of interpreter per character: a 250k-character
    answer to a 20-character page would take 0.5 s, this way 20 steps.)
    Example: levenshtein("kitten", "sitting") → 3.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(a)
    if len(b) == 0:
        return m
    # Match masks only for the characters the loop will look up, each built in one bytearray
    # (OR-ing 1 << i into an int per position would be quadratic in len(a)).
    wanted = set(b)
    positions: dict[str, list[int]] = {}
    for i, ch in enumerate(a):
        if ch in wanted:
            positions.setdefault(ch, []).append(i)
    peq: dict[str, int] = {}
    for ch, pos in positions.items():
        buf = bytearray((m + 7) // 8)
        for i in pos:
            buf[i >> 3] |= 1 << (i & 7)
        peq[ch] = int.from_bytes(buf, "little")
    mask, last = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for ch in b:
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


# Characters of each (whitespace-collapsed) string that the edit distance reads. The distance
# costs O(len(pred)·len(gt)/64) big-int steps: a megabyte answer to a megabyte page would take
# minutes of the training step. PR1's OCR pages are a few thousand characters and its 2048
# generated tokens rarely reach 10k, so sane inputs are scored exactly.
MAX_CHARS = 1 << 16


def _similarity(pred: str, gt: str, empty: float) -> float:
    """max(0, 1 − lev(pred, gt)/max(len)). Past MAX_CHARS the distance is bounded from above,
    lev(pred[:C], gt[:C]) + the characters cut from each, so an absurdly long answer is never
    scored higher than its exact value."""
    n = max(len(pred), len(gt))
    if n == 0:
        return empty
    cut = max(0, len(pred) - MAX_CHARS) + max(0, len(gt) - MAX_CHARS)
    return max(0.0, 1.0 - (levenshtein(pred[:MAX_CHARS], gt[:MAX_CHARS]) + cut) / n)


@register("pr1_ocr")
def pr1_ocr(completions: list[str], solution=None, **columns) -> np.ndarray:
    """MMR1's `perpo_ocr_edit_distance_reward` (PR1's probable OCR reward). Range [0, 1].

    Both strings are whitespace-collapsed (`" ".join(s.split())`), then
    r = max(0, 1 − lev(pred, gt)/max(len(pred), len(gt))); both empty → 0; a non-string
    GT → 0 (MMR1 raises inside its try → 0). Special tokens are NOT removed. Strings longer
    than MAX_CHARS (65,536) are scored with an upper bound of the distance (see `_similarity`).
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
