"""Peer baseline at the Qwen2.5-VL-3B architecture: transformers' Qwen2_5_VLForConditionalGeneration
(PyTorch, sdpa), random bf16 weights; the same inputs and measurements as
`hf_qwen2vl_generate.py` (rollout generate at the given batches, fwd+bwd at batch 8).

Usage on the GPU machine: BATCHES=8,64 NEW=256 python3 benchmarks/peer_hf_qwen2_5_vl.py
"""

import torch

import hf_qwen2vl_generate as peer  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_theta=1000000.0, tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
VISION = dict(depth=32, hidden_size=1280, out_hidden_size=2048, intermediate_size=3420, num_heads=16,
              in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")


def make_config():
    return Qwen2_5_VLConfig(text_config=dict(TEXT), vision_config=dict(VISION), **peer.IDS, tie_word_embeddings=True)


if __name__ == "__main__":
    peer.make_config = make_config
    peer.Qwen2VLForConditionalGeneration = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    peer.main()
