"""OCR (PageOCR): "OCR this image: " on a document page; the answer is the page's text. PR1's
metrics: normalised edit distance (lower is better), word precision / recall / F1, BLEU, METEOR,
each a mean over pages ×100.
"""

from __future__ import annotations

from pr1_jax.data import synthetic
from pr1_jax.evaluation import ocr as ocr_eval
from pr1_jax.processing import chat
from pr1_jax.tasks.base import Scores, Task, register


def score(answers, **_options) -> Scores:
    """edit_distance (×100, lower is better), precision, recall, f1, bleu, meteor, n
    (`evaluation.ocr`); per row the same metrics; no gallery."""
    texts = [a.text for a in answers]
    gts = [str(a.example["solution"]) for a in answers]
    metrics = ocr_eval.evaluate_ocr(texts, gts)["all"]
    records = [{"gt": g, **ocr_eval.ocr_sample_metrics(t, g)} for t, g in zip(texts, gts)]
    return Scores(metrics, records, [])


TASK = register(Task(
    name="ocr", prompt=chat.QUESTION_TEMPLATES["pr1_ocr"],
    question_key=None, eval_prompt=chat.EVAL_TEMPLATES["pr1_ocr"],
    default_rewards=("pr1_ocr",), skip_special_tokens=True, eval_max_new_tokens=2048,
    end_lengths="lognormal:700:0.5", headline="edit_distance", headline_label="edit distance (×100, lower is better)",
    paper="PageOCR-en edit distance 3.5 (v1) / 2.8, F1 98.2 (Qwen2-VL-2B base 8.0 / 94.4)",
    score=score, num_objects=lambda example: 1, write_synthetic=synthetic.write_ocr,
    sft_target=lambda example: f"{example['solution']}<|im_end|>"))
