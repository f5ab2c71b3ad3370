"""infer: greedy ids equal transformers' generate (function and real command line), boxes are
parsed and drawn on the original image, bad inputs give one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pr1_jax import infer, viz
from pr1_jax.processing import chat

PROMPT = "Output the bounding box of the woman in the image."
NEW_TOKENS = 40
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hopper():
    import matplotlib.cbook
    return matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def _hf_greedy(model_dir, image_path, prompt, max_new_tokens):
    """transformers' own pipeline: PIL image processor + chat template + generate(do_sample=False)."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    pix = proc(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    n = int(pix["image_grid_thw"].prod()) // 4
    at = ids.index(image_id)
    ids = torch.tensor([ids[:at] + [image_id] * n + ids[at + 1:]])
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix["pixel_values"],
                         image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=(ids == image_id).long(),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_COMPILATION_CACHE_DIR=os.path.expanduser(
                   os.environ.get("PR1_JAX_TEST_CACHE", "~/.cache/pr1_jax/jax_tests")))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_greedy_ids_equal_transformers_generate(sampler_dir, hopper, tmp_path):
    ref = _hf_greedy(sampler_dir, hopper, PROMPT, NEW_TOKENS)
    assert len(ref) >= 32 and len(set(ref)) > 20  # long and diverse, not a degenerate repeat

    got = infer.run(sampler_dir, hopper, PROMPT, max_new_tokens=NEW_TOKENS)
    assert got["token_ids"] == ref
    assert got["original_hw"] == [600, 512] and got["boxes"] == [] and got["box_format"] == "none"

    # The real command line, in a fresh process: one JSON object on stdout, same ids.
    out_png = tmp_path / "drawn.png"
    proc = subprocess.run([sys.executable, "-m", "pr1_jax.infer", f"--model_dir={sampler_dir}", f"--image={hopper}",
                           f"--prompt={PROMPT}", f"--max_new_tokens={NEW_TOKENS}", "--temperature=0", "--json",
                           f"--out={out_png}"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    cli = json.loads(lines[0])
    assert cli["token_ids"] == ref and cli["text"] == got["text"]
    # --out: the PNG is the original image (no boxes from a random model).
    assert Image.open(out_png).format == "PNG" and Image.open(out_png).size == (512, 600)


def test_text_is_completion_without_stop_token(sampler_dir, hopper):
    """With the 5th greedy token declared a stop token: ids end with it, the text does not."""
    from pr1_jax.pretrained import Pretrained

    pre = Pretrained.load(sampler_dir)
    first = infer.run(sampler_dir, hopper, PROMPT, max_new_tokens=NEW_TOKENS, pretrained=pre)
    stop = first["token_ids"][4]
    pre.special = dataclasses.replace(pre.special, eos_ids=(stop,))
    cut = infer.run(sampler_dir, hopper, PROMPT, max_new_tokens=NEW_TOKENS, pretrained=pre)
    k = first["token_ids"].index(stop)
    assert cut["token_ids"] == first["token_ids"][:k + 1] and cut["stopped"] and not first["stopped"]
    assert cut["text"] == chat.decode(pre.tokenizer, first["token_ids"][:k])


# ----------------------------------------------------------------------------- boxes
QWEN2_TEXT = ("<|object_ref_start|>the woman<|object_ref_end|><|box_start|>(100,200),(500,800)<|box_end|>"
              "<|box_start|>(600,100),(900,300)<|box_end|><|im_end|>")


def test_parse_qwen2_box_tokens():
    boxes, labels, fmt = infer.parse_boxes(QWEN2_TEXT, original_hw=(200, 300))
    assert fmt == "qwen2_vl" and labels == ["the woman", "the woman"]
    np.testing.assert_allclose(boxes, [[30, 40, 150, 160], [180, 20, 270, 60]])
    # A Qwen2.5-VL checkpoint's box tokens are resized-image pixels: only rescaled.
    boxes, _, _ = infer.parse_boxes("<|box_start|>(14,28),(56,112)<|box_end|>", (200, 300), (112, 168),
                                    normalized_box_tokens=False)
    np.testing.assert_allclose(boxes, [[14 * 300 / 168, 28 * 200 / 112, 56 * 300 / 168, 200]])


def test_parse_qwen25_json_rescaled_to_original():
    text = ('```json\n[{"bbox_2d": [28, 56, 140, 112], "label": "cat"}, '
            '{"bbox_2d": [0, 0, 84, 28], "label": "dog"}]\n```')
    boxes, labels, fmt = infer.parse_boxes(text, original_hw=(200, 300), resized_hw=(112, 168))
    assert fmt == "json" and labels == ["cat", "dog"]
    np.testing.assert_allclose(boxes, [[50, 100, 250, 200], [0, 0, 150, 50]])
    # Truncated output: the complete objects are kept.
    truncated = text[:text.index('{"bbox_2d": [0')] + '{"bbox_2d": [0, 0'
    boxes, labels, _ = infer.parse_boxes(truncated, (200, 300), (112, 168))
    assert labels == ["cat"] and boxes.shape == (1, 4)
    assert infer.parse_boxes("no boxes here", (10, 10))[2] == "none"


def test_draw_completion_writes_boxes_on_original(tmp_path):
    base = np.full((200, 300, 3), 30, np.uint8)
    out = tmp_path / "sub" / "boxes.png"
    boxes, labels, fmt = infer.draw_completion(base, QWEN2_TEXT, out)
    a = np.asarray(Image.open(out).convert("RGB"))
    assert Image.open(out).format == "PNG" and a.shape == (200, 300, 3) and fmt == "qwen2_vl"
    # Box 1 = pixels (30, 40)-(150, 160): its left and right edges carry the box colour.
    for x, y in [(30, 100), (150, 100), (90, 160), (180, 40), (270, 40)]:
        assert tuple(a[y, x]) == viz.PRED_COLOR, (x, y)
    assert tuple(a[100, 90]) == (30, 30, 30) and tuple(a[190, 5]) == (30, 30, 30)  # inside / outside untouched


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(sampler_dir, hopper, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a picture")
    cases = [
        (dict(image=tmp_path / "missing.jpg"), "image file not found"),
        (dict(image=not_image), "not an image file"),
        (dict(prompt="   "), "prompt is empty"),
        (dict(max_new_tokens=0), "max_new_tokens must be positive"),
        (dict(max_new_tokens=-5), "max_new_tokens must be positive"),
        (dict(model_dir=tmp_path / "no_model"), "model directory not found"),
        (dict(model_dir=tmp_path), "no config.json"),
        (dict(min_pixels=-5), r"need 0 < min_pixels ≤ max_pixels, got min_pixels=-5, max_pixels=\d+"),
        (dict(min_pixels=10**6, max_pixels=10**5), "got min_pixels=1000000, max_pixels=100000"),
    ]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    cases.append((dict(model_dir=corrupt), "cannot load the checkpoint"))
    for override, message in cases:
        kw = {**dict(model_dir=sampler_dir, image=hopper, prompt=PROMPT, max_new_tokens=4), **override}
        with pytest.raises(infer.InferError, match=message) as e:
            infer.run(kw.pop("model_dir"), kw.pop("image"), kw.pop("prompt"), **kw)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number ≥ 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number ≥ 0"),
    (dict(temperature=-0.5), "temperature must be a finite number ≥ 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer ≥ 0"),
    (dict(top_k=2.5), "top_k must be an integer ≥ 0"),
])
def test_sampling_parameters_are_checked_before_the_model_loads(kwargs, message, hopper, tmp_path):
    # The model directory does not exist: the sampling check must come first to be seen.
    with pytest.raises(infer.InferError, match=message):
        infer.run(tmp_path / "no_model", hopper, PROMPT, max_new_tokens=4, **kwargs)


def test_sampling_edges_are_accepted(sampler_dir, hopper):
    """The closed ends (greedy, no top-p / top-k) and a sampled run with all three on."""
    greedy = infer.run(sampler_dir, hopper, PROMPT, max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0)
    sampled = infer.run(sampler_dir, hopper, PROMPT, max_new_tokens=4, temperature=1e-6, top_p=0.5, top_k=1,
                        seed=3)
    assert len(greedy["token_ids"]) == 4 and sampled["token_ids"] == greedy["token_ids"]  # top_k=1 is greedy


def test_command_line_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pr1_jax.infer", f"--model_dir={tmp_path}",
                           f"--image={tmp_path / 'missing.png'}", "--prompt=hello"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    want = f"pr1_jax.infer: error: {tmp_path / 'missing.png'}: image file not found"
    assert proc.stderr.strip().splitlines() == [want]


def test_argument_mistakes_are_one_line(capsys):
    for argv, message in [(["--model_dir=m", "--image=i.png", "--prompt=p", "--top_k=abc"],
                           "argument --top_k: invalid int value: 'abc'"),
                          (["--image=i.png"], "the following arguments are required: --model_dir, --prompt")]:
        with pytest.raises(SystemExit) as e:
            infer.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"pr1_jax.infer: error: {message}") and "python -m pr1_jax.infer --help" in err
