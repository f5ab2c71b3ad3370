"""The slice's smoke test: two GRPO steps of a tiny random Qwen2-VL on synthetic grounding,
on every chip, with nothing but what `tpu/setup.sh` installs (no torch: the tiny checkpoint
is written with NumPy and safetensors, `pr1_jax.tiny.write_numpy_checkpoint`).

    tpu/run.sh NAME .venv/bin/python -m pr1_jax.train --config=configs/tpu_smoke.py \\
        --config.workdir=gs://BUCKET/smoke --config.batch.prompts_per_step=CHIPS

Checks, in about a minute: the workers find each other (one mesh over all chips), every
worker writes and reads the same tiny model, the rollout and update compile and run on the
slice's kernels, metrics are written and the checkpoint lands in the (shared) workdir.
`prompts_per_step` (= `prompts_per_micro`) should be a multiple of the chips so that each
chip has prompts of its own; 8 here (one v5e-8 / v6e-8 host).
"""

from configs import demo


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/tpu_smoke.py takes no argument, got {arg!r}")
    c = demo.get_config()
    c.workdir = "runs/tpu_smoke"
    c.tiny = dict(c.tiny, writer="numpy")
    c.data.synthetic = 64
    c.data.eval_examples = 8
    c.data.eval_batch = 8
    c.batch.prompts_per_step = 8
    c.batch.prompts_per_micro = 0  # 0: follows prompts_per_step (a command-line change of one is enough)
    c.total_steps = 2
    c.sft.steps = 0
    c.eval_every = 2
    c.checkpoint_every = 2
    c.compile_cache = ""  # compile on the slice every time: compiling is part of what this checks
    return c
