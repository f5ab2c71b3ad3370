"""Peer baseline at the Qwen3-VL-2B architecture: transformers' Qwen3VLForConditionalGeneration
(PyTorch, sdpa), random bf16 weights; the measurements of `hf_qwen2vl_generate.py` (rollout
generate at the given batches, one training forward+backward) on the inputs `bench_model.py
--preset=qwen3_vl_2b --side=512` builds: 40 random tokens, a 512-px image (32² patches of 16 px
→ 256 tokens), 20 tokens. The config is pr1_jax's preset written as transformers reads it.

Usage on the GPU machine: BATCHES=8,64 NEW=256 python3 benchmarks/peer_hf_qwen3_vl.py
"""

import torch

import hf_qwen2vl_generate as peer  # noqa: E402  (run as a plain script: its directory is on the path)
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: E402

from pr1_jax.model.config import PRESETS  # noqa: E402

SIDE, PATCH = 512, 16


def make_config():
    d = PRESETS["qwen3_vl_2b"]().to_hf_dict()
    d.pop("architectures", None)
    d.pop("model_type", None)
    return Qwen3VLConfig(**d)


def batch_inputs(B, side=SIDE, text_before=40, text_after=20, device="cuda"):
    g = side // PATCH
    n_img_tok = g * g // 4
    gen = torch.Generator().manual_seed(0)
    ids = []
    for _ in range(B):
        pre = torch.randint(0, 150000, (text_before,), generator=gen)
        post = torch.randint(0, 150000, (text_after,), generator=gen)
        ids.append(torch.cat([pre, torch.tensor([151652]), torch.full((n_img_tok,), 151655), torch.tensor([151653]),
                              post]))
    input_ids = torch.stack(ids).to(device)
    pix = torch.randn(B * g * g, 3 * 2 * PATCH * PATCH, generator=gen).to(device, torch.bfloat16)
    thw = torch.tensor([[1, g, g]] * B, device=device)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pix,
                image_grid_thw=thw, mm_token_type_ids=(input_ids == 151655).long())


if __name__ == "__main__":
    peer.make_config = make_config
    peer.batch_inputs = lambda B, side=SIDE, **kw: batch_inputs(B, side=max(side, 2 * 2 * PATCH), **kw)
    peer.Qwen2VLForConditionalGeneration = Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    peer.main()
