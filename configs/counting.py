"""PR1 visual counting: Qwen2-VL-2B-Instruct, PixMo-Count 10k, Hungarian point reward.

    python -m pr1_jax.train --config=configs/counting.py --config.model_dir=Qwen2-VL-2B-Instruct \
        --config.data.train=PR1-Datasets-Counting/json/pr1_counting_10k.json \
        --config.data.image_dir=PR1-Datasets-Counting

Paper (Table 3): PixMo-Count val/test accuracy 78.1/75.6 (base 60.2/50.5).
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    c.task = "counting"
    c.workdir = "runs/counting"
    c.data.train_sample_size = 10000
    c.rewards = ("pr1_counting",)
    c.prompt.system = "qwen"
    c.skip_special_tokens = False
    c.grpo.temperature = 1.0
    c.sampling.max_new_tokens = 768
    return c
