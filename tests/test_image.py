"""pr1_jax.processing.image against transformers' Qwen2VLImageProcessorPil (the reference)."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pr1_jax.processing import image as pim

# min/max pixel settings: transformers' default, PR1 training, the tiny checkpoint's,
# one that forces upscaling of most images, real Qwen2-VL checkpoints'.
PIXEL_LIMITS = [(56 * 56, 28 * 28 * 1280), (3136, 1_000_000), (3136, 28 * 28 * 64),
                (200_000, 1_003_520), (3136, 12_845_056)]

# (height, width): tiny, odd, square, very wide / tall (ratio up to exactly 200), large.
SIZES = [(1, 1), (3, 5), (13, 13), (14, 14), (27, 29), (28, 28), (41, 7), (10, 1999), (4, 800),
         (1500, 9), (800, 4), (333, 517), (641, 479), (1001, 999), (480, 640), (97, 1203),
         (1203, 97), (56, 56), (55, 57), (250, 251), (1200, 1700), (719, 1281), (2, 300)]


def _textured(h, w, seed):
    """Noise on a smooth gradient: bicubic resizing then mixes real structure and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * 255 // max(h - 1, 1)), (xx * 255 // max(w - 1, 1)),
                     ((yy + xx) * 127 // max(h + w - 2, 1))], axis=-1)
    noise = rng.integers(-40, 41, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import Qwen2VLImageProcessorPil

    cache = {}

    def get(min_pixels, max_pixels):
        key = (min_pixels, max_pixels)
        if key not in cache:
            cache[key] = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
        return cache[key]
    return get


def _assert_same_as_hf(hf_processor, img, min_pixels, max_pixels, hf_input=None):
    out = hf_processor(min_pixels, max_pixels)(images=[img if hf_input is None else hf_input], return_tensors="np")
    cfg = pim.ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    pixels, grid = pim.preprocess(img, cfg)
    assert pixels.dtype == np.float32 and grid.dtype == np.int32
    np.testing.assert_array_equal(grid, out["image_grid_thw"][0])
    assert pixels.shape == out["pixel_values"].shape == (int(np.prod(grid)), 1176)
    np.testing.assert_allclose(pixels, out["pixel_values"], rtol=0, atol=1e-5)
    assert pim.num_image_tokens(grid) * 4 == pixels.shape[0]
    return pixels, grid


@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_LIMITS)
def test_random_images_match_transformers(hf_processor, min_pixels, max_pixels):
    for k, (h, w) in enumerate(SIZES):
        _assert_same_as_hf(hf_processor, _textured(h, w, seed=k), min_pixels, max_pixels)


def test_resize_rule_matches_transformers_on_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    heights = list(range(1, 90)) + rng.integers(1, 6000, 150).tolist()
    widths = list(range(1, 60, 3)) + rng.integers(1, 6000, 25).tolist()
    for min_pixels, max_pixels in PIXEL_LIMITS:
        for h in heights:
            for w in widths:
                try:
                    expected = hf_smart_resize(h, w, 28, min_pixels, max_pixels)
                except ValueError:
                    expected = "error"
                try:
                    got = pim.smart_resize(h, w, 28, min_pixels, max_pixels)
                except ValueError:
                    got = "error"
                assert got == expected, (h, w, min_pixels, max_pixels)


def test_qwen_vl_utils_rule_differs_only_for_tiny_sides():
    # qwen_vl_utils rounds a 10 px side up to 28 and stays in range; transformers rounds it to 0
    # and goes through the min-pixels branch.
    assert pim.smart_resize(10, 1000, 28, 3136, 1_000_000, qwen_vl_utils=True) == (28, 1008)
    assert pim.smart_resize(10, 1000, 28, 3136, 1_000_000) == (28, 560)
    for h, w in [(480, 640), (333, 517), (1200, 1700), (30, 30), (1, 1)]:
        assert pim.smart_resize(h, w, 28, 3136, 1_000_000, qwen_vl_utils=True) == \
            pim.smart_resize(h, w, 28, 3136, 1_000_000)
    cfg = pim.ImageProcessorConfig(max_pixels=1_000_000, qwen_vl_utils_resize=True)
    assert pim.preprocess(_textured(10, 1000, 0), cfg)[1].tolist() == [1, 2, 72]


def test_pr1_resize_then_processor_is_stable(hf_processor):
    # PR1 resizes with smart_resize first, then the processor (same limits) must not resize again.
    img = _textured(613, 911, 3)
    cfg = pim.ImageProcessorConfig(max_pixels=1_000_000)
    resized = pim.resize(img, cfg)
    assert resized.size[0] % 28 == 0 and resized.size[1] % 28 == 0
    assert pim.resize(resized, cfg) is resized
    a, ga = pim.preprocess(img, cfg)
    b, gb = _assert_same_as_hf(hf_processor, resized, 3136, 1_000_000)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ga, gb)


def _sample_data(name):
    import matplotlib  # a requirement; it ships these real images

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", name)
    assert os.path.exists(path), f"matplotlib no longer ships {name}"
    return path


@pytest.mark.parametrize("name", ["grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png"])
def test_real_images_match_transformers(hf_processor, name):
    path = _sample_data(name)
    for min_pixels, max_pixels in PIXEL_LIMITS[:4]:
        # Default (PR1 / qwen_vl_utils): alpha dropped by convert("RGB") before the processor.
        rgb = pim.load_image(path)
        assert rgb.mode == "RGB"
        _assert_same_as_hf(hf_processor, path, min_pixels, max_pixels, hf_input=rgb)
        # composite_alpha=True: what transformers does when handed the file's own (RGBA) image.
        with Image.open(path) as raw:
            raw.load()
            composited = pim.load_image(path, composite_alpha=True)
            _assert_same_as_hf(hf_processor, composited, min_pixels, max_pixels, hf_input=raw)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA"])
def test_other_modes_load_as_rgb(hf_processor, tmp_path, mode):
    img = _textured(90, 130, 7).convert(mode)
    path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(path)
    rgb = pim.load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (130, 90)
    _assert_same_as_hf(hf_processor, path, 3136, 1_003_520, hf_input=Image.open(path).convert("RGB"))


def test_sources_agree(tmp_path):
    img = _textured(70, 110, 1)
    path = tmp_path / "a.png"
    img.save(path)
    data = path.read_bytes()
    expected = np.asarray(img)
    for src in (str(path), path, data, bytearray(data), {"bytes": data, "path": "a.png"},
                {"bytes": None, "path": str(path)}, img, np.asarray(img)):
        np.testing.assert_array_equal(np.asarray(pim.load_image(src)), expected)


def test_patch_rows_are_merge_block_major():
    # Each 14×14 patch filled with a value coding its (row, col); rows must come in 2×2 blocks.
    gh, gw = 6, 8
    code = np.arange(gh * gw, dtype=np.uint8).reshape(gh, gw)
    img = np.repeat(np.repeat(code, 14, 0), 14, 1)
    rgb = np.stack([img, img, img], axis=-1)
    cfg = pim.ImageProcessorConfig()
    pixels, grid = pim.patchify(rgb, cfg)
    assert grid.tolist() == [1, gh, gw]
    table = pim._value_table(cfg.image_mean, cfg.image_std, cfg.rescale_factor)
    got = np.searchsorted(table[:256], pixels[:, 0])  # channel 0 is increasing in the value
    expected = [code[bh * 2 + i, bw * 2 + j] for bh in range(gh // 2) for bw in range(gw // 2)
                for i in range(2) for j in range(2)]
    np.testing.assert_array_equal(got, expected)
    # Feature layout (C, T, 14, 14): both frames equal; channel c at [c·392, (c+1)·392).
    rows = pixels.reshape(-1, 3, 2, 196)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])
    np.testing.assert_array_equal(rows[:, 1, 0, 0], table[256 + np.asarray(expected, dtype=np.int64)])


# ----------------------------------------------------------------------------- config
def test_config_from_tiny_checkpoint_size_dict(tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    # What tiny.write_tiny_checkpoint writes (size dict, transformers 5), without the model.
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=28 * 28 * 64).save_pretrained(tmp_path)
    assert "size" in json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg = pim.ImageProcessorConfig.from_pretrained(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 28 * 28 * 64)
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size, cfg.factor, cfg.patch_dim) == (14, 2, 2, 28, 1176)
    assert cfg.image_mean == pim.OPENAI_CLIP_MEAN and cfg.image_std == pim.OPENAI_CLIP_STD
    assert pim.ImageProcessorConfig.from_pretrained(tmp_path, max_pixels=1_000_000).max_pixels == 1_000_000


def test_config_from_tiny_dir_fixture(tiny_dir):
    cfg = pim.ImageProcessorConfig.from_pretrained(tiny_dir)
    assert (cfg.min_pixels, cfg.max_pixels) == (56 * 56, 28 * 28 * 64)


def test_config_real_style_keys(tmp_path):
    # As in Qwen/Qwen2-VL-2B-Instruct's preprocessor_config.json.
    real = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": list(pim.OPENAI_CLIP_MEAN), "image_std": list(pim.OPENAI_CLIP_STD),
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(real))
    cfg = pim.ImageProcessorConfig.from_pretrained(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.rescale_factor) == (3136, 12845056, 1 / 255)
    # Top-level keys win over a stale size dict (as in transformers' constructor).
    real["size"] = {"shortest_edge": 1, "longest_edge": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(real))
    assert pim.ImageProcessorConfig.from_pretrained(tmp_path).max_pixels == 12845056


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        pim.ImageProcessorConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        pim.ImageProcessorConfig(min_pixels=10, max_pixels=5)


# ----------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(pim.ImageError, match=r"nope\.jpg: image file not found"):
        pim.load_image(tmp_path / "nope.jpg")
    with pytest.raises(pim.ImageError, match="nope.jpg: image file not found"):
        pim.preprocess(str(tmp_path / "nope.jpg"), pim.ImageProcessorConfig())


def test_truncated_file(tmp_path):
    for ext in ("jpg", "png"):
        buf = io.BytesIO()
        _textured(200, 300, 2).save(buf, format="JPEG" if ext == "jpg" else "PNG")
        path = tmp_path / f"cut.{ext}"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(pim.ImageError, match=rf"cut\.{ext}: truncated image file"):
            pim.load_image(path)
        with pytest.raises(pim.ImageError, match="truncated image file"):
            pim.load_image({"bytes": path.read_bytes(), "path": "cut.img"})


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("definitely not pixels\n" * 10)
    with pytest.raises(pim.ImageError, match=r"notes\.txt: not an image file"):
        pim.load_image(path)
    with pytest.raises(pim.ImageError, match=r"<6 bytes>: not an image file"):
        pim.load_image(b"\x00\x01garb")
    with pytest.raises(pim.ImageError, match="not a file"):
        pim.load_image(tmp_path)


def test_aspect_ratio_over_200(tmp_path):
    with pytest.raises(pim.ImageError, match=r"aspect ratio 200\.5 .* exceeds 200"):
        pim.smart_resize(2, 401)
    path = tmp_path / "strip.png"
    Image.new("RGB", (1000, 3)).save(path)
    with pytest.raises(pim.ImageError, match=r"strip\.png: aspect ratio 333\.3"):
        pim.preprocess(path, pim.ImageProcessorConfig())
    assert pim.smart_resize(4, 800) == (28, 812)  # exactly 200 is allowed
