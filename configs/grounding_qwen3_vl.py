"""Visual grounding with Qwen3-VL-2B-Instruct: PR1's grounding recipe, Qwen3-VL's answer format.

    python -m pr1_jax.train --config=configs/grounding_qwen3_vl.py \
        --config.model_dir=Qwen3-VL-2B-Instruct --config.data.train=refcoco_320k/train.json \
        --config.data.image_dir=coco/train2014

PR1's hyper-parameters (configs/grounding.py: RefCOCO 5k of 320k, 8 answers per prompt,
temperature 0.9, β 0.04, lr 1e-6, 768 new tokens). What changes with Qwen3-VL
(docs/qwen3_vl.md): it answers a box as JSON, `{"bbox_2d": [x1, y1, x2, y2], "label": ...}`,
coordinates in [0, 1000] of the image (no `<|box_start|>` tokens), so the rewards are
`grounding_iou` (IoU², reading the answer's one `[x1, y1, x2, y2]` at that scale; PR1's
`pr1_grounding` would multiply it by 1000) and `qwen3_grounding_format` (exactly one such box),
and the evaluation reads the same format (the grounding task's `score` with the checkpoint's
`model_type`). Images: 16-px patches, so 1e6 px → ≤ 3,907 patches per image.
"""

from configs import grounding


def get_config(arg=None):
    c = grounding.get_config(arg)
    c.workdir = "runs/grounding_qwen3_vl"
    c.rewards = ("grounding_iou", "qwen3_grounding_format")
    c.data.min_pixels = 65_536  # Qwen3-VL's processor minimum (256 patches of 16 px)
    c.batch.patch_row_len = 4096  # ≥ 1e6 px / 16² patches
    return c
