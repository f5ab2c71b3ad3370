"""Everything a Hugging Face Qwen2-VL directory gives, loaded once, and prompt batches from it.

    from pr1_jax.pretrained import Pretrained
    pre = Pretrained.load("Qwen2-VL-2B-Instruct")          # config, params, tokenizer, processor
    batch = pre.prompt_batch(["cat.jpg"], ["Output the bounding box of the cat in the image."])
    logits_btv = pre.model().apply({"params": pre.params}, batch.inputs)

Prompts are rendered as Qwen2-VL's chat template renders one user turn (the image, then
the text) with its default system prompt unless `system_prompt` is given; PR1 trains
with `processing.chat.SYSTEM_PROMPTS["default"]` ("You are a helpful assistant. ").
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pr1_jax import sharding
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.structs import ModelInputs
from pr1_jax.processing import batch as batch_lib
from pr1_jax.processing import chat
from pr1_jax.processing import image as image_lib


@dataclasses.dataclass
class PromptBatch:
    """Prompts ready for the model, with what is needed to map answers back to images."""

    inputs: ModelInputs  # NumPy arrays; jax.tree.map(jnp.asarray, ...) to put on device
    prompt_ids: list[np.ndarray]  # [T_b] int32 each, image pads expanded
    resized_hw: list[tuple[int, int] | None]  # the size each image was resized to
    original_hw: list[tuple[int, int] | None]


@dataclasses.dataclass
class Pretrained:
    model_dir: Path
    config: ModelConfig
    params: Any  # parameter tree of jax arrays
    tokenizer: Any
    special: chat.SpecialTokens
    image_config: image_lib.ImageProcessorConfig

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, mesh=None,
             **image_overrides) -> "Pretrained":
        """Reads config.json, safetensors, tokenizer and preprocessor_config.json.

        mesh: params sharded on it as training lays them out (`sharding.load_params`: each
          process reads only its slices of the safetensors files); None: on the default device.
        image_overrides: e.g. max_pixels=1_000_000 (PR1's training setting).
        """
        d = Path(model_dir)
        config = ModelConfig.from_pretrained(d)
        if mesh is not None:
            params = sharding.load_params(d, mesh, cfg=config, dtype=dtype)
        else:
            params = jax.tree.map(lambda x: jnp.asarray(x, dtype), hf_io.load_params(d, config))
        tokenizer = chat.load_tokenizer(d)
        special = chat.SpecialTokens.from_pretrained(d, tokenizer)
        image_config = image_lib.ImageProcessorConfig.from_pretrained(d, **image_overrides)
        return cls(d, config, params, tokenizer, special, image_config)

    def model(self, **kwargs) -> Qwen2VL:
        dtype = jax.tree.leaves(self.params)[0].dtype
        return Qwen2VL(self.config, dtype=kwargs.pop("dtype", dtype), param_dtype=dtype, **kwargs)

    def prompt_batch(self, images: Sequence[Any | None], texts: Sequence[str], *,
                     system_prompt: str | None = None, messages: Sequence[list] | None = None,
                     seq_len: int | None = None, row_len: int | None = None,
                     num_rows: int | None = None, images_per_row: int | None = None) -> PromptBatch:
        """One prompt per (image or None, text); `messages` overrides the rendering per row;
        the shapes as `batch.build_inputs` takes them."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        rows, packed_images, resized, original = [], [], [], []
        for i, (img, text) in enumerate(zip(images, texts)):
            if not text and img is None:
                raise ValueError(f"prompt {i} is empty: give an image, a text or both")
            grids = []
            if img is not None:
                pil = image_lib.load_image(img)
                original.append((pil.height, pil.width))
                pixels, grid = image_lib.preprocess(pil, self.image_config)
                resized.append((int(grid[1]) * self.image_config.patch_size,
                                int(grid[2]) * self.image_config.patch_size))
                packed_images.append((pixels, tuple(int(g) for g in grid)))
                grids.append(grid)
            else:
                original.append(None)
                resized.append(None)
            if messages is not None:
                msgs = messages[i]
            else:
                content = ([{"type": "image"}] if img is not None else []) + [{"type": "text", "text": text}]
                msgs = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
                msgs = msgs + [{"role": "user", "content": content}]
            rows.append(chat.encode_prompt(self.tokenizer, msgs, grids, self.special))
        inputs = batch_lib.build_inputs(
            rows, packed_images, image_token_id=self.config.image_token_id, pad_id=self.special.pad_id,
            seq_len=seq_len, row_len=row_len, num_rows=num_rows, merge=self.config.vision.merge_size,
            patch_dim=self.config.vision.patch_dim, images_per_row=images_per_row)
        return PromptBatch(inputs, rows, resized, original)
