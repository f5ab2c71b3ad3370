"""OCR (PageOCR): "OCR this image: " on a document page; the answer is the page's text. PR1's
metrics: normalised edit distance (lower is better), word precision / recall / F1, BLEU, METEOR,
each a mean over pages ×100.
"""

from __future__ import annotations

from pr1_jax.data import synthetic
from pr1_jax.evaluation import ocr as ocr_eval
from pr1_jax.processing import chat
from pr1_jax.tasks.base import Task, register


def metrics(texts, examples) -> dict[str, float]:
    return ocr_eval.evaluate_ocr(texts, [str(ex["solution"]) for ex in examples])["all"]


TASK = register(Task(
    name="ocr", prompt=chat.QUESTION_TEMPLATES["pr1_ocr"],
    question_key=None, default_rewards=("pr1_ocr",), skip_special_tokens=True, eval_max_new_tokens=2048,
    end_lengths="lognormal:700:0.5", headline="edit_distance", headline_label="edit distance (×100, lower is better)",
    paper="PageOCR-en edit distance 3.5 (v1) / 2.8, F1 98.2 (Qwen2-VL-2B base 8.0 / 94.4)",
    metrics=metrics, num_objects=lambda example: 1, write_synthetic=synthetic.write_ocr,
    sft_target=lambda example: f"{example['solution']}<|im_end|>"))
