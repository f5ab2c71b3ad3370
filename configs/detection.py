"""PR1 COCO detection: Qwen2.5-VL-3B-Instruct, COCO2017 train, F1+cls+IoU reward.

    python -m pr1_jax.train --config=configs/detection.py --config.model_dir=Qwen2.5-VL-3B-Instruct \
        --config.data.train=PR1-Datasets-Detection/pr1_dataset_detection.json \
        --config.data.image_dir=PR1-Datasets-Detection/images

Paper (Table 3): COCO val2017 AP/AP50/AP75 31.9/46.7/33.4 (base Qwen2.5-VL-3B 16.1/23.7/16.7).
The released script sets DO_PENAIlty=False (no missing-detection penalty); the curriculum
of the paper is not in PR1's code. Qwen2.5-VL answers in absolute pixels of the resized
image (JSON `bbox_2d`), the convention `pr1_detection` and `pr1_jax.evaluate --task=detection`
use; model_dir must be a Qwen2.5-VL checkpoint (config.json `model_type: qwen2_5_vl`).

The curriculum (`--config=configs/detection.py:curriculum`; off by default, as in PR1's code) is our
reading of the paper, whose schedule is not published: first the offline pass scores every
training image with the starting policy (8 answers each, the F1/number reward),

    python -m pr1_jax.data.curriculum --config=configs/detection.py --out=runs/detection_difficulty

then training starts on the easier third (highest mean reward), the middle third joins at step
300 and the hardest at step 600, while the rollouts per prompt rise 8 → 12 → 16 (Kimi-1.5's
"more samples for harder data"). Each step logs its stage, its G and its reward under the
stage's name (curriculum/*), and the run writes the stages to WORKDIR/curriculum.json.
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    c.task = "detection"
    c.workdir = "runs/detection"
    c.rewards = ("pr1_detection",)
    c.reward_kwargs.pr1_detection = dict(do_penalty=False)
    c.prompt.system = "qwen"
    c.skip_special_tokens = True
    c.grpo.temperature = 1.0
    c.sampling.max_new_tokens = 2048
    if arg == "curriculum":
        c.data.curriculum.difficulty = "runs/detection_difficulty/difficulty.json"
        c.data.curriculum.stage_steps = (0, 300, 600)
        c.data.curriculum.num_generations = (8, 12, 16)
    elif arg:
        raise ValueError(f"configs/detection.py takes no argument or 'curriculum', got {arg!r}")
    return c
