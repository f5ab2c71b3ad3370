"""pr1_jax.processing.chat against transformers' tokenizer running Qwen2-VL's jinja chat template."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from pr1_jax import tiny
from pr1_jax.processing import chat


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny.write_tokenizer(tmp_path_factory.mktemp("qwen2vl_tokenizer"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return chat.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def special(tok_dir, tok):
    return chat.SpecialTokens.from_pretrained(tok_dir, tok)


def _conversations():
    """Prompts of all four PR1 tasks (train and eval forms) plus harder template cases."""
    q = {"pr1_grounding": "man in the red shirt on the left", "pr1_counting": "birds",
         "pr1_detection": "", "pr1_ocr": ""}
    convs = []
    for task, question in q.items():
        text = chat.question_text(task, question)
        convs.append(chat.pr1_messages(text))  # PR1 training: system with trailing space
        convs.append(chat.pr1_messages(text, system_prompt="qwen"))
        convs.append(chat.eval_messages(chat.question_text(task, question, eval_prompt=True)))
        convs.append(chat.eval_messages(text))  # no system message: template inserts the default
    two_images = [{"role": "user", "content": [
        {"type": "image", "image": "a.jpg"}, {"type": "text", "text": "Compare "},
        {"type": "image_url", "image_url": "b.jpg"}, {"type": "text", "text": " and this one."}]}]
    multi_turn = chat.pr1_messages(chat.question_text("pr1_grounding", "dog")) + [
        {"role": "assistant", "content": "<|object_ref_start|>dog<|object_ref_end|>"
                                         "<|box_start|>(12,40),(500,993)<|box_end|>"},
        {"role": "user", "content": [{"type": "text", "text": "And the cat?  Ünïcødé 猫 \n\n tabs\t."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "(1,2),(3,4)"}]},
        {"role": "user", "content": [{"image": "c.png"}, {"type": "text", "text": "One more."}]}]
    video = [{"role": "system", "content": "Custom system."},
             {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    plain = [{"role": "user", "content": "Just text, no image."}]
    return convs + [two_images, multi_turn, video, plain]


def _hf_render(hf_tok, messages, **kw):
    return hf_tok.apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_render_matches_jinja_template(hf_tok, add_generation_prompt, add_vision_id):
    for messages in _conversations():
        expected = _hf_render(hf_tok, messages, add_generation_prompt=add_generation_prompt,
                              add_vision_id=add_vision_id)
        got = chat.render_chat(messages, add_generation_prompt=add_generation_prompt,
                               add_vision_id=add_vision_id)
        assert got == expected, messages


def test_pr1_training_prompt_text():
    text = chat.render_chat(chat.pr1_messages(chat.question_text("pr1_grounding", "red car")))
    assert text == ("<|im_start|>system\nYou are a helpful assistant. <|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Output the bounding box of the red car in "
                    "the image.<|im_end|>\n<|im_start|>assistant\n")
    assert chat.question_text("pr1_counting", "bird") == "Output all the bounding boxes of the bird"
    assert chat.question_text("pr1_ocr") == "OCR this image."
    assert chat.question_text("pr1_ocr", eval_prompt=True) == "<image>\nOCR this image: "
    det = chat.question_text("pr1_detection")
    assert det.startswith("Please output bbox coordinates and names of person, bicycle, car, ")
    assert det.endswith(", hair drier, toothbrush.")
    assert chat.question_text("pr1_detection", eval_prompt=True).startswith(
        "Locate every item from the category list in the image and output the coordinates in JSON "
        "format. The category set includes person, bicycle,")
    assert len(chat.COCO_CLASS_NAMES) == len(set(chat.COCO_CLASS_NAMES)) == 80
    with pytest.raises(KeyError, match="unknown task"):
        chat.question_text("pr1_segmentation")


def test_token_ids_match_transformers(tok, hf_tok, special):
    """No images: ids = transformers' tokenizer on the template's text."""
    for messages in _conversations():
        n_img = _hf_render(hf_tok, messages, add_generation_prompt=True).count(chat.IMAGE_PAD)
        if n_img:
            continue
        expected = hf_tok(_hf_render(hf_tok, messages, add_generation_prompt=True))["input_ids"]
        got = chat.encode_prompt(tok, messages, [], special)
        assert got.dtype == np.int32 and got.tolist() == expected


def test_image_pads_expand_like_string_expansion(tok, hf_tok, special):
    """Ids with images = transformers' tokenizer on the text with each pad repeated t·h·w/4 times."""
    grids_pool = [(1, 34, 46), (1, 2, 72), (1, 4, 4), (1, 36, 36), (1, 12, 18)]
    for k, messages in enumerate(_conversations()):
        text = _hf_render(hf_tok, messages, add_generation_prompt=True)
        n_img = text.count(chat.IMAGE_PAD)
        grids = [grids_pool[(k + i) % len(grids_pool)] for i in range(n_img)]
        pieces = text.split(chat.IMAGE_PAD)
        expanded = pieces[0] + "".join(chat.IMAGE_PAD * (int(np.prod(g)) // 4) + p
                                       for g, p in zip(grids, pieces[1:]))
        expected = hf_tok(expanded)["input_ids"]
        got = chat.encode_prompt(tok, messages, grids, special)
        assert got.tolist() == expected
        # Same result through transformers' tokenizer object and the batch variant.
        assert chat.encode_prompt(hf_tok, messages, grids, special).tolist() == expected
    convs = _conversations()
    grids_list = [[(1, 4, 6)] * chat.render_chat(c).count(chat.IMAGE_PAD) for c in convs]
    batch = chat.encode_prompts(tok, convs, grids_list, special)
    for ids, c, g in zip(batch, convs, grids_list):
        assert ids.tolist() == chat.encode_prompt(tok, c, g, special).tolist()


def test_known_ids_and_pad_count(tok, special):
    ids = chat.encode_prompt(tok, chat.pr1_messages("OCR this image."), [np.array([1, 34, 46], np.int32)], special)
    assert ids[:9].tolist() == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13]
    assert int((ids == special.image_pad).sum()) == 391  # 476×644 image → 34×46 patches → 391 tokens
    assert ids[-3:].tolist() == [special.im_start, 77091, 198]  # "<|im_start|>assistant\n"


def test_placeholder_count_mismatch(tok, special):
    with pytest.raises(ValueError, match="empty conversation"):
        chat.render_chat([])
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
    with pytest.raises(ValueError, match=r"prompt has 2 <\|image_pad\|> placeholder\(s\) but 1 image grid"):
        chat.encode_prompt(tok, two, [(1, 4, 4)], special)
    with pytest.raises(ValueError, match="has 0"):
        chat.encode_prompt(tok, [{"role": "user", "content": "hi"}], [(1, 4, 4)], special)


def test_decode_matches_transformers(tok, hf_tok, special):
    messages = _conversations()[-3]  # the multi-turn conversation, two images
    ids = chat.encode_prompt(tok, messages, [(1, 4, 4), (1, 2, 6)], special)
    rows = np.stack([ids, np.concatenate([ids[5:], np.full(5, special.pad_id, np.int32)])])
    for skip in (False, True):
        assert chat.decode(tok, ids, skip_special_tokens=skip) == hf_tok.decode(ids.tolist(), skip_special_tokens=skip)
        assert chat.decode_batch(tok, rows, skip_special_tokens=skip) == \
            hf_tok.batch_decode(rows.tolist(), skip_special_tokens=skip)
        assert chat.decode_batch(hf_tok, list(rows), skip_special_tokens=skip) == \
            chat.decode_batch(tok, rows, skip_special_tokens=skip)
    answer = "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(12,40),(500,993)<|box_end|><|im_end|>"
    answer_ids = hf_tok(answer)["input_ids"]
    assert chat.decode(tok, answer_ids) == answer
    assert chat.decode(tok, answer_ids, skip_special_tokens=True) == "dog(12,40),(500,993)"


# ----------------------------------------------------------------------------- special tokens
def test_special_tokens_from_tiny_checkpoint(tiny_dir):
    tok = chat.load_tokenizer(tiny_dir)
    s = chat.SpecialTokens.from_pretrained(tiny_dir, tok)
    assert s.eos_ids == (151645, 151643)  # generation_config.json
    assert s.pad_id == s.endoftext == 151643
    assert (s.im_start, s.im_end, s.object_ref_start, s.object_ref_end, s.box_start, s.box_end) == \
        (151644, 151645, 151646, 151647, 151648, 151649)
    assert (s.vision_start, s.vision_end, s.image_pad, s.video_pad) == (151652, 151653, 151655, 151656)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert s.image_token_id == config["image_token_id"]
    assert chat.SpecialTokens.from_pretrained(tiny_dir) == s  # loads the tokenizer itself


def test_special_tokens_fallbacks_and_checks(tok_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tok_dir, d)
    s = chat.SpecialTokens.from_pretrained(d)  # no generation_config.json: the tokenizer's eos
    assert s.eos_ids == (151645,) and s.pad_id == 151643
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert chat.SpecialTokens.from_pretrained(d).eos_ids == (151643,)
    (d / "config.json").write_text(json.dumps({"image_token_id": 151654}))
    with pytest.raises(ValueError, match="image_token_id=151654"):
        chat.SpecialTokens.from_pretrained(d)


def test_load_tokenizer_errors_and_fallback(tmp_path, tok_dir, tok, special):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        chat.load_tokenizer(tmp_path)
    # Older checkpoints: vocab.json + merges.txt, special tokens in tokenizer_config.json.
    d = tmp_path / "old_style"
    d.mkdir()
    tok.model.save(str(d))
    tok_json = json.loads((tok_dir / "tokenizer.json").read_text())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    keys = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: a[k] for k in keys} for a in tok_json["added_tokens"]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    old = chat.load_tokenizer(d)
    messages = chat.pr1_messages(chat.question_text("pr1_grounding", "café 猫  \n\n x"))
    assert chat.encode_prompt(old, messages, [(1, 4, 4)], special).tolist() == \
        chat.encode_prompt(tok, messages, [(1, 4, 4)], special).tolist()
    assert chat.SpecialTokens.from_pretrained(d, old) == dataclasses.replace(special, eos_ids=(special.im_end,))
