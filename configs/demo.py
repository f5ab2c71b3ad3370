"""The CPU demo: a tiny random Qwen2-VL trained on synthetic visual grounding, SFT then GRPO.

    python -m pr1_jax.train --config=configs/demo.py

No network; about 20 minutes on a busy 2-core CPU (measured). A tiny Qwen2-VL (written by transformers with
random weights, the real Qwen2 tokenizer) is first taught the answer format on coloured
shapes ("Output the bounding box of the red circle in the image.") by a short SFT
warm-up, then trained with PR1's GRPO and rewards (IoU² + format). Writes to
runs/demo: reward.png, eval.png (held-out Acc@0.5 over steps), gallery PNGs,
metrics.jsonl, eval.jsonl, checkpoints/. The README records a run's numbers.
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    c.task = "grounding"
    c.workdir = "runs/demo"
    c.model_dir = "tiny"
    c.tiny = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                  mrope_section=(4, 6, 6), vision_depth=2, vision_width=64, vision_heads=4,
                  min_pixels=56 * 56, max_pixels=112 * 112, seed=0)
    c.dtype = "float32"
    c.remat = False
    c.data.synthetic = 2048
    # One shape on a coordinate-gradient background (see data/synthetic.py: a model trained
    # from scratch has no absolute-position signal otherwise), fixed 112×112 images.
    c.data.synthetic_kwargs = dict(min_side=112, max_side=112, min_shapes=1, max_shapes=1,
                                   colors=("red", "blue"), size_frac=(0.25, 0.45), background="coords")
    c.data.eval_examples = 64
    c.data.min_pixels = 56 * 56
    c.data.max_pixels = 112 * 112
    c.rewards = ("pr1_grounding", "pr1_grounding_format")
    c.sampling.max_new_tokens = 32
    c.grpo.temperature = 1.0
    c.batch.prompts_per_step = 4
    c.batch.prompts_per_micro = 4
    c.batch.seq_len = 64
    c.batch.patch_row_len = 64
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "constant"
    c.total_steps = 30
    c.sft.steps = 200
    c.sft.learning_rate = 1e-3
    c.sft.prompts_per_step = 16
    c.eval_every = 10
    c.checkpoint_every = 1000
    c.chunk_size = 32
    return c
