"""The 80 COCO detection classes with their official category ids (1..90 with gaps).

The one table of the package: the detection reward (label → id), the detection prompts
(names in this order, comma-separated) and COCO evaluation all read it. The ids skip 12, 26, 29, 30, 45, 66, 68, 69, 71, 83.
"""

from __future__ import annotations

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

_MISSING_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})

COCO_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _MISSING_IDS)

COCO_NAME_TO_ID: dict[str, int] = dict(zip(COCO_CLASSES, COCO_IDS))

COCO_ID_TO_NAME: dict[int, str] = {i: n for n, i in COCO_NAME_TO_ID.items()}

assert len(COCO_CLASSES) == len(COCO_IDS) == 80
