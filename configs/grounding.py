"""PR1 visual grounding: Qwen2-VL-2B-Instruct, RefCOCO 5k of 320k, IoU² + format reward.

    python -m pr1_jax.train --config=configs/grounding.py \
        --config.model_dir=Qwen2-VL-2B-Instruct --config.data.train=refcoco_320k/train.json \
        --config.data.image_dir=coco/train2014

Paper (Table 1): RefCOCO val/testA/testB Acc@0.5 89.1/91.4/84.5 (base Qwen2-VL-2B 86.8/89.6/82.0).
PR1's grounding script keeps TRL's temperature 0.9 and max_completion_length 768.
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    c.task = "grounding"
    c.workdir = "runs/grounding"
    c.data.train_sample_size = 5000
    c.rewards = ("pr1_grounding", "pr1_grounding_format")
    c.skip_special_tokens = False
    c.grpo.temperature = 0.9
    c.sampling.max_new_tokens = 768
    return c
