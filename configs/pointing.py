"""Pointing on the CPU: the demo's tiny Qwen2-VL and synthetic scenes, asked "Point to the red
circle in the image." and answering "(x,y)" (pr1_jax/tasks/pointing.py), SFT then GRPO with the
point-in-box and format rewards. Held-out score: point accuracy (% of points inside the box).

    python -m pr1_jax.train --config=configs/pointing.py

A task added as one file plus this config; not one of Perception-R1's recipes.
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
