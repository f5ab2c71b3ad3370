"""Qwen2-VL chat prompts for PR1: messages → text → token ids with `<|image_pad|>` expanded.

    tok = load_tokenizer(model_dir)
    special = SpecialTokens.from_pretrained(model_dir, tok)
    messages = pr1_messages(QUESTION_TEMPLATES["pr1_grounding"].format(question="the red car"))
    ids_t = encode_prompt(tok, messages, [grid_thw], special)    # int32 [T]
    texts = decode_batch(tok, completion_rows, skip_special_tokens=False)

`render_chat` writes Qwen2-VL's chat template in plain Python (docs/method.md §4.1);
tests/test_chat.py checks it against the jinja template run by transformers. Special
token *ids* are always read from the checkpoint (tokenizer vocabulary, config.json,
generation_config.json); only the token *strings* are constants here.

The tokenizer is a `tokenizers.Tokenizer` (Rust; loads in ~0.3 s without importing
transformers). transformers' Qwen2 tokenizer encodes and decodes through the same object
(its `backend_tokenizer`), so ids and texts are identical; functions here accept either.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pr1_jax.coco import COCO_CLASSES

# ----------------------------------------------------------------------------- token strings
ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
OBJECT_REF_START, OBJECT_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"

# ----------------------------------------------------------------------------- PR1 prompts
# What Qwen2-VL's (and Qwen2.5-VL's) template inserts when the first message is not a system one.
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
# PR1's --system_prompt choices used in training: both carry a trailing space (§4.1).
SYSTEM_PROMPTS = {
    "default": "You are a helpful assistant. ",
    "qwen": "You are a helpful assistant. ",
}

COCO_CLASS_NAMES = COCO_CLASSES  # the 80 names in COCO id order (pr1_jax.coco)
_COCO_LIST = ", ".join(COCO_CLASS_NAMES)

# Training user prompts (PR1 constants.py), filled with str.format(question=...).
QUESTION_TEMPLATES = {
    "pr1_grounding": "Output the bounding box of the {question} in the image.",
    "pr1_counting": "Output all the bounding boxes of the {question}",
    "pr1_detection": f"Please output bbox coordinates and names of {_COCO_LIST}.",
    "pr1_ocr": "OCR this image.",
}
# Evaluation user prompts (PR1's eval/ scripts; user message only, no system message).
EVAL_TEMPLATES = {
    "pr1_grounding": "Output the bounding box of the {question} in the image.",
    "pr1_counting": "Output all the bounding boxes of the {question}",
    "pr1_detection": ("Locate every item from the category list in the image and output the "
                      f"coordinates in JSON format. The category set includes {_COCO_LIST}."),
    "pr1_ocr": "<image>\nOCR this image: ",  # the literal "<image>" text, plus the real image
}


def question_text(task: str, question: str = "", *, eval_prompt: bool = False) -> str:
    """The user text of `task` (a key of QUESTION_TEMPLATES) for one example."""
    templates = EVAL_TEMPLATES if eval_prompt else QUESTION_TEMPLATES
    if task not in templates:
        raise KeyError(f"unknown task {task!r}; known: {sorted(templates)}")
    return templates[task].format(question=question)


def pr1_messages(question_text: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """PR1's training messages: system + user[image, text] (§4.1).

    `system_prompt`: None → PR1's "You are a helpful assistant. " (trailing space); a key of
    SYSTEM_PROMPTS; or the literal system text.
    """
    system = SYSTEM_PROMPTS["default"] if system_prompt is None else SYSTEM_PROMPTS.get(system_prompt, system_prompt)
    return [{"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_text}]}]


def eval_messages(question_text: str) -> list[dict[str, Any]]:
    """PR1's eval messages: user[image, text] only; the template adds Qwen's default system."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_text}]}]


# ----------------------------------------------------------------------------- rendering
def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                add_vision_id: bool = False) -> str:
    """Qwen2-VL's chat template, rendered without jinja.

    - If the first message is not a system message, "You are a helpful assistant." is inserted.
    - Each message: `<|im_start|>{role}\\n{content}<|im_end|>\\n`; content is a string, or a
      list of items: images (`type == "image"` or an `image` / `image_url` key) render
      `<|vision_start|><|image_pad|><|vision_end|>`, videos likewise with `<|video_pad|>`,
      items with a `text` key render their text, anything else renders nothing.
    - `add_vision_id`: "Picture {n}: " / "Video {n}: " before each image / video.
    - `add_generation_prompt`: `<|im_start|>assistant\\n` at the end.
    """
    if not messages:
        raise ValueError("cannot render an empty conversation")  # transformers refuses it too
    out: list[str] = []
    n_images = n_videos = 0
    for i, message in enumerate(messages):
        role = message["role"]
        if i == 0 and role != "system":
            out.append(f"{IM_START}system\n{QWEN_DEFAULT_SYSTEM}{IM_END}\n")
        out.append(f"{IM_START}{role}\n")
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, Sequence):
            for item in content:
                if item.get("type") == "image" or "image" in item or "image_url" in item:
                    n_images += 1
                    if add_vision_id:
                        out.append(f"Picture {n_images}: ")
                    out.append(f"{VISION_START}{IMAGE_PAD}{VISION_END}")
                elif item.get("type") == "video" or "video" in item:
                    n_videos += 1
                    if add_vision_id:
                        out.append(f"Video {n_videos}: ")
                    out.append(f"{VISION_START}{VIDEO_PAD}{VISION_END}")
                elif "text" in item:
                    out.append(str(item["text"]))
        else:
            raise TypeError(f"message {i} ({role}): content must be a str or a list of items, "
                            f"got {type(content).__name__}")
        out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


# ----------------------------------------------------------------------------- tokenizer
def load_tokenizer(model_dir: str | os.PathLike):
    """The checkpoint's tokenizer as a `tokenizers.Tokenizer`.

    Reads `tokenizer.json`; a directory with only `vocab.json` + `merges.txt` goes through
    transformers' AutoTokenizer (slower) and returns its backend tokenizer.
    """
    import tokenizers

    d = Path(model_dir)
    if (d / "tokenizer.json").is_file():
        return tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(d)).backend_tokenizer
    raise FileNotFoundError(f"{d}: no tokenizer files (need tokenizer.json, or vocab.json + merges.txt)")


def _backend(tokenizer):
    """`tokenizers.Tokenizer` behind `tokenizer` (itself, or a transformers fast tokenizer's)."""
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "token_to_id"):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, "
                        f"got {type(tokenizer).__name__}")
    return backend


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of Qwen2-VL's special tokens, read from a checkpoint (never hard-coded).

    Qwen2-VL-2B-Instruct: endoftext 151643, im_start 151644, im_end 151645,
    object_ref 151646/151647, box 151648/151649, vision 151652/151653, image_pad 151655,
    video_pad 151656, eos_ids (151645, 151643), pad_id 151643.
    """

    endoftext: int
    im_start: int
    im_end: int
    object_ref_start: int
    object_ref_end: int
    box_start: int
    box_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    eos_ids: tuple[int, ...]  # generation stops on any of these
    pad_id: int  # right padding of completions / left padding of prompts

    @property
    def image_token_id(self) -> int:
        return self.image_pad

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, tokenizer=None) -> "SpecialTokens":
        """Token ids from the tokenizer vocabulary, cross-checked with config.json.

        eos_ids: generation_config.json `eos_token_id` (int or list) if present, else the
        tokenizer's eos (tokenizer_config.json `eos_token`, else `<|im_end|>`).
        pad_id: tokenizer_config.json `pad_token`, else generation_config `pad_token_id`,
        else `<|endoftext|>`.
        """
        d = Path(model_dir)
        tok = _backend(tokenizer if tokenizer is not None else load_tokenizer(d))
        config = _read_json(d / "config.json")
        gen = _read_json(d / "generation_config.json")
        tok_cfg = _read_json(d / "tokenizer_config.json")

        def lookup(token: str) -> int:
            i = tok.token_to_id(token)
            if i is None:
                raise ValueError(f"{d}: token {token} is not in the tokenizer vocabulary")
            return int(i)

        ids = dict(endoftext=lookup(ENDOFTEXT), im_start=lookup(IM_START), im_end=lookup(IM_END),
                   object_ref_start=lookup(OBJECT_REF_START), object_ref_end=lookup(OBJECT_REF_END),
                   box_start=lookup(BOX_START), box_end=lookup(BOX_END),
                   vision_start=lookup(VISION_START), vision_end=lookup(VISION_END),
                   image_pad=lookup(IMAGE_PAD), video_pad=lookup(VIDEO_PAD))
        # The model finds image positions with config.json's ids: they must agree with the vocab.
        for field, key in (("image_pad", "image_token_id"), ("video_pad", "video_token_id"),
                           ("vision_start", "vision_start_token_id"), ("vision_end", "vision_end_token_id")):
            value = config.get(key)
            if value is not None and int(value) != ids[field]:
                raise ValueError(f"{d}: config.json {key}={value} but the tokenizer maps "
                                 f"{field} to {ids[field]}")

        eos = gen.get("eos_token_id")
        if eos is None:
            eos_token = _token_content(tok_cfg.get("eos_token")) or IM_END
            eos = lookup(eos_token)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad_token = _token_content(tok_cfg.get("pad_token"))
        if pad_token is not None:
            pad_id = lookup(pad_token)
        elif gen.get("pad_token_id") is not None:
            pad_id = int(gen["pad_token_id"])
        else:
            pad_id = ids["endoftext"]
        return cls(**ids, eos_ids=eos_ids, pad_id=pad_id)


# ----------------------------------------------------------------------------- encode / decode
def _expand_image_pads(ids: np.ndarray, image_grid_thws: Sequence[Sequence[int]], image_pad: int,
                       merge_size: int) -> np.ndarray:
    """Repeats the k-th `<|image_pad|>` t·h·w/merge² times for the k-th grid (one np.repeat)."""
    where = np.flatnonzero(ids == image_pad)
    if len(where) != len(image_grid_thws):
        raise ValueError(f"prompt has {len(where)} {IMAGE_PAD} placeholder(s) but "
                         f"{len(image_grid_thws)} image grid(s) were given")
    if not len(where):
        return ids
    grids = np.asarray(image_grid_thws, dtype=np.int64).reshape(-1, 3)
    counts = np.ones(len(ids), dtype=np.int64)
    counts[where] = grids.prod(axis=1) // (merge_size * merge_size)
    return np.repeat(ids, counts)


def encode_prompt(tokenizer, messages: Sequence[Mapping[str, Any]], image_grid_thws: Sequence[Sequence[int]],
                  special: SpecialTokens, add_generation_prompt: bool = True, *,
                  merge_size: int = 2) -> np.ndarray:
    """Prompt token ids, int32 [T], with each `<|image_pad|>` expanded to t·h·w/merge² copies.

    The text is tokenized once (`render_chat`), then the k-th placeholder is repeated for the
    k-th grid in `image_grid_thws` (each (t, h, w) as `preprocess` returns). Raises if the
    number of image placeholders differs from the number of grids.
    """
    text = render_chat(messages, add_generation_prompt=add_generation_prompt)
    ids = np.asarray(_backend(tokenizer).encode(text, add_special_tokens=False).ids, dtype=np.int32)
    return _expand_image_pads(ids, image_grid_thws, special.image_pad, merge_size)


def encode_prompts(tokenizer, messages_list: Sequence[Sequence[Mapping[str, Any]]],
                   image_grid_thws_list: Sequence[Sequence[Sequence[int]]], special: SpecialTokens,
                   add_generation_prompt: bool = True, *, merge_size: int = 2) -> list[np.ndarray]:
    """`encode_prompt` for many prompts; the tokenizer runs once over the batch (in parallel)."""
    if len(messages_list) != len(image_grid_thws_list):
        raise ValueError(f"{len(messages_list)} prompts but {len(image_grid_thws_list)} grid lists")
    texts = [render_chat(m, add_generation_prompt=add_generation_prompt) for m in messages_list]
    encodings = _backend(tokenizer).encode_batch(texts, add_special_tokens=False)
    return [_expand_image_pads(np.asarray(e.ids, dtype=np.int32), grids, special.image_pad, merge_size)
            for e, grids in zip(encodings, image_grid_thws_list)]


def _as_id_list(ids) -> list[int]:
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


def decode(tokenizer, ids, skip_special_tokens: bool = False) -> str:
    """Token ids (1-D) → text; `skip_special_tokens` drops tokens marked special (as HF's decode)."""
    return _backend(tokenizer).decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)


def decode_batch(tokenizer, rows, skip_special_tokens: bool = False) -> list[str]:
    """Rows of token ids (a [B, T] array or a list of 1-D sequences) → B texts.

    Rows are decoded whole, padding included: PR1 decodes completions with their
    `<|endoftext|>` right padding, which its rewards strip (§3.6). Trim rows first if needed.
    """
    lists = [_as_id_list(r) for r in rows]
    return _backend(tokenizer).decode_batch(lists, skip_special_tokens=skip_special_tokens)


def encode_text(tokenizer, text: str) -> np.ndarray:
    """Plain text (special-token strings included) → int32 ids, no template."""
    return np.asarray(_backend(tokenizer).encode(text, add_special_tokens=False).ids, dtype=np.int32)
