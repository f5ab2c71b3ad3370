"""Shared test inputs: a mixed batch built from a tiny checkpoint, with transformers'
own image processor and tokenizer as the reference preprocessing."""

import numpy as np
from PIL import Image


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def mixed_batch(model_dir, cfg, sizes=((60, 90), (120, 50), (40, 40))):
    """Rows: image A + text, image B + text, text only, a short left-padded row with image C.

    Returns (token_rows, images [(pixels, grid)], hf_pixel_values, hf_grid_thw).
    """
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    out = proc(images=random_images(sizes), return_tensors="np")
    pv, thw = out["pixel_values"], out["image_grid_thw"]

    def render(n_img, text):
        content = [{"type": "image"}] * n_img + [{"type": "text", "text": text}]
        return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)

    texts = [render(1, "Output the bounding box of the red circle in the image."),
             render(1, "Output all the bounding boxes of the cat"),
             render(0, "A text-only row, somewhat longer than the others, to check text positions."),
             render(1, "OCR")]
    image_of_row = [0, 1, None, 2]
    rows = []
    for text, img in zip(texts, image_of_row):
        ids = np.asarray(tok(text)["input_ids"], np.int32)
        if img is not None:
            n = int(np.prod(thw[img])) // 4
            at = int(np.where(ids == cfg.image_token_id)[0][0])
            ids = np.concatenate([ids[:at], np.full(n, cfg.image_token_id, np.int32), ids[at + 1:]])
        rows.append(ids)
    starts = np.concatenate([[0], np.cumsum(np.prod(thw, axis=1))])
    images = [(pv[starts[i]:starts[i + 1]], tuple(thw[i])) for i in range(len(thw))]
    return rows, images, pv, thw
