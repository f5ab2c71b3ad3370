"""Qwen2-VL / Qwen2.5-VL in Flax (linen), with Hugging Face checkpoint import and export."""
