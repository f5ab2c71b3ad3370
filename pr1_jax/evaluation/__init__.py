"""The paper's evaluation metrics, host-side NumPy (docs/method.md §4.2–4.5).

    grounding  parse_box, evaluate_grounding   mean IoU, Acc@{0.1,0.3,0.5,0.75,0.95}, centre acc, Avg
    counting   parse_count, evaluate_counting  exact-match accuracy of the number of boxes
    detection  parse_detections, coco_eval     COCO bbox AP/AR (pycocotools or faster-coco-eval)
    ocr        evaluate_ocr                    edit distance, token-set P/R/F1, BLEU, METEOR

Every function takes decoded completions (str) and the dataset's ground-truth fields; none
imports JAX. pycocotools / faster-coco-eval / jieba are imported only when used.
"""

from pr1_jax.evaluation.counting import evaluate_counting, parse_count
from pr1_jax.evaluation.detection import (COCO_CLASSES, COCO_NAME_TO_ID, STAT_NAMES, coco_eval,
                                          detections_from_completions, evaluate_detection,
                                          parse_detections, rescale_boxes, rescale_detections)
from pr1_jax.evaluation.grounding import box_iou, evaluate_grounding, grounding_metrics, parse_box
from pr1_jax.evaluation.ocr import bleu, evaluate_ocr, levenshtein, meteor, ocr_sample_metrics

__all__ = [
    "COCO_CLASSES", "COCO_NAME_TO_ID", "STAT_NAMES", "bleu", "box_iou", "coco_eval",
    "detections_from_completions", "evaluate_counting", "evaluate_detection", "evaluate_grounding",
    "evaluate_ocr", "grounding_metrics", "levenshtein", "meteor", "ocr_sample_metrics", "parse_box",
    "parse_count", "parse_detections", "rescale_boxes", "rescale_detections",
]
