"""Rule-based rewards of Perception-R1, registered by name (NumPy, host side).

    from pr1_jax import rewards
    rewards.names()                       # all registered names
    fn = rewards.get("pr1_grounding")     # fn(completions: list[str], **columns) -> float32 [B]
    r = fn(texts, solution=gts)

PR1's released functions, value for value (quirks included, see each docstring):
`pr1_grounding`, `pr1_grounding_format`, `pr1_counting`, `pr1_detection`, `pr1_ocr`.
Recommended corrected twins: `grounding_iou`, `grounding_format_strict`, `counting_strict`,
`detection_robust`, `ocr_edit_distance`.

Decode conventions: grounding and counting expect completions decoded with special tokens
kept; detection and OCR with special tokens skipped (as PR1's scripts).
"""

from pr1_jax.coco import COCO_CLASSES, COCO_ID_TO_NAME, COCO_IDS, COCO_NAME_TO_ID
from pr1_jax.rewards.counting import counting_strict, pr1_counting
from pr1_jax.rewards.detection import detection_robust, pr1_detection
from pr1_jax.rewards.grounding import grounding_format_strict, grounding_iou, pr1_grounding, pr1_grounding_format
from pr1_jax.rewards.ocr import levenshtein, ocr_edit_distance, pr1_ocr
from pr1_jax.rewards.registry import get, names, register

__all__ = [
    "COCO_CLASSES", "COCO_IDS", "COCO_ID_TO_NAME", "COCO_NAME_TO_ID",
    "get", "names", "register", "levenshtein",
    "pr1_grounding", "pr1_grounding_format", "pr1_counting", "pr1_detection", "pr1_ocr",
    "grounding_iou", "grounding_format_strict", "counting_strict", "detection_robust", "ocr_edit_distance",
]
