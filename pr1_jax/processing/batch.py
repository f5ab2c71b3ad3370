"""Host-side batch building (NumPy, vectorised): left padding, packed images, M-RoPE ids.

    inputs = build_inputs(token_rows, images, special)      # -> ModelInputs of np arrays

`token_rows[b]` holds the prompt ids with `<|image_pad|>` already expanded
(`processing.chat.encode_prompt`); `images` lists (pixels [P, F], grid_thw) in the
order their image tokens appear, row by row. Shapes are padded to buckets so that
batches of one bucket reuse one compiled program.

Shape letters: B rows, T tokens, R packed image rows, N patches per row, F features.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pr1_jax.structs import ModelInputs

Image = tuple[np.ndarray, Sequence[int]]  # (pixels [P, F], grid_thw (t, h, w))


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two ≥ max(n, minimum): a small, fixed set of shapes."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def patch_positions(grid_thw: Sequence[int], merge: int = 2) -> np.ndarray:
    """(row, column) of every patch in the processor's merge-block-major order: [t·h·w, 2]."""
    t, h, w = (int(x) for x in grid_thw)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocked = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
    hw = np.stack([blocked(rows), blocked(cols)], axis=-1)
    return np.tile(hw, (t, 1)).astype(np.int32)


@dataclasses.dataclass
class PackedImages:
    pixels: np.ndarray  # [R, N, F] float32
    segment_ids: np.ndarray  # [R, N] int32, -1 = padding
    pos_hw: np.ndarray  # [R, N, 2] int32
    token_offset: np.ndarray  # [num_images] int32: first merged-token row of each image
    image_patches: np.ndarray  # [R, J, L] int32: where in its row each patch of the row's j-th image sits, -1 after


def first_fit(sizes: Sequence[int], row_len: int) -> list[int]:
    """The packed row of each image: the first row with room, in the images' order."""
    fill: list[int] = []
    rows = []
    for n in sizes:
        row = next((r for r, used in enumerate(fill) if used + n <= row_len), None)
        if row is None:
            row, _ = len(fill), fill.append(0)
        fill[row] += n
        rows.append(row)
    return rows


def pack_images(images: Sequence[Image], *, row_len: int | None = None, num_rows: int | None = None,
                merge: int = 2, patch_dim: int | None = None, row_of: Sequence[int] | None = None,
                image_len: int | None = None, images_per_row: int | None = None) -> PackedImages:
    """Packs images into rows of `row_len` patches (each image whole, in one row), back to back.

    `row_of`: the row of each image (default `first_fit`). Images keep their patch order;
    every image starts at a multiple of merge² patches so that the merger's 2×2 groups never
    straddle two images. `patch_dim`: features per patch (default: the first image's, else
    Qwen2-VL's 1176 = 3·2·14²; Qwen3-VL's are 3·2·16² = 1536). The attention table
    `image_patches` [R, J, L] lists each row's images (J slots, default the most a row holds)
    by their patches (L ≥ the largest image, default `row_len`): the vision tower attends
    within each image through it, so its cost follows the images, not the row.
    """
    unit = merge * merge
    if patch_dim is None:
        patch_dim = int(np.shape(images[0][0])[-1]) if images else 1176
    sizes = [int(np.prod(g)) for _, g in images]
    for (pix, g), n in zip(images, sizes):
        if pix.shape != (n, patch_dim) or n % unit:
            raise ValueError(f"image with grid {tuple(g)} has pixel rows {pix.shape}, expected ({n}, {patch_dim})")
    row_len = row_len or bucket(max(sizes, default=unit), minimum=64)
    if sizes and max(sizes) > row_len:
        raise ValueError(f"an image has {max(sizes)} patches, more than the packed row length {row_len}")
    rows = list(first_fit(sizes, row_len) if row_of is None else row_of)
    if len(rows) != len(sizes):
        raise ValueError(f"row_of names {len(rows)} rows for {len(sizes)} images")
    used = max(rows, default=-1) + 1
    num_rows = num_rows or bucket(used, minimum=1)
    if used > num_rows:
        raise ValueError(f"{len(images)} images need {used} packed rows, more than num_rows={num_rows}")
    per_row = np.bincount(np.asarray(rows, np.int64), minlength=num_rows) if rows else np.zeros(num_rows, np.int64)
    images_per_row = images_per_row or max(1, int(per_row.max(initial=0)))
    image_len = image_len or row_len
    if per_row.max(initial=0) > images_per_row or max(sizes, default=0) > image_len:
        raise ValueError(f"a row holds {per_row.max()} images / an image has {max(sizes)} patches, more than "
                         f"images_per_row={images_per_row} / image_len={image_len}")
    pixels = np.zeros((num_rows, row_len, patch_dim), np.float32)
    segment = np.full((num_rows, row_len), -1, np.int32)
    pos_hw = np.zeros((num_rows, row_len, 2), np.int32)
    table = np.full((num_rows, images_per_row, image_len), -1, np.int32)
    offsets = np.zeros(len(images), np.int32)
    fill, slot = np.zeros(num_rows, np.int64), np.zeros(num_rows, np.int64)
    for i, ((pix, g), n, row) in enumerate(zip(images, sizes, rows)):
        start = int(fill[row])
        if start + n > row_len:
            raise ValueError(f"the images given to packed row {row} have more than row_len={row_len} patches")
        pixels[row, start:start + n] = pix
        segment[row, start:start + n] = i
        pos_hw[row, start:start + n] = patch_positions(g, merge)
        table[row, slot[row], :n] = start + np.arange(n)
        offsets[i] = (row * row_len + start) // unit
        fill[row] += n
        slot[row] += 1
    return PackedImages(pixels, segment, pos_hw, offsets, table)


def image_token_tables(grids: Sequence[Sequence[int]], token_offset: np.ndarray, merge: int = 2):
    """Per image token, in order: (i, j) in the merged grid, position advance, feature row.

    The advance is max(H', W') on the last token of an image and 0 elsewhere, so that the
    text after an image continues at s + max(H', W') (HF `get_rope_index`).
    """
    ij, adv, rows = [], [], []
    for (t, h, w), off in zip(grids, token_offset):
        hh, ww = int(h) // merge, int(w) // merge
        n = int(t) * hh * ww
        ii, jj = np.meshgrid(np.arange(hh), np.arange(ww), indexing="ij")
        ij.append(np.tile(np.stack([ii.ravel(), jj.ravel()], -1), (int(t), 1)))
        a = np.zeros(n, np.int64)
        a[-1] = max(hh, ww)
        adv.append(a)
        rows.append(off + np.arange(n))
    if not grids:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ij), np.concatenate(adv), np.concatenate(rows)


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, grids: Sequence[Sequence[int]],
                    image_token_id: int, merge: int = 2, token_offset: np.ndarray | None = None):
    """M-RoPE position ids [3, B, T], rope deltas [B] and vision_index [B, T], vectorised.

    Text tokens get t=h=w=running index; image token (i, j) of an image starting at s
    gets (s, s+i, s+j); padding gets 1 (as HF). rope delta = max position + 1 − number of
    valid tokens (transformers 5's convention): the next token's position is max + 1.
    """
    b, t = input_ids.shape
    valid = attention_mask.astype(bool)
    is_image = (input_ids == image_token_id) & valid
    if token_offset is None:
        sizes = [int(np.prod(g)) // (merge * merge) for g in grids]
        token_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0)
    ij, adv, feat_rows = image_token_tables(grids, token_offset, merge)
    if len(adv) != int(is_image.sum()):
        raise ValueError(f"the batch has {int(is_image.sum())} image tokens but its images give {len(adv)}")
    flat = is_image.ravel()
    advance = np.where(valid, 1, 0).ravel().astype(np.int64)
    advance[flat] = adv
    i_img = np.zeros(b * t, np.int64)
    j_img = np.zeros(b * t, np.int64)
    i_img[flat], j_img[flat] = ij[:, 0], ij[:, 1]
    advance = advance.reshape(b, t)
    base = np.cumsum(advance, axis=1) - advance  # exclusive running position
    pos = np.stack([base, base + i_img.reshape(b, t), base + j_img.reshape(b, t)])
    pos = np.where(valid[None], pos, 1)
    deltas = np.where(valid[None], pos, 0).max(axis=(0, 2)) + 1 - valid.sum(axis=1)
    vision_index = np.zeros(b * t, np.int64)
    vision_index[flat] = feat_rows
    return pos.astype(np.int32), deltas.astype(np.int32), vision_index.reshape(b, t).astype(np.int32)


def left_pad(token_rows: Sequence[np.ndarray], pad_id: int, length: int | None = None):
    """Left-pads rows to `length` (default: the bucket of the longest). Returns ids, mask."""
    longest = max(len(r) for r in token_rows)
    length = length or bucket(longest)
    if longest > length:
        raise ValueError(f"a row has {longest} tokens, more than the padded length {length}")
    ids = np.full((len(token_rows), length), pad_id, np.int32)
    mask = np.zeros((len(token_rows), length), bool)
    for i, r in enumerate(token_rows):
        if len(r):
            ids[i, -len(r):] = r
            mask[i, -len(r):] = True
    return ids, mask


def build_inputs(token_rows: Sequence[np.ndarray], images: Sequence[Image], *, image_token_id: int,
                 pad_id: int, seq_len: int | None = None, row_len: int | None = None,
                 num_rows: int | None = None, merge: int = 2, patch_dim: int | None = None,
                 row_of: Sequence[int] | None = None, image_len: int | None = None,
                 images_per_row: int | None = None) -> ModelInputs:
    """Everything the model's forward pass needs, as NumPy arrays (see `ModelInputs`).
    `patch_dim`: features per patch (default: the images' own, else Qwen2-VL's 1176); the
    packing arguments as `pack_images`."""
    ids, mask = left_pad(token_rows, pad_id, seq_len)
    packed = pack_images(images, row_len=row_len, num_rows=num_rows, merge=merge, patch_dim=patch_dim,
                         row_of=row_of, image_len=image_len, images_per_row=images_per_row)
    grids = [g for _, g in images]
    positions, _, vision_index = mrope_positions(ids, mask, grids, image_token_id, merge, packed.token_offset)
    return ModelInputs(input_ids=ids, attention_mask=mask, positions=positions, pixels=packed.pixels,
                       segment_ids=packed.segment_ids, pos_hw=packed.pos_hw, vision_index=vision_index,
                       image_patches=packed.image_patches)
