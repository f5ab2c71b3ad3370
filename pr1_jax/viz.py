"""Drawing for humans: boxes on images, a gallery of predictions vs GT, reward/accuracy curves.

Headless: images are drawn with PIL and plots use matplotlib's Agg canvas directly (no pyplot,
no global backend switch), so this works on TPU hosts and in CI without a display.

    img = draw_boxes("cat.jpg", qwen_norm_to_pixels([[102, 47, 380, 996]], *size), labels=["cat"])
    gallery([{"image": img, "pred": [[10, 10, 50, 60]], "gt": [[12, 8, 52, 58]], "caption": "IoU 0.87"}],
            "gallery.png")
    plot_curves({"reward": rewards, "acc@0.5": (eval_steps, accs)}, "curves.png", "grounding")

Boxes are x1, y1, x2, y2 in absolute pixels of the image they are drawn on. Qwen2-VL prints
boxes in [0, 1000) normalised coordinates: convert them with `qwen_norm_to_pixels`.

Paths (images read, PNGs written) may be local or any URI etils.epath supports (gs://…): a
PNG is encoded in memory and written whole through epath.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PRED_COLOR = (230, 40, 40)  # red
GT_COLOR = (40, 200, 60)  # green
_PALETTE = ((230, 40, 40), (40, 110, 230), (240, 160, 20), (150, 60, 200), (20, 180, 180), (200, 60, 140))


def qwen_norm_to_pixels(boxes: Any, width: float, height: float) -> np.ndarray:
    """Qwen2-VL [0, 1000) boxes [..., 4] → pixels of a width × height image (float64)."""
    b = np.asarray(boxes, np.float64)
    return b * np.array([width, height, width, height], np.float64) / 1000.0


def _as_image(image: Any) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        image = Image.open(io.BytesIO(_storage_path(image).read_bytes()))
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:  # floats in [0, 1]
            arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    return image.convert("RGB")  # always a copy: never draws on the caller's image


def _storage_path(path: str | os.PathLike):
    from pr1_jax.multihost import storage_path  # imports jax: only when a file is read or written

    return storage_path(path)


def save_image(image: Image.Image, out_path: str | os.PathLike) -> None:
    """`image` at `out_path` (local or a URI), encoded in memory in the format its extension
    names (PNG by default) and written whole."""
    path = _storage_path(out_path)
    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    path.write_bytes(buf.getvalue())


def _draw(draw: ImageDraw.ImageDraw, boxes: np.ndarray, labels: Sequence[str] | None,
          color: tuple[int, int, int], width: int, font) -> None:
    for k, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(int).tolist()):
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=color, width=width)
        if labels is not None and k < len(labels) and labels[k]:
            text = str(labels[k])
            tx, ty = min(x1, x2), max(0, min(y1, y2) - 12)
            left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
            draw.text((tx, ty), text, fill=(255, 255, 255), font=font)


def draw_boxes(image: Any, boxes: Any, labels: Sequence[str] | None = None,
               color: tuple[int, int, int] = PRED_COLOR, width: int = 3,
               out_path: str | os.PathLike | None = None) -> Image.Image:
    """A copy of `image` (PIL, HWC uint8/float array, or path) with `boxes` [N, 4] drawn.

    The outline covers `width` pixels inward from each edge, so pixel (x1, (y1 + y2) // 2) has
    `color`. Labels go on a filled tag above the top-left corner. Saved to `out_path` if given.
    """
    img = _as_image(image)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    _draw(ImageDraw.Draw(img), b, labels, tuple(color), width, ImageFont.load_default())
    if out_path is not None:
        save_image(img, out_path)
    return img


def gallery(items: Sequence[Mapping[str, Any]], out_path: str | os.PathLike | None, cols: int = 4,
            cell: int = 256, caption_height: int = 24, pred_color=PRED_COLOR, gt_color=GT_COLOR,
            width: int = 2) -> Image.Image:
    """A grid PNG: each item's image fitted into a `cell`×`cell` square, GT boxes in `gt_color`
    and predicted boxes in `pred_color` on top, a one-line caption below.

    items: dicts with "image" (PIL / array / path) and optional "pred", "gt" ([N, 4] pixels of
    that image), "pred_labels", "gt_labels", "caption". The canvas is
    min(cols, n)·cell wide and ceil(n / cols)·(cell + caption_height) high.
    """
    if not items:
        raise ValueError("gallery needs at least one item")
    cols = max(1, min(cols, len(items)))
    rows = math.ceil(len(items) / cols)
    canvas = Image.new("RGB", (cols * cell, rows * (cell + caption_height)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, item in enumerate(items):
        img = _as_image(item["image"])
        scale = min(cell / img.width, cell / img.height)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.BILINEAR)
        tile = ImageDraw.Draw(img)
        for key, color in (("gt", gt_color), ("pred", pred_color)):
            if item.get(key) is not None:
                boxes = np.asarray(item[key], np.float64).reshape(-1, 4) * scale
                _draw(tile, boxes, item.get(f"{key}_labels"), tuple(color), width, font)
        r, c = divmod(k, cols)
        x0, y0 = c * cell, r * (cell + caption_height)
        canvas.paste(img, (x0 + (cell - size[0]) // 2, y0 + (cell - size[1]) // 2))
        caption = str(item.get("caption", ""))
        if caption:
            draw.text((x0 + 4, y0 + cell + 4), caption[: max(1, cell // 6)], fill=(0, 0, 0), font=font)
    if out_path is not None:
        save_image(canvas, out_path)
    return canvas


def plot_curves(series: Mapping[str, Any], out_path: str | os.PathLike, title: str = "",
                xlabel: str = "step", ylabel: str = "", smooth: int = 1) -> None:
    """Line plot of named curves to a PNG, e.g. mean reward and eval accuracy over steps.

    series: name → values (x = 0, 1, 2, …) or name → (steps, values). smooth > 1 adds a
    trailing moving average of that window on top of the raw (faded) curve.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, (name, data) in enumerate(series.items()):
        if isinstance(data, tuple) and len(data) == 2:
            x, y = np.asarray(data[0], np.float64), np.asarray(data[1], np.float64)
        else:
            y = np.asarray(data, np.float64)
            x = np.arange(len(y), dtype=np.float64)
        color = np.array(_PALETTE[k % len(_PALETTE)]) / 255.0
        if smooth > 1 and len(y) >= smooth:
            ax.plot(x, y, color=color, alpha=0.3, linewidth=1)
            ys = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            ax.plot(x[smooth - 1:], ys, color=color, label=name, linewidth=2)
        else:
            ax.plot(x, y, color=color, label=name, linewidth=1.5, marker="o" if len(y) <= 20 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(loc="best")
    fig.tight_layout()
    path = _storage_path(out_path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png")
    path.write_bytes(buf.getvalue())
