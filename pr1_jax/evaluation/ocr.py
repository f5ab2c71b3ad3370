"""Page-OCR evaluation (PageOCR en / zh) with PR1's metrics, without NLTK.

docs/method.md §4.5: every metric is computed per sample, then averaged (reported ×100).
  * edit_distance: character Levenshtein(pred, gt) / max(len(pred), len(gt)) (lower is better;
    0 when both are empty). `levenshtein` is the OCR reward's (bit-parallel, equal to NLTK's).
  * precision / recall / f1: on token *sets* (NLTK `metrics.precision/recall/f_measure`); NLTK's
    None (an empty set) counts as 0.
  * bleu: NLTK `sentence_bleu([ref], hyp)` semantics — uniform 4-gram weights, clipped n-gram
    precisions, brevity penalty exp(1 − r/c) when c ≤ r, no smoothing, 0 when no unigram matches.
    When a higher-order precision is 0 NLTK returns a tiny positive number (it replaces the 0 by
    the smallest float, ~1e-77 after the 4th root); we return exactly 0.
  * meteor: NLTK `meteor_score([ref], hyp)` (α 0.9, β 3, γ 0.5, lower-cased) with its exact and
    Porter-stem matching stages, the stemmer being our own Porter implementation with NLTK's
    extensions (equal to NLTK's PorterStemmer on ~93k distinct words). NLTK's third stage, WordNet synonyms, is
    omitted (the corpus is not available here), so a pair differing by synonyms can score
    slightly lower than NLTK; with the synonym stage disabled the values equal NLTK's.
Tokenisation: whitespace split, or — when either string contains a character of
``[\\u4e00-\\u9fa5]`` — `jieba.lcut` if jieba is importable (as PR1). Without jieba every CJK
character becomes a token of its own and other runs are whitespace-split (documented fallback;
numbers differ from jieba's word segmentation).

Worked example: pred "the quick brown fox jumps over a dog", gt "... over the dog" →
edit distance 3/38 (a→t, +h, +e); token sets P = 7/8, R = 1, F1 = 14/15; BLEU =
(7/8 · 5/7 · 4/6 · 3/5)^(1/4) = 0.25^(1/4) ≈ 0.7071 (bp 1); METEOR: 7 matches (NLTK's greedy
order pairs the first "the" with the *last* reference "the") in 3 chunks →
7/8 · (1 − 0.5 · (3/7)³) ≈ 0.8406.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Callable, Sequence

import numpy as np

from pr1_jax.rewards.ocr import levenshtein  # one edit distance for the reward and the metric (= nltk's)

_CJK = re.compile(r"[\u4e00-\u9fa5]")
_CJK_OR_RUN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]|[^\s\u4e00-\u9fff\u3400-\u4dbf]+")


# ----------------------------------------------------------------------------- edit distance
def normalized_edit_distance(pred: str, gt: str) -> float:
    """levenshtein / max(len); 0.0 for two empty strings."""
    denom = max(len(pred), len(gt))
    return levenshtein(pred, gt) / denom if denom else 0.0


# ----------------------------------------------------------------------------- tokens
def tokenize_pair(pred: str, gt: str) -> tuple[list[str], list[str]]:
    """PR1: jieba.lcut for both strings when either holds a CJK character, else str.split()."""
    if _CJK.search(pred) or _CJK.search(gt):
        try:
            import jieba  # optional
            return jieba.lcut(pred), jieba.lcut(gt)
        except ImportError:
            return _CJK_OR_RUN.findall(pred), _CJK_OR_RUN.findall(gt)
    return pred.split(), gt.split()


def set_prf(ref: Sequence[str], hyp: Sequence[str]) -> tuple[float, float, float]:
    """(precision, recall, F1) of the token sets; NLTK's None (empty set) → 0."""
    r, h = set(ref), set(hyp)
    inter = len(r & h)
    p = inter / len(h) if h else 0.0
    rc = inter / len(r) if r else 0.0
    f = 0.0 if p == 0 or rc == 0 else 1.0 / (0.5 / p + 0.5 / rc)
    return p, rc, f


# ----------------------------------------------------------------------------- BLEU
def bleu(ref: Sequence[str], hyp: Sequence[str], max_n: int = 4) -> float:
    """NLTK sentence_bleu([ref], hyp) with uniform weights 1/max_n and no smoothing."""
    c, r = len(hyp), len(ref)
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp_ngrams = Counter(tuple(hyp[i:i + n]) for i in range(c - n + 1))
        ref_ngrams = Counter(tuple(ref[i:i + n]) for i in range(r - n + 1))
        matched = sum(min(k, ref_ngrams[g]) for g, k in hyp_ngrams.items())
        if matched == 0:
            return 0.0
        log_p += math.log(matched / max(1, c - n + 1)) / max_n
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


# ----------------------------------------------------------------------------- Porter stemmer
_VOWELS = frozenset("aeiou")
_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie",
              "news": "news", "innings": "inning", "inning": "inning", "outings": "outing",
              "outing": "outing", "cannings": "canning", "canning": "canning", "howe": "howe",
              "proceed": "proceed", "exceed": "exceed", "succeed": "succeed"}


def _cv(word: str) -> str:
    """'c'/'v' per letter; y is a vowel after a consonant (Porter's definition)."""
    out = []
    for i, ch in enumerate(word):
        vowel = ch in _VOWELS or (ch == "y" and i > 0 and out[-1] == "c")
        out.append("v" if vowel else "c")
    return "".join(out)


def _m(stem: str) -> int:
    return _cv(stem).count("vc")


def _has_vowel(stem: str) -> bool:
    return "v" in _cv(stem)


def _double_c(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _cv(word)[-1] == "c"


def _cvc(word: str) -> bool:
    cv = _cv(word)
    return ((len(word) >= 3 and cv[-3:] == "cvc" and word[-1] not in "wxy")
            or (len(word) == 2 and cv == "vc"))  # NLTK extension: short words like "at"


def _rules(word: str, rules) -> str:
    """Porter's rule lists: the first rule whose suffix matches decides (applies or stops)."""
    for suffix, repl, cond in rules:
        if word.endswith(suffix):
            stem = word[:len(word) - len(suffix)]
            return stem + repl if cond is None or cond(stem) else word
    return word


def _m_pos(stem: str) -> bool:
    return _m(stem) > 0


def _m_gt1(stem: str) -> bool:
    return _m(stem) > 1


_STEP2 = [("ational", "ate", _m_pos), ("tional", "tion", _m_pos), ("enci", "ence", _m_pos),
          ("anci", "ance", _m_pos), ("izer", "ize", _m_pos), ("bli", "ble", _m_pos),
          ("alli", "al", _m_pos), ("entli", "ent", _m_pos), ("eli", "e", _m_pos),
          ("ousli", "ous", _m_pos), ("ization", "ize", _m_pos), ("ation", "ate", _m_pos),
          ("ator", "ate", _m_pos), ("alism", "al", _m_pos), ("iveness", "ive", _m_pos),
          ("fulness", "ful", _m_pos), ("ousness", "ous", _m_pos), ("aliti", "al", _m_pos),
          ("iviti", "ive", _m_pos), ("biliti", "ble", _m_pos), ("fulli", "ful", _m_pos)]
_STEP3 = [("icate", "ic", _m_pos), ("ative", "", _m_pos), ("alize", "al", _m_pos),
          ("iciti", "ic", _m_pos), ("ical", "ic", _m_pos), ("ful", "", _m_pos), ("ness", "", _m_pos)]
_STEP4 = [(s, "", _m_gt1) for s in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement",
                                    "ment", "ent")]
_STEP4 += [("ion", "", lambda s: _m(s) > 1 and s[-1] in "st")]
_STEP4 += [(s, "", _m_gt1) for s in ("ou", "ism", "ate", "iti", "ous", "ive", "ize")]


def _step1b(w: str) -> str:
    if w.endswith("ied"):  # NLTK extension
        return w[:-3] + ("ie" if len(w) == 4 else "i")
    if w.endswith("eed"):
        return w[:-1] if _m(w[:-3]) > 0 else w
    for suffix in ("ed", "ing"):
        if w.endswith(suffix) and _has_vowel(w[:-len(suffix)]):
            w = w[:-len(suffix)]
            break
    else:
        return w
    if w.endswith(("at", "bl", "iz")):
        return w + "e"
    if _double_c(w):
        return w if w[-1] in "lsz" else w[:-1]
    return w + "e" if _m(w) == 1 and _cvc(w) else w


def _step2(w: str) -> str:
    if w.endswith("alli") and _m(w[:-4]) > 0:  # NLTK applies alli → al first, then step 2 again
        return _step2(w[:-4] + "al")
    if w.endswith("logi") and _m(w[:-3]) > 0:  # NLTK: the 'l' stays with the stem
        return w[:-1]
    return _rules(w, _STEP2)


def porter_stem(word: str) -> str:
    """Porter (1980) stemmer with NLTK's default extensions (NLTK_EXTENSIONS mode), lower-cases.

    >>> [porter_stem(w) for w in ("caresses", "ponies", "hopping", "relational", "generalization")]
    ['caress', 'poni', 'hop', 'relat', 'gener']
    """
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 2:
        return w
    # Step 1a
    if w.endswith("ies") and len(w) == 4:
        w = w[:-1]
    else:
        w = _rules(w, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])
    w = _step1b(w)
    # Step 1c: y → i after a consonant that is not the word's first letter (NLTK extension)
    w = _rules(w, [("y", "i", lambda s: len(s) > 1 and _cv(s)[-1] == "c")])
    w = _step2(w)
    w = _rules(w, _STEP3)
    w = _rules(w, _STEP4)
    # Step 5a, 5b
    if w.endswith("e"):
        m = _m(w[:-1])
        if m > 1 or (m == 1 and not _cvc(w[:-1])):
            w = w[:-1]
    if w.endswith("ll") and _m(w[:-1]) > 1:
        w = w[:-1]
    return w


# ----------------------------------------------------------------------------- METEOR
def _greedy_match(hyp: list[tuple[int, str]], ref: list[tuple[int, str]]):
    """NLTK's `_match_enums`: hypothesis words from last to first each take the last unmatched
    equal reference word. Returns (matches [(hyp_idx, ref_idx)], unmatched hyp, unmatched ref)."""
    slots = defaultdict(list)
    for j, w in ref:
        slots[w].append(j)  # ascending: pop() takes the last
    matches, hyp_left = [], []
    for i, w in reversed(hyp):
        if slots.get(w):
            matches.append((i, slots[w].pop()))
        else:
            hyp_left.append((i, w))
    taken = {j for _, j in matches}
    return matches, hyp_left[::-1], [(j, w) for j, w in ref if j not in taken]


def meteor(ref: Sequence[str], hyp: Sequence[str], alpha: float = 0.9, beta: float = 3.0,
           gamma: float = 0.5, stemmer: Callable[[str], str] | None = porter_stem) -> float:
    """NLTK single_meteor_score(ref, hyp) without the WordNet-synonym stage (see module doc)."""
    h = [(i, w.lower()) for i, w in enumerate(hyp)]
    r = [(j, w.lower()) for j, w in enumerate(ref)]
    matches, h, r = _greedy_match(h, r)
    if stemmer is not None and h and r:
        stem_matches, _, _ = _greedy_match([(i, stemmer(w)) for i, w in h], [(j, stemmer(w)) for j, w in r])
        matches += stem_matches
    k = len(matches)
    if k == 0:
        return 0.0
    precision, recall = k / len(hyp), k / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    matches.sort()
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(matches, matches[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
    return (1 - gamma * (chunks / k) ** beta) * fmean


# ----------------------------------------------------------------------------- per sample / dataset
METRICS = ("edit_distance", "precision", "recall", "f1", "bleu", "meteor")


def ocr_sample_metrics(pred: str, gt: str) -> dict[str, float]:
    """All six metrics of one (prediction, ground truth) pair, as fractions in [0, 1]."""
    hyp, ref = tokenize_pair(pred, gt)
    p, r, f = set_prf(ref, hyp)
    return {"edit_distance": normalized_edit_distance(pred, gt), "precision": p, "recall": r, "f1": f,
            "bleu": bleu(ref, hyp), "meteor": meteor(ref, hyp)}


def evaluate_ocr(preds: Sequence[str], gts: Sequence[str],
                 splits: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """{split: {metric: mean ×100, "n": rows}}; a pooled "all" entry is added when `splits` is given."""
    if len(preds) != len(gts):
        raise ValueError("preds and gts must have the same length")
    per = [ocr_sample_metrics(p, g) for p, g in zip(preds, gts)]
    table = np.array([[m[k] for k in METRICS] for m in per], np.float64).reshape(len(per), len(METRICS))
    names = np.asarray(["all"] * len(per) if splits is None else list(splits), dtype=object)
    if len(names) != len(per):
        raise ValueError("splits must have one entry per prediction")
    out = {}
    for name in list(dict.fromkeys(names.tolist())) + ([] if splits is None else ["all"]):
        sel = np.ones(len(per), bool) if name == "all" else names == name
        means = 100.0 * table[sel].mean(0) if sel.any() else np.full(len(METRICS), np.nan)
        out[name] = {"n": int(sel.sum()), **dict(zip(METRICS, means.tolist()))}
    return out
