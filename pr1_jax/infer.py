"""One image + one prompt → the model's completion, and its boxes drawn on the image.

    python -m pr1_jax.infer --model_dir=Qwen2-VL-2B-Instruct --image=cat.jpg \\
        --prompt="Output the bounding box of the cat in the image." --out=cat_boxes.png
    python -m pr1_jax.infer ... --json      # {"text": ..., "token_ids": [...], ...} on one line

    from pr1_jax import infer
    result = infer.run("Qwen2-VL-2B-Instruct", "cat.jpg", "Output the bounding box of the cat in the image.")

The prompt is one user turn rendered as Qwen2-VL's chat template renders it: the image,
then the text, after the template's default system prompt ("You are a helpful
assistant."), as PR1's eval scripts send it. Pixel limits come from the checkpoint's
`preprocessor_config.json` unless `--min_pixels/--max_pixels` override them (PR1 trains
with max_pixels 1,000,000). Temperature 0 decodes greedily (equal to transformers'
`generate(do_sample=False)`); otherwise temperature → top-k → top-p sampling with `--seed`.

Output conventions (docs/method.md §4.2–4.3, vLLM's): `text` is the completion decoded with
special tokens KEPT, up to but excluding the stop token; `token_ids` are the generated ids
with the stop token (`<|im_end|>` or `<|endoftext|>`) included when one was produced, and
`stopped` says whether it was.

Boxes (`parse_boxes`), drawn on the ORIGINAL image by `--out`:
  * Qwen2-VL: `<|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`,
    coordinates in [0, 1000) of the image → `viz.qwen_norm_to_pixels` with the original size;
    each box takes the label of the object reference before it.
  * Qwen2.5-VL: JSON `[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, ...]` (optionally in a
    ```json fence; the complete objects of a truncated list are kept), absolute pixels of
    the *resized* image → rescaled to the original size. A Qwen2.5-VL checkpoint's
    box-token output is read as resized-image pixels too.

Bad inputs (missing or non-image file, empty prompt, max_new_tokens ≤ 0, sampling
parameters outside temperature ≥ 0 (finite), 0 < top_p ≤ 1, top_k ≥ 0, a missing or
unloadable model directory, an unwritable `--out`) raise `InferError`, checked before the
model loads; the command line prints one line (`pr1_jax.infer: error: ...`) and exits with
status 2, without a traceback (pr1_jax/cli.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pr1_jax import cli, viz
from pr1_jax.errors import ConfigError
from pr1_jax.evaluation.detection import rescale_boxes
from pr1_jax.processing import image as image_lib
from pr1_jax.rewards.parsing import as_box4, load_json, parse_qwen_box, strip_code_fence

DTYPES = ("float32", "bfloat16")


class InferError(ConfigError):
    """A bad input or checkpoint; the message is one line meant for the user."""


# ----------------------------------------------------------------------------- boxes
_REF_OR_BOX = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>|<\|box_start\|>(.*?)<\|box_end\|>",
                         re.DOTALL)
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")  # a JSON object without nested objects


def _qwen_token_boxes(text: str) -> tuple[list[tuple[float, ...]], list[str]]:
    """Box groups in text order, each labelled with the object reference before it."""
    boxes, labels, label = [], [], ""
    for m in _REF_OR_BOX.finditer(text):
        if m.group(1) is not None:
            label = m.group(1).strip()
            continue
        box = parse_qwen_box(m.group(2))
        if box is not None:
            boxes.append(box)
            labels.append(label)
    return boxes, labels


def _json_items(text: str) -> list[Any]:
    """The items of a (possibly fenced) JSON answer; for invalid or truncated JSON, every
    complete flat `{...}` object that parses."""
    ok, value = load_json(strip_code_fence(text))
    if ok:
        return value if isinstance(value, list) else [value]
    items = []
    for m in _FLAT_OBJECT.finditer(text):
        ok, value = load_json(m.group(0))
        if ok:
            items.append(value)
    return items


def parse_boxes(text: str, original_hw: Sequence[int], resized_hw: Sequence[int] | None = None, *,
                normalized_box_tokens: bool = True) -> tuple[np.ndarray, list[str], str]:
    """Boxes a completion states → (boxes [N, 4] float64 x1,y1,x2,y2 in ORIGINAL-image pixels,
    labels [N], format "qwen2_vl" | "json" | "none").

    `original_hw` / `resized_hw`: (height, width) of the image as given and as the model saw it
    (needed for JSON `bbox_2d`, which is in resized pixels). `normalized_box_tokens`: box tokens
    hold [0, 1000) coordinates (Qwen2-VL); False reads them as resized pixels (Qwen2.5-VL).

    >>> parse_boxes("<|box_start|>(100,500),(300,1000)<|box_end|>", (200, 400))[0].tolist()
    [[40.0, 100.0, 120.0, 200.0]]
    """
    oh, ow = (int(v) for v in original_hw)
    rhw = tuple(int(v) for v in (resized_hw or original_hw))
    boxes, labels = _qwen_token_boxes(text)
    if boxes:
        b = np.asarray(boxes, np.float64)
        b = viz.qwen_norm_to_pixels(b, ow, oh) if normalized_box_tokens else rescale_boxes(b, rhw, (oh, ow))
        return b, labels, "qwen2_vl"
    json_boxes, json_labels = [], []
    for item in _json_items(text):
        if not isinstance(item, dict):
            continue
        box = as_box4(item.get("bbox_2d"))
        if box is not None:
            json_boxes.append(box)
            label = item.get("label", "")
            json_labels.append(label if isinstance(label, str) else json.dumps(label))
    if json_boxes:
        return rescale_boxes(np.asarray(json_boxes, np.float64), rhw, (oh, ow)), json_labels, "json"
    return np.zeros((0, 4), np.float64), [], "none"


def draw_completion(image: Any, text: str, out_path: str | os.PathLike, resized_hw: Sequence[int] | None = None,
                    *, normalized_box_tokens: bool = True) -> tuple[np.ndarray, list[str], str]:
    """Draws the boxes `text` states onto `image` (the original) and saves a PNG at `out_path`.

    Returns `parse_boxes`' (boxes [N, 4] original pixels, labels, format). An answer without
    boxes saves the image as is.
    """
    img = image_lib.load_image(image)
    boxes, labels, fmt = parse_boxes(text, (img.height, img.width), resized_hw,
                                   normalized_box_tokens=normalized_box_tokens)
    drawn = viz.draw_boxes(img, boxes, labels=labels, width=max(2, round(min(img.size) / 150)))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    drawn.save(out_path, format="PNG")
    return boxes, labels, fmt


# ----------------------------------------------------------------------------- checks
def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def load_pretrained(model_dir: str | os.PathLike, *, dtype: str = "float32", min_pixels: int | None = None,
                    max_pixels: int | None = None, mesh=None):
    """`Pretrained.load` with one-line `InferError`s for a missing or unloadable directory
    (`mesh`: the parameters sharded on it, as training lays them out)."""
    d = Path(os.path.expanduser(os.fspath(model_dir)))
    if not d.is_dir():
        raise InferError(f"{d}: model directory not found (--model_dir: a Hugging Face Qwen2-VL checkpoint directory)")
    if not (d / "config.json").is_file():
        raise InferError(f"{d}: not a Qwen2-VL checkpoint directory (no config.json)")
    if dtype not in DTYPES:
        raise InferError(f"dtype must be one of {DTYPES}, got {dtype!r}")

    import jax.numpy as jnp

    from pr1_jax.pretrained import Pretrained

    overrides = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    _check_pixel_limits(d, overrides)
    try:
        return Pretrained.load(d, dtype=getattr(jnp, dtype), mesh=mesh, **overrides)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable checkpoint or override
        raise InferError(f"{d}: cannot load the checkpoint ({_one_line(e)})") from e


def _check_pixel_limits(d: Path, overrides: dict[str, int]) -> None:
    """InferError naming the flags when min_pixels / max_pixels (each the override, else the
    checkpoint's) are not 0 < min ≤ max; the loader would blame the checkpoint."""
    if not overrides:
        return
    try:
        base = image_lib.ImageProcessorConfig.from_pretrained(d)
    except (OSError, ValueError):  # an unreadable preprocessor config: the load reports it
        return
    lo, hi = overrides.get("min_pixels", base.min_pixels), overrides.get("max_pixels", base.max_pixels)
    if not 0 < lo <= hi:
        raise InferError(f"need 0 < min_pixels ≤ max_pixels, got min_pixels={lo}, max_pixels={hi} (a limit not "
                         f"given is the checkpoint's preprocessor_config.json): change --min_pixels / --max_pixels")


def check_sampling(max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> None:
    """InferError unless max_new_tokens > 0, temperature finite and ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0
    (`cli.check_sampling`: NaN would pass `SamplingConfig`'s comparisons and sample garbage)."""
    if int(max_new_tokens) <= 0:
        raise InferError(f"max_new_tokens must be positive, got {max_new_tokens}")
    try:
        cli.check_sampling(temperature, top_p, top_k)
    except ConfigError as e:
        raise InferError(str(e)) from None


def _sampling_config(max_new_tokens: int, temperature: float, top_p: float, top_k: int):
    from pr1_jax.sampler import SamplingConfig

    check_sampling(max_new_tokens, temperature, top_p, top_k)
    return SamplingConfig(num_samples=1, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                          top_p=float(top_p), top_k=int(top_k))


# ----------------------------------------------------------------------------- run
def run(model_dir: str | os.PathLike, image: Any, prompt: str, *, max_new_tokens: int = 128,
        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
        min_pixels: int | None = None, max_pixels: int | None = None, system_prompt: str | None = None,
        out: str | os.PathLike | None = None, dtype: str = "float32", pretrained=None) -> dict:
    """Completes one (image, prompt) and returns

        {"text": completion (special tokens kept, stop token excluded),
         "token_ids": generated ids (stop token included when produced), "stopped": bool,
         "boxes": [[x1, y1, x2, y2], ...] in original-image pixels, "labels": [...],
         "box_format": "qwen2_vl" | "json" | "none", "original_hw", "resized_hw", "out": PNG path or None}

    `image`: a path or anything `processing.image.load_image` accepts. `system_prompt`: None
    keeps the template's default. `pretrained`: an already loaded `Pretrained` (model_dir is
    then only reported). Raises `InferError` for bad inputs, checked before the model loads.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InferError("prompt is empty: give the text to ask about the image")
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    try:
        pil = image_lib.load_image(image)
    except image_lib.ImageError as e:
        raise InferError(" ".join(str(e).split())) from e
    if out is not None:  # before the model loads and decodes
        cli.writable_dir(Path(out).expanduser().absolute().parent, f"--out={out}", InferError)

    # The checks above run before jax loads (load_pretrained checks the directory first too).
    pre = pretrained or load_pretrained(model_dir, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels)

    import jax

    from pr1_jax.processing import chat
    from pr1_jax.sampler import Sampler

    cfg = _sampling_config(max_new_tokens, temperature, top_p, top_k)
    try:
        batch = pre.prompt_batch([pil], [prompt], system_prompt=system_prompt)
    except image_lib.ImageError as e:  # e.g. an aspect ratio beyond Qwen2-VL's limit
        raise InferError(f"{image}: {' '.join(str(e).split())}") from e

    sampler = Sampler(pre.model(), eos_ids=pre.special.eos_ids, pad_id=pre.special.pad_id)
    result = sampler(pre.params, jax.tree.map(jax.numpy.asarray, batch.inputs), jax.random.PRNGKey(seed), cfg)
    n = int(result.lengths[0, 0])
    token_ids = [int(t) for t in np.asarray(result.tokens[0, 0, :n])]
    stopped = bool(token_ids) and token_ids[-1] in pre.special.eos_ids
    text = chat.decode(pre.tokenizer, token_ids[:-1] if stopped else token_ids, skip_special_tokens=False)

    original_hw, resized_hw = batch.original_hw[0], batch.resized_hw[0]
    qwen2 = pre.config.model_type == "qwen2_vl"
    if out is not None:
        boxes, labels, box_format = draw_completion(pil, text, out, resized_hw, normalized_box_tokens=qwen2)
    else:
        boxes, labels, box_format = parse_boxes(text, original_hw, resized_hw, normalized_box_tokens=qwen2)
    return {"text": text, "token_ids": token_ids, "stopped": stopped,
            "boxes": np.round(boxes, 2).tolist(), "labels": labels, "box_format": box_format,
            "original_hw": list(original_hw), "resized_hw": list(resized_hw),
            "out": None if out is None else os.fspath(out)}


# ----------------------------------------------------------------------------- command line
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("pr1_jax.infer", description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="HF Qwen2-VL / Qwen2.5-VL checkpoint directory")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True,
                   help="the user text, e.g. 'Output the bounding box of the cat in the image.'")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min_pixels", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--max_pixels", type=int, default=None, help="default: the checkpoint's (PR1 trains with 1000000)")
    p.add_argument("--system_prompt", default=None, help="default: the chat template's")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--out", default=None, help="PNG to draw the parsed boxes on (original image)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args.model_dir, args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                 min_pixels=args.min_pixels, max_pixels=args.max_pixels, system_prompt=args.system_prompt,
                 out=args.out, dtype=args.dtype)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["text"])
    if args.out is not None:
        print(f"drew {len(result['boxes'])} box(es) on {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0, or 2 after one line on stderr for an expected mistake (pr1_jax/cli.py)."""
    return cli.run("pr1_jax.infer", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
