"""viz: box pixels have the box colour, the gallery has the promised size, curves are written."""

import numpy as np
from PIL import Image

from pr1_jax import viz


def test_qwen_norm_to_pixels():
    np.testing.assert_allclose(viz.qwen_norm_to_pixels([[0, 500, 1000, 250]], 640, 480), [[0, 240, 640, 120]])


def test_draw_boxes_edges_have_colour(tmp_path):
    base = np.full((100, 120, 3), 30, np.uint8)
    img = viz.draw_boxes(base, [[10, 20, 60, 80]], labels=None, color=(255, 0, 0), width=2,
                         out_path=tmp_path / "a.png")
    a = np.asarray(img)
    for x, y in [(10, 50), (11, 50), (60, 50), (59, 50), (35, 20), (35, 80), (10, 20), (60, 80)]:
        assert tuple(a[y, x]) == (255, 0, 0), (x, y)
    assert tuple(a[50, 35]) == (30, 30, 30)  # inside untouched
    assert tuple(a[50, 5]) == (30, 30, 30)  # outside untouched
    assert (base == 30).all()  # the caller's array is not drawn on
    assert Image.open(tmp_path / "a.png").size == (120, 100)
    labelled = np.asarray(viz.draw_boxes(base, [[10, 40, 60, 80]], labels=["dog"], color=(0, 0, 255)))
    assert (labelled[28:40, 10:30] == (0, 0, 255)).all(axis=-1).any()  # the label tag above the box


def test_gallery_size_and_colours(tmp_path):
    items = [{"image": np.zeros((200, 100, 3), np.uint8), "pred": [[0, 0, 50, 50]], "gt": [[50, 100, 99, 199]],
              "caption": f"sample {k}"} for k in range(5)]
    out = tmp_path / "g.png"
    img = viz.gallery(items, out, cols=3, cell=128, caption_height=20)
    saved = Image.open(out)
    assert saved.size == img.size == (3 * 128, 2 * (128 + 20))
    a = np.asarray(saved.convert("RGB"))
    # cell 0: image scaled by 128/200 → 64 x 128, centred at x offset 32; GT at (32+32, 64..127)
    assert tuple(a[100, 32 + 33]) == viz.GT_COLOR
    assert tuple(a[10, 32]) == viz.PRED_COLOR
    assert (a[128 + 5:128 + 18, 0:60] < 128).any()  # caption text under the first cell
    assert viz.gallery(items[:2], None, cols=4, cell=64).size == (2 * 64, 64 + 24)


def test_plot_curves(tmp_path):
    out = tmp_path / "c.png"
    viz.plot_curves({"reward": np.linspace(0, 1, 50) + np.random.default_rng(0).normal(0, 0.05, 50),
                     "acc@0.5": ([0, 25, 49], [0.2, 0.5, 0.7])}, out, "grounding", smooth=5)
    img = Image.open(out)
    assert img.size == (700, 400) and img.format == "PNG"
