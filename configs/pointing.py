"""Pointing on the CPU: the demo's tiny Qwen2-VL and synthetic scenes, asked "Point to the red
circle in the image." and answering "(x,y)" (pr1_jax/tasks/pointing.py), SFT then GRPO with the
point-in-box and format rewards. Held-out score: point accuracy (% of points inside the box).

    python -m pr1_jax.train --config=configs/pointing.py

A task added as one file plus this config; not one of Perception-R1's recipes. Recorded run
(2026-12-02, 2-core CPU, 2 min 16 s): held-out point accuracy 35.9% after SFT, then 21.9 / 28.1
/ 39.1% after 10 / 20 / 30 GRPO steps — at this size GRPO does not clearly improve it (a binary
reward on a tiny model; with learning_rate 3e-4 and 60 steps it fell to 26.6%). It shows the
task's plumbing end to end, not learning.
"""

from configs import demo


def get_config(arg=None):
    c = demo.get_config()
    c.task = "pointing"
    c.workdir = "runs/pointing"
    c.rewards = ("point_in_box", "point_format")
    c.sampling.max_new_tokens = 16
    if arg:
        raise ValueError(f"configs/pointing.py takes no argument, got {arg!r}")
    return c
