"""PR1 OCR: Qwen2-VL-2B-Instruct, PageOCR 5k, edit-distance reward (MMR1's, PR1 did not release its own).

    python -m pr1_jax.train --config=configs/ocr.py --config.model_dir=Qwen2-VL-2B-Instruct \
        --config.data.train=pageocr_train.json --config.data.image_dir=pageocr_images

Paper (Table 2): PageOCR-en edit distance 3.5 (v1) / 2.8 (NeurIPS), F1 98.2 (base 8.0 / 94.4).
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    c.task = "ocr"
    c.workdir = "runs/ocr"
    c.data.train_sample_size = 5000
    c.rewards = ("pr1_ocr",)
    c.skip_special_tokens = True
    c.grpo.temperature = 1.0
    c.sampling.max_new_tokens = 2048
    return c
