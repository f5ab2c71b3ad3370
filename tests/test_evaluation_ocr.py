"""OCR eval: Levenshtein, token-set P/R/F1, BLEU and METEOR on hand-computed cases and on
values recorded from NLTK 3.10.4 (METEOR with its WordNet stage disabled)."""

import math
import random
import sys
import warnings

import numpy as np
import pytest

from pr1_jax.evaluation import ocr


def _dp(a, b):  # plain O(nm) reference
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_levenshtein():
    assert ocr.levenshtein("kitten", "sitting") == 3
    assert ocr.levenshtein("", "abc") == 3 == ocr.levenshtein("abc", "")
    assert ocr.levenshtein("", "") == 0
    assert ocr.levenshtein("flaw", "lawn") == 2
    assert ocr.levenshtein("北京天安门", "北京天门") == 1  # code points, not bytes
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        assert ocr.levenshtein(a, b) == _dp(a, b)
    assert ocr.normalized_edit_distance("the quick brown fox jumps over a dog",
                                        "the quick brown fox jumps over the dog") == pytest.approx(3 / 38)
    assert ocr.normalized_edit_distance("", "") == 0.0


def test_set_prf():
    ref, hyp = "the quick brown fox jumps over the dog".split(), "the quick brown fox jumps over a dog".split()
    p, r, f = ocr.set_prf(ref, hyp)
    assert (p, r, f) == pytest.approx((7 / 8, 1.0, 14 / 15))
    assert ocr.set_prf(["a"], []) == (0.0, 0.0, 0.0)  # NLTK would give None → 0
    assert ocr.set_prf(["a", "a", "b"], ["a"]) == pytest.approx((1.0, 0.5, 2 / 3))


def test_bleu_hand_computed():
    ref = "the quick brown fox jumps over the dog".split()
    # clipped precisions 7/8, 5/7, 4/6, 3/5 → geometric mean 0.25^(1/4); hypothesis as long as ref
    assert ocr.bleu(ref, "the quick brown fox jumps over a dog".split()) == pytest.approx(0.25 ** 0.25, rel=1e-12)
    # all precisions 1, 5 tokens vs 8 → brevity penalty exp(1 − 8/5)
    assert ocr.bleu(ref, ref[:5]) == pytest.approx(math.exp(1 - 8 / 5), rel=1e-12)
    assert ocr.bleu(ref, ref) == pytest.approx(1.0)
    assert ocr.bleu(ref, ref[:3]) == 0.0  # no 4-gram at all
    assert ocr.bleu(ref, []) == 0.0
    assert ocr.bleu(["the"] * 2, ["the"] * 7) == 0.0  # p1 2/7, p2 1/6, no trigram in ref → 0
    assert ocr.bleu(list("abcdx"), list("abcd")) == pytest.approx(math.exp(1 - 5 / 4))


def test_meteor_hand_computed():
    ref = "the cat sat on the mat".split()
    # 6 exact matches in 5 chunks: P = R = 1 → (1 − 0.5 (5/6)^3)
    assert ocr.meteor(ref, "on the mat the cat sat".split()) == pytest.approx(1 - 0.5 * (5 / 6) ** 3)
    assert ocr.meteor(ref, ref) == pytest.approx(1 - 0.5 * (1 / 6) ** 3)
    # "running" ~ "runs" by stem; "quick" ≠ "quickli": 2 matches, 1 chunk
    assert ocr.meteor("he runs quickly".split(), "he running quick".split()) == pytest.approx(0.625)
    assert ocr.meteor("he runs quickly".split(), "he running quick".split(), stemmer=None) == pytest.approx(1 / 6)
    assert ocr.meteor(["a"], ["b"]) == 0.0 and ocr.meteor([], []) == 0.0
    assert ocr.meteor(["The"], ["tHe"]) == pytest.approx(1 - 0.5)  # lower-cased


# (reference, hypothesis, NLTK sentence_bleu, NLTK single_meteor_score with wordnet stage off)
NLTK_GOLDEN = [
    ("the quick brown fox jumps over the dog", "the quick brown fox jumps over a dog",
     0.7071067811865475, 0.840561224489796),
    ("the cat sat on the mat", "on the mat the cat sat", 9.712948939678164e-78, 0.7106481481481481),
    ("he runs quickly", "he running quick", 1.384292958842266e-231, 0.625),
    ("Invoice No. 12345 Total due: $1,024.00", "Invoice No 12345 Total due: $1,024.00 thank you",
     0.3655552228545123, 0.7806451612903227),
    ("Connectivity of generalized networks is studied", "connected generalization of network was studying",
     1.1640469867513693e-231, 0.41666666666666674),
    ("a b c d e f g h", "a b c d", 0.36787944117144233, 0.522203947368421),
]


@pytest.mark.parametrize("ref,hyp,nltk_bleu,nltk_meteor", NLTK_GOLDEN)
def test_against_recorded_nltk(ref, hyp, nltk_bleu, nltk_meteor):
    r, h = ref.split(), hyp.split()
    assert ocr.bleu(r, h) == pytest.approx(nltk_bleu, rel=1e-12, abs=1e-60)  # NLTK's 1e-77 "zeros"
    assert ocr.meteor(r, h) == pytest.approx(nltk_meteor, rel=1e-12)


def test_porter_stemmer_matches_nltk_examples():
    words = ("caresses ponies ties hopping falling relational generalization sky skies dying agreed feed happy "
             "conditional geology fully")
    expected = ['caress', 'poni', 'tie', 'hop', 'fall', 'relat', 'gener', 'sky', 'sky', 'die', 'agre', 'feed',
                'happi', 'condit', 'geolog', 'fulli']  # NLTK 3.10.4 PorterStemmer()
    assert [ocr.porter_stem(w) for w in words.split()] == expected


def test_cross_check_with_nltk_if_installed():
    """Runs only where nltk is importable (it is not a dependency)."""
    pytest.importorskip("nltk")
    from nltk.metrics.distance import edit_distance
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.meteor_score import single_meteor_score

    class NoWordNet:
        def synsets(self, word):
            return []

    vocab = "the cat cats sat sitting on mat dog dogs running runs quickly quick jumped jumps over a of is".split()
    rng = random.Random(1)
    ps = PorterStemmer()
    for _ in range(300):
        ref = [rng.choice(vocab) for _ in range(rng.randint(1, 20))]
        hyp = [w for w in ref if rng.random() > 0.2] + [rng.choice(vocab) for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.2:
            rng.shuffle(hyp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NLTK warns about zero n-gram counts
            assert ocr.bleu(ref, hyp) == pytest.approx(sentence_bleu([ref], hyp), abs=1e-12)
        assert ocr.meteor(ref, hyp) == pytest.approx(single_meteor_score(ref, hyp, wordnet=NoWordNet()), abs=1e-12)
        a, b = " ".join(ref), " ".join(hyp)
        assert ocr.levenshtein(a, b) == edit_distance(a, b)
    assert all(ocr.porter_stem(w) == ps.stem(w) for w in vocab)


def test_tokenisation_cjk_fallback(monkeypatch):
    assert ocr.tokenize_pair("a  b\nc", "d") == (["a", "b", "c"], ["d"])
    monkeypatch.setitem(sys.modules, "jieba", None)  # force the no-jieba path
    hyp, ref = ocr.tokenize_pair("我爱北京 hello", "abc")
    assert hyp == ["我", "爱", "北", "京", "hello"] and ref == ["abc"]


def test_evaluate_ocr_averages_per_sample():
    preds = ["the quick brown fox jumps over a dog", "", "same text"]
    gts = ["the quick brown fox jumps over the dog", "nonempty", "same text"]
    out = ocr.evaluate_ocr(preds, gts, splits=["en", "en", "zh"])
    assert out["en"]["n"] == 2 and out["all"]["n"] == 3
    assert out["en"]["edit_distance"] == pytest.approx(100 * (3 / 38 + 1.0) / 2)
    assert out["en"]["f1"] == pytest.approx(100 * (14 / 15) / 2)
    assert out["en"]["bleu"] == pytest.approx(100 * 0.25 ** 0.25 / 2)
    assert out["zh"]["edit_distance"] == 0 and out["zh"]["f1"] == 100.0
    table = np.array([[out["en"][k], out["zh"][k]] for k in ocr.METRICS])
    np.testing.assert_allclose([out["all"][k] for k in ocr.METRICS], table @ [2 / 3, 1 / 3])
    assert set(ocr.evaluate_ocr(preds, gts)) == {"all"}
