"""Qwen2-VL image preprocessing in NumPy/PIL: file → RGB → smart_resize → patch rows.

    cfg = ImageProcessorConfig.from_pretrained(model_dir, max_pixels=1_000_000)  # PR1's limit
    pixels_pf, grid_thw = preprocess("cat.jpg", cfg)    # [P, 1176] float32, [3] int32
    n_tokens = num_image_tokens(grid_thw)               # P / 4 <|image_pad|> tokens

Equal to transformers' `Qwen2VLImageProcessorPil` (docs/method.md §7.3), checked in
tests/test_image.py. How that processor computes, and how we reproduce it bit for bit:
  1. PIL bicubic resize of the *uint8* RGB image to `smart_resize(h, w)` (the image is
     never resized as floats), so `resize` below hands PIL the same uint8 image.
  2. rescale: float64(uint8) · rescale_factor, cast to float32; normalise in float32:
     (x − mean) / std. Both depend only on (channel, uint8 value), so we precompute the
     256 float32 results per channel with the same operations and gather them (a LUT):
     identical bits, and no float work over the image.
  3. patchify: rows ordered merge-block-major (each 2×2 block of 14×14 patches is 4
     consecutive rows, blocks in raster order); inside a row the features are
     (C, T, 14, 14), the single image duplicated to T = temporal_patch_size frames.

Shape letters: P patches (= grid_h·grid_w), F features (= C·T·patch²), H/W pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # Qwen2-VL rejects images longer than 200× their width (or vice versa)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file (or source) and the problem."""


# ----------------------------------------------------------------------------- loading
def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image) and getattr(src, "filename", ""):
        return src.filename
    if isinstance(src, dict) and src.get("path") is not None:
        return f"{src['path']}" + (" (bytes)" if src.get("bytes") is not None else "")
    return f"<{type(src).__name__}>"


def _to_rgb(img: Image.Image, composite_alpha: bool) -> Image.Image:
    if composite_alpha and ("A" in img.getbands() or img.info.get("transparency") is not None):
        # What transformers' processor does with an RGBA input: alpha over white.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(src: Any, *, composite_alpha: bool = False, name: str | None = None) -> Image.Image:
    """Decodes an image fully and returns it as an RGB PIL image.

    `src`: a path (str / PathLike), encoded bytes, an HF `datasets` Image dict
    `{"bytes": ..., "path": ...}` (bytes win when both are set), a PIL image, or a uint8
    array [H, W] / [H, W, 3|4]. Alpha is dropped by default (`convert("RGB")`, as PR1's
    data loader and qwen_vl_utils do); `composite_alpha=True` blends it over white as
    transformers' processor does when handed an RGBA image.

    Raises `ImageError` naming the source (`name`, else the path or '<N bytes>') for a
    missing file, a file that is not an image, a truncated or otherwise undecodable image
    (truncation goes unnoticed if some library set PIL's `ImageFile.LOAD_TRUNCATED_IMAGES`).
    """
    name = name or _describe(src)
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            if src.dtype != np.uint8 or src.ndim not in (2, 3):
                raise ImageError(f"{name}: expected a uint8 array [H, W] or [H, W, C], got "
                                 f"{src.dtype} {src.shape}")
            img = Image.fromarray(src)
        elif isinstance(src, dict):
            data, path = src.get("bytes"), src.get("path")
            if data is not None:
                return load_image(bytes(data), composite_alpha=composite_alpha,
                                  name=None if path is None else name)
            if path is None:
                raise ImageError(f"image dict has neither 'bytes' nor 'path': keys {sorted(src)}")
            return load_image(path, composite_alpha=composite_alpha)
        elif isinstance(src, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(src)))
        elif isinstance(src, (str, os.PathLike)):
            path = Path(src)
            if not path.exists():
                raise ImageError(f"{name}: image file not found")
            if not path.is_file():
                raise ImageError(f"{name}: not a file")
            img = Image.open(path)
        else:
            raise ImageError(f"cannot load an image from {type(src).__name__}")
        img.load()  # full decode now, so that truncation is caught here, not later
        return _to_rgb(img, composite_alpha)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image file (PIL cannot identify its format)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise ImageError(f"{name}: truncated image file ({e})") from e
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- sizes
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280, *, qwen_vl_utils: bool = False) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the pixel count in bounds.

    Default: transformers' rule (`Qwen2VLImageProcessorPil`, transformers 5.x):
      h̄ = round(h/f)·f (Python's round: halves to even), w̄ likewise;
      if h̄·w̄ > max:  β = √(h·w/max), h̄ = max(f, ⌊h/β/f⌋·f), w̄ likewise;
      elif h̄·w̄ < min: β = √(min/(h·w)), h̄ = ⌈h·β/f⌉·f, w̄ likewise.
    A side under f/2 rounds to 0, so the image then goes through the min branch.
    `qwen_vl_utils=True`: qwen_vl_utils' rule that PR1's data loader applies before the
    processor (§7.3): h̄ = max(f, round(h/f)·f) and no max(f, ·) in the max branch. Both
    agree except for sides below f/2 (tiny images) or extreme aspect ratios.
    Aspect ratios above 200 raise `ImageError`.

    Example: 644×476 (h×w) with the defaults → (644, 476) → 46×34 patches → 391 tokens.
    """
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ImageError(f"image size {width}x{height} (w x h) is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"aspect ratio {ratio:.4g} of a {width}x{height} (w x h) image exceeds "
                         f"{MAX_ASPECT_RATIO}, the limit of Qwen2-VL's smart_resize")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if qwen_vl_utils:
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
        if not qwen_vl_utils:
            h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise ImageError(f"a {width}x{height} (w x h) image resizes to an empty {w_bar}x{h_bar}")
    return h_bar, w_bar


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Qwen2-VL image processor settings (defaults = transformers' Qwen2VLImageProcessor).

    Real Qwen2-VL / Qwen2.5-VL checkpoints ship min_pixels 3136 and max_pixels 12,845,056;
    PR1 trains with max_pixels 1,000,000 (pass it as an override of `from_pretrained`).
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC  # PIL filter id (3)
    qwen_vl_utils_resize: bool = False  # smart_resize(qwen_vl_utils=...) — see there

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean/image_std need 3 values, got {self.image_mean}, {self.image_std}")

    @property
    def factor(self) -> int:
        """Sides are multiples of this: patch_size · merge_size (28)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Features per patch row: 3 · temporal_patch_size · patch_size² (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, **overrides) -> "ImageProcessorConfig":
        """Reads `model_dir/preprocessor_config.json`; `overrides` replace fields.

        Pixel limits: top-level `min_pixels`/`max_pixels` (real Qwen checkpoints) win over
        the `size` dict (`shortest_edge` = min_pixels, `longest_edge` = max_pixels, as
        transformers 5 writes it; older files put min_pixels/max_pixels inside `size`).
        """
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no preprocessor_config.json in the model directory "
                                    f"(expected a Qwen2-VL checkpoint directory)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag) is False:
                raise ValueError(f"{path}: {flag}=false is not supported (pr1_jax implements "
                                 f"Qwen2-VL's standard pipeline only)")
        size = d.get("size") or {}
        kw: dict[str, Any] = {}
        for field, size_keys in (("min_pixels", ("shortest_edge", "min_pixels")),
                                 ("max_pixels", ("longest_edge", "max_pixels"))):
            value = d.get(field)
            for key in size_keys:
                if value is None and isinstance(size, dict):
                    value = size.get(key)
            if value is not None:
                kw[field] = int(value)
        for field in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if d.get(field) is not None:
                kw[field] = int(d[field])
        for field in ("image_mean", "image_std"):
            if d.get(field) is not None:
                kw[field] = tuple(d[field])
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(d["rescale_factor"])
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------- pixels
def resize(image: Any, cfg: ImageProcessorConfig) -> Image.Image:
    """The RGB image resized (PIL, `cfg.resample` = bicubic, on uint8) to its smart_resize size.

    Accepts anything `load_image` does; a size error names the source.
    """
    name = _describe(image)
    img = load_image(image)  # a loaded RGB PIL image comes back as is
    try:
        h, w = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels,
                            qwen_vl_utils=cfg.qwen_vl_utils_resize)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), resample=cfg.resample)


@functools.lru_cache(maxsize=16)
def _value_table(mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float) -> np.ndarray:
    """[C·256] float32: normalised value of uint8 v in channel c at [c·256 + v].

    Same operations and dtypes as transformers: float64 rescale cast to float32, then
    (x − mean) / std in float32.
    """
    x = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean32 = np.asarray(mean, np.float32)[:, None]
    std32 = np.asarray(std, np.float32)[:, None]
    table = ((x[None, :] - mean32) / std32).astype(np.float32)
    table.setflags(write=False)
    return table.reshape(-1)


def patchify(rgb_hwc: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] (sides multiples of cfg.factor) → (pixels [P, F] float32, grid_thw [3] int32)."""
    if rgb_hwc.dtype != np.uint8 or rgb_hwc.ndim != 3 or rgb_hwc.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb_hwc.dtype} {rgb_hwc.shape}")
    height, width, chans = rgb_hwc.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"image {height}x{width} (h x w) is not a multiple of {p * m} per side")
    gh, gw = height // p, width // p
    # [gh/m, m, p, gw/m, m, p, C] → [gh/m, gw/m, m(h), m(w), C, p(h), p(w)]: merge-block-major.
    blocks = rgb_hwc.reshape(gh // m, m, p, gw // m, m, p, chans).transpose(0, 3, 1, 4, 6, 2, 5)
    index = blocks.reshape(gh * gw, chans, p * p).astype(np.intp)  # one copy, in output order
    index += (np.arange(chans, dtype=np.intp) * 256)[None, :, None]
    values = _value_table(cfg.image_mean, cfg.image_std, cfg.rescale_factor)[index]  # [P, C, p²]
    pixels = np.empty((gh * gw, chans, t, p * p), np.float32)
    pixels[...] = values[:, :, None, :]  # the single frame repeated over T
    return pixels.reshape(gh * gw, chans * t * p * p), np.array([1, gh, gw], np.int32)


def preprocess(image: Any, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """One image → (pixels [P, C·T·14·14 = 1176] float32, grid_thw [3] int32 = (1, H/14, W/14)).

    `image`: anything `load_image` accepts. P = grid_h·grid_w patch rows in merge-block-major
    order, equal (bit for bit) to `Qwen2VLImageProcessorPil(min_pixels, max_pixels)`'s
    `pixel_values` and `image_grid_thw[0]`.
    """
    return patchify(np.asarray(resize(image, cfg), dtype=np.uint8), cfg)


def num_image_tokens(grid_thw: Sequence[int] | np.ndarray, merge_size: int = 2) -> int | np.ndarray:
    """LLM tokens of an image: t·h·w / merge_size² (an int; an int array for grids [N, 3])."""
    g = np.asarray(grid_thw, dtype=np.int64)
    n = g[..., 0] * g[..., 1] * g[..., 2] // (merge_size * merge_size)
    return int(n) if g.ndim == 1 else n.astype(np.int64)
