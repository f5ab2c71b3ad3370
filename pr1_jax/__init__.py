"""pr1_jax: Perception-R1 (GRPO post-training of Qwen2-VL on perception tasks) in JAX."""

__version__ = "0.1.0"
