"""Peer baseline for the forward pass: transformers' Qwen2-VL (PyTorch, sdpa), Qwen2-VL-2B
architecture, random bf16 weights, batch 8 × (448×448 image + 62 text tokens), no grad.

Reuses the config and inputs of `hf_qwen2vl_generate.py` (the project's generate peer).
Prints one JSON line. Usage on the GPU machine: python3 benchmarks/peer_hf_forward.py
"""
import json
import os
import time

import torch

from hf_qwen2vl_generate import Qwen2VLForConditionalGeneration, batch_inputs, make_config  # noqa: E402


def main():
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration._from_config(make_config(), torch_dtype=torch.bfloat16,
                                                             attn_implementation="sdpa").eval()
    batch = int(os.environ.get("BATCH", 8))
    inp = batch_inputs(batch)
    with torch.no_grad():
        for _ in range(2):
            model(**inp)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t = time.time()
            model(**inp)
            torch.cuda.synchronize()
            times.append(time.time() - t)
    print(json.dumps({"peer": "hf_forward_sdpa", "batch": batch, "seq": inp["input_ids"].shape[1],
                      "seconds": round(min(times), 4), "device": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
