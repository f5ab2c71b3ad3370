"""Generating with transformers from an exported directory (`pr1_jax.export`), without torchvision.

    from pr1_jax import hf_generate
    ids = hf_generate.generate("/tmp/pr1_hf", "cat.jpg", "Output the bounding box of the cat in the image.")

`AutoProcessor` (`Qwen2VLProcessor`) cannot be built without torchvision in transformers 5.x:
it insists on a video processor, and Qwen2-VL's needs torchvision. `build_inputs` builds what
the processor would, from the two parts that need no torchvision — the tokenizer (its chat
template) and `Qwen2VLImageProcessorPil` — including `mm_token_type_ids` (0 text, 1 image),
from which `generate` computes Qwen2-VL's 3-D rotary positions (M-RoPE): without them
transformers falls back to 1-D text positions for the prompt's image tokens. docs/export.md
walks through it; tests/test_export.py checks that greedy generation through it equals
`pr1_jax.infer`'s token for token.
"""

from __future__ import annotations

import os
from typing import Any

IMAGE_TOKEN = "<|image_pad|>"


def build_inputs(tokenizer, image_processor, image: Any, prompt: str, *,
                 system_prompt: str | None = None) -> dict[str, Any]:
    """The model inputs for one image + one user text, as `Qwen2VLProcessor` makes them:

        input_ids [1, T] int64 (the image's placeholder expanded to one token per merged patch),
        attention_mask [1, T], pixel_values [P, C·2·14·14], image_grid_thw [1, 3],
        mm_token_type_ids [1, T] int (1 on image tokens, 0 elsewhere).

    The prompt is rendered as `pr1_jax.infer` renders it: one user turn (the image, then the
    text) after the chat template's default system prompt, or `system_prompt`.
    `image`: a path or a PIL image.
    """
    import torch
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.open(os.fspath(image))
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pixels = image_processor(images=[image.convert("RGB")], return_tensors="pt")
    n = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size ** 2  # tokens after the 2×2 merge
    text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n, 1)
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
            "mm_token_type_ids": (input_ids == image_token_id).int()}


def load(model_dir: str | os.PathLike):
    """(model, tokenizer, image processor) of an exported directory; the model in the export's
    dtype, in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto").eval()
    return model, AutoTokenizer.from_pretrained(model_dir), Qwen2VLImageProcessorPil.from_pretrained(model_dir)


def generate(model_dir: str | os.PathLike, image: Any, prompt: str, *, max_new_tokens: int = 128,
             system_prompt: str | None = None, loaded=None, **generate_kwargs) -> list[int]:
    """The generated token ids (the stop token included when one was produced, as
    `pr1_jax.infer`'s `token_ids`); greedy unless `generate_kwargs` say otherwise
    (e.g. do_sample=True, temperature=0.9, top_p=0.9, top_k=50). `loaded`: `load(model_dir)`'s
    result, to reuse."""
    import torch

    model, tokenizer, image_processor = loaded or load(model_dir)
    inputs = build_inputs(tokenizer, image_processor, image, prompt, system_prompt=system_prompt)
    generate_kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
