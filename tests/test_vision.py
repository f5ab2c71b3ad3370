"""The vision tower's image table (`pr1_jax/model/vision.py`): attention per image through
[R, J, L] gathers equals the [R, N, N] masks, and packing several images into one row
changes nothing but the layout. Float32, a tiny random Qwen2-VL (no torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from pr1_jax.model import vision
from pr1_jax.model.qwen2_vl import Qwen2VL, init_params
from pr1_jax.processing import batch as pb
from tests import sharding_case as case

SIZES = [(4, 4), (8, 4), (4, 8), (8, 8), (4, 4)]  # (h, w) patch grids: 16–64 patches


@pytest.fixture(scope="module")
def tower():
    cfg = case.model_config()
    params = meta.unbox(init_params(cfg, jax.random.PRNGKey(3)))
    rng = np.random.default_rng(0)
    images = [(rng.standard_normal((h * w, cfg.vision.patch_dim)).astype(np.float32), (1, h, w)) for h, w in SIZES]
    model = Qwen2VL(cfg)

    def features(p, packed: pb.PackedImages, table: bool = True):
        x = [jnp.asarray(a) for a in (packed.pixels, packed.segment_ids, packed.pos_hw)]
        out = model.apply({"params": p}, *x, jnp.asarray(packed.image_patches) if table else None,
                          method=Qwen2VL.encode_images)
        # each image's merged tokens, in image order (token_offset: where its first one sits)
        return jnp.concatenate([out[o:o + h * w // 4] for o, (h, w) in zip(packed.token_offset, SIZES)])

    return params, images, features


def test_image_table_equals_masks(tower):
    """One image per row: attention through the table equals the segment masks."""
    params, images, features = tower
    packed = pb.pack_images(images, row_len=64, num_rows=len(images), row_of=range(len(images)))
    np.testing.assert_allclose(np.asarray(features(params, packed)), np.asarray(features(params, packed, False)),
                               atol=1e-5, rtol=1e-5)


def test_packed_rows_equal_one_image_per_row(tower):
    """Images packed 3 + 2 into two rows of 128 patches: the same features and gradients as one
    image per row of 64 (the attention never sees another image, and row padding is inert)."""
    params, images, features = tower
    one = pb.pack_images(images, row_len=64, num_rows=len(images), row_of=range(len(images)))
    two = pb.pack_images(images, row_len=128, num_rows=2, row_of=[0, 0, 0, 1, 1], image_len=64, images_per_row=3)
    assert two.image_patches.shape == (2, 3, 64) and (two.image_patches[1, 2] == -1).all()
    np.testing.assert_allclose(np.asarray(features(params, two)), np.asarray(features(params, one)),
                               atol=1e-5, rtol=1e-5)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(features(params, one).shape), jnp.float32)
    grad = lambda packed: jax.grad(lambda p: jnp.sum(features(p, packed) * w))(params)  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad(two)), jax.tree.leaves(grad(one))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_per_image_round_trip():
    """`back_to_rows(per_image(x))` is x on every image patch and 0 on the row's padding."""
    packed = pb.pack_images([(np.zeros((n, 4), np.float32), (1, 2, n // 2)) for n in (8, 4, 12)], row_len=32,
                            num_rows=2, row_of=[0, 0, 1], image_len=16, images_per_row=2)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 3)), jnp.float32)
    table = jnp.asarray(packed.image_patches)
    y = vision.back_to_rows(vision.per_image(x, table), table, 32)
    on_image = np.asarray(packed.segment_ids) >= 0
    np.testing.assert_array_equal(np.asarray(y)[on_image], np.asarray(x)[on_image])
    assert (np.asarray(y)[~on_image] == 0).all()


def test_image_moves_have_the_gradients_of_gathers_and_scatters():
    """`per_image` / `back_to_rows` differentiate as gathers both ways (custom VJP, no
    scatter-add); their values and gradients equal autodiff of a plain take / scatter-set."""
    packed = pb.pack_images([(np.zeros((n, 4), np.float32), (1, 2, n // 2)) for n in (8, 4, 12)], row_len=32,
                            num_rows=2, row_of=[0, 0, 1], image_len=16, images_per_row=2)
    table = jnp.asarray(packed.image_patches)
    r, j, size = table.shape
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 32, 3)), jnp.float32)
    w_img = jnp.asarray(rng.standard_normal((r * j, size, 3)), jnp.float32)
    w_row = jnp.asarray(rng.standard_normal((2, 32, 3)), jnp.float32)
    flat = table.reshape(r, j * size)

    def plain_per_image(a):
        y = jax.vmap(lambda row, i: row[jnp.maximum(i, 0)])(a, flat)
        return jnp.where((flat >= 0)[..., None], y, 0).reshape(r * j, size, 3)

    def plain_back(y):
        to = jnp.where(flat >= 0, flat, 32 + jnp.arange(j * size))
        put = lambda t, v: jnp.zeros((32, 3), v.dtype).at[t].set(v, mode="drop")  # noqa: E731
        return jax.vmap(put)(to, y.reshape(r, j * size, 3))

    def losses(move_in, move_out):
        return (lambda a: jnp.sum(move_in(a) * w_img) + jnp.sum(move_out(move_in(a) * w_img) * w_row))

    ours = losses(lambda a: vision.per_image(a, table), lambda y: vision.back_to_rows(y, table, 32))
    plain = losses(plain_per_image, plain_back)
    np.testing.assert_allclose(float(ours(x)), float(plain(x)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(ours)(x)), np.asarray(jax.grad(plain)(x)), rtol=1e-6, atol=1e-6)
    # the only scatters left build the int32 index (once per call); none moves float data
    float_scatters = lambda f: [line for line in jax.jit(jax.grad(f)).lower(x).compile().as_text().splitlines()  # noqa: E731
                                if " scatter(" in line and "= f32[" in line]
    assert not float_scatters(ours) and float_scatters(plain)


def test_pack_images_rejects_a_table_too_small():
    images = [(np.zeros((16, 4), np.float32), (1, 4, 4))] * 3
    with pytest.raises(ValueError, match="images_per_row=2"):
        pb.pack_images(images, row_len=64, num_rows=1, row_of=[0, 0, 0], images_per_row=2)
    with pytest.raises(ValueError, match="more than row_len=32"):
        pb.pack_images(images, row_len=32, num_rows=1, row_of=[0, 0, 0], image_len=16, images_per_row=3)


def _nvidia_gpu() -> bool:
    return jax.default_backend() == "gpu" and "NVIDIA" in jax.devices()[0].device_kind


@pytest.mark.skipif(not _nvidia_gpu(), reason="cuDNN flash attention runs on NVIDIA GPUs only")
def test_cudnn_image_attention_equals_xla():
    """On the GPU: cuDNN with each image's length as its sequence length = the masked einsums
    (bf16 inputs; outputs and the gradients of q, k, v on image patches)."""
    sizes = [(100, 60, 92), (200, 0, 0)]  # patches of each row's images (0: an empty slot)
    table = np.full((2, 3, 256), -1, np.int32)
    for r, row in enumerate(sizes):
        at = 0
        for j, n in enumerate(row):
            table[r, j, :n] = at + np.arange(n)
            at += n
    table = jnp.asarray(table)
    on_image = np.zeros((2, 256), bool)
    on_image[0, :252], on_image[1, :200] = True, True
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal((2, 256, 4, 64)), jnp.bfloat16) for _ in range(4))
    w = w * jnp.asarray(on_image[:, :, None, None], jnp.bfloat16)

    def run(impl):
        f = lambda q, k, v: jnp.sum((vision.image_attention(q, k, v, table, impl) * w).astype(jnp.float32))  # noqa: E731
        out = jax.jit(lambda q, k, v: vision.image_attention(q, k, v, table, impl))(q, k, v)
        return out, jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    (o1, g1), (o2, g2) = run("cudnn"), run("xla")
    f32 = lambda a: np.asarray(a, np.float32)[on_image]  # noqa: E731
    np.testing.assert_allclose(f32(o1), f32(o2), atol=3e-2, rtol=3e-2)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(f32(a), f32(b), atol=6e-2, rtol=6e-2)
