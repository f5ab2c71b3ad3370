"""Per-step shapes: the ladder's rungs, the packing choice, and no new program for a step
whose sizes change within their rungs (image sizes, answer lengths)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import rollouts, sharding, train_state
from pr1_jax.model import hf_io
from pr1_jax.model.config import PRESETS, ModelConfig
from pr1_jax.processing import chat, image
from pr1_jax.programs import Programs, resolve_kernels
from pr1_jax.sampler import SamplingConfig
from pr1_jax.shapes import Ladder, ShapeMemo, StepShapes, attention_weight

G = 2


def test_ladder_rungs():
    lad = Ladder(2048, quantum=16, minimum=64)
    rungs = lad.rungs()
    assert rungs[:6] == [64, 80, 96, 112, 128, 160] and rungs[-1] == 2048
    assert all(a < b for a, b in zip(rungs, rungs[1:]))
    for n in range(1, 2049):
        r = lad(n)
        assert r >= n and r in rungs and (n <= 64 or r <= 1.25 * n + 16), n  # ≤ 25% waste (+ rounding)
    with pytest.raises(ValueError, match="over the cap"):
        lad(2049)
    assert Ladder(8, quantum=1, minimum=1, steps=(1.0, 1.5)).rungs() == [1, 2, 3, 4, 6, 8]

def test_packed_image_rows_from_every_block():
    """With `image_rows`, a block's images share rows (consecutive prompts per row); the row
    length is the fine ladder's rung for the fullest row of any block of any process."""
    shapes = StepShapes.from_caps(seq_len=1024, patch_row_len=2048, max_new_tokens=256, num_samples=8, image_rows=1)
    size = rollouts.PromptSize(tokens=500, patches=2000, patch_counts=((1600, 1200, 2000, 1500), (400, 400, 400, 400)))
    whole = size.padded(shapes)  # one block of 4 per process: the fullest row holds 6,300 patches
    assert (whole.image_rows, whole.images_per_row, whole.image_len) == (1, 4, 2048)
    assert 6300 <= whole.row_len <= 6300 * 1.125 + 64 and whole.row_len % 64 == 0
    half = size.padded(shapes, block=2)  # blocks (1600, 1200), (2000, 1500), (400, 400), (400, 400)
    assert (half.images_per_row, half.image_len) == (2, 2048) and 3500 <= half.row_len <= 3500 * 1.125 + 64
    two = dataclasses.replace(shapes, image_rows=2).packed_row(1)  # the per-image ladder's cap
    assert two.cap == 2048
    np.testing.assert_array_equal(rollouts.image_rows_of(6, 2), [0, 0, 0, 1, 1, 1])
    assert rollouts.PromptSize(500, 2000, ((2000,),)).padded(dataclasses.replace(shapes, image_rows=0)) == \
        rollouts.PromptShape(seq_len=512, row_len=2048)  # images one per row: the largest image's rung


def test_packing_choice_follows_the_cost():
    """Short answers share rows (no position wasted); answers all of one long length get a row each."""
    shapes = StepShapes.from_caps(seq_len=2048, patch_row_len=4096, max_new_tokens=256, num_samples=8)
    w = attention_weight(PRESETS["qwen2_vl_2b"]().text)
    short = rollouts.CompletionShape.choose(np.full((4, 8), 20), shapes, 448, w)
    assert short.rows * short.row_len == 8 * 20 and short.rows < 8 and short.length == 32
    long = rollouts.CompletionShape.choose(np.full((4, 8), 256), shapes, 320, w)
    assert (long.rows, long.row_len, long.length) == (8, 256, 256)
    # Long-tailed answers (one long, the rest short) in blocks of 4 prompts: a prompt takes the
    # rows its answers need, not the most any prompt needs — fewer positions than per prompt.
    tail = np.full((4, 8), 12)
    tail[0, 0], tail[1, :4] = 200, 100
    own, shared = (rollouts.CompletionShape.choose(tail, shapes, 448, w, bs) for bs in (1, 4))
    assert shared.prompts_per_block == 4 and shared.rows * shared.row_len < 4 * own.rows * own.row_len
    assert shared.rows >= rollouts.rows_needed(tail, shared.row_len, 4) and shared.row_len >= 200


def test_memo_reuses_a_used_shape_within_the_slack():
    """A step whose own rungs are new takes a shape used before that holds its sizes when that
    costs ≤ 10% more; else its own rungs, remembered. The memo's state restores it."""
    shapes = StepShapes.from_caps(seq_len=1024, patch_row_len=2048, max_new_tokens=256, num_samples=8, image_rows=1)
    memo = ShapeMemo(slack=0.1)
    first = rollouts.PromptSize(576, 2000, ((2000, 1900, 1800, 1700),)).padded(shapes, memo=memo)
    # fewer patches (a lower rung of the packed row): the first shape costs < 10% more → reused
    smaller = rollouts.PromptSize(600, 1800, ((1800, 1700, 1800, 1700),))
    assert smaller.padded(shapes) != first and smaller.padded(shapes, memo=memo) == first
    # much smaller images: the first shape would cost > 10% more → the step's own rungs
    small = rollouts.PromptSize(300, 600, ((600, 500, 600, 500),))
    own = small.padded(shapes, memo=memo)
    assert own == small.padded(shapes) and own != first
    # a larger prompt fits no used shape → its own rungs
    big = rollouts.PromptSize(900, 2000, ((2000,) * 4,)).padded(shapes, memo=memo)
    assert big.seq_len >= 900 and len(memo.used) == 3
    w = attention_weight(PRESETS["qwen2_vl_2b"]().text)
    ext = np.full((4, 8), 40)
    ext[0, 0] = 200
    c1 = rollouts.CompletionShape.choose(ext, shapes, 576, w, memo=memo)
    ext2 = ext.copy()
    ext2[0, 1] = 30  # a little shorter: a lower rung of its own, the used one within 10%
    assert rollouts.CompletionShape.choose(ext2, shapes, 576, w, memo=memo) == c1
    assert rollouts.CompletionShape.choose(np.full((4, 8), 200), shapes, 576, w, memo=memo) != c1  # does not fit
    again = ShapeMemo(slack=0.1)
    again.load(memo.state(), (rollouts.PromptShape, rollouts.CompletionShape))
    assert again.used == memo.used
    again.load([{"type": "PromptShape", "seq_len": 1}, {"type": "Other"}, "x"], (rollouts.PromptShape,))
    assert again.used == []  # entries of another version: dropped, not a crash
    assert ShapeMemo(slack=0.0).pick(own, lambda s: True, lambda s: 1.0) == own


def test_prompt_pack_lists_each_blocks_real_tokens():
    """`batch.pack_prompts`: a block's left-padded prompts → the places of its real tokens in order."""
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], bool)
    assert rollouts.prompt_pack(mask, 2, 6).tolist() == [[2, 3, 5, 6, 7, 0], [0, 1, 2, 3, 7, 0]]
    with pytest.raises(ValueError, match="over the packed length"):
        rollouts.prompt_pack(mask, 4, 8)  # 10 real tokens
    assert rollouts.block_tokens([2, 3, 4, 1], 2) == 5 and rollouts.block_tokens([2, 3, 4, 1], 4) == 10
    shapes = StepShapes.from_caps(seq_len=512, patch_row_len=2048, max_new_tokens=256, num_samples=8)
    w = attention_weight(PRESETS["qwen2_vl_2b"]().text)
    packed = rollouts.CompletionShape.choose(np.full((4, 8), 20), shapes, 448, w, 2, block_prompt_tokens=700)
    assert 700 <= packed.prompt_tokens <= 700 * 1.125 + 16 and packed.prompt_tokens % 16 == 0
    memo = ShapeMemo()
    first = rollouts.CompletionShape.choose(np.full((4, 8), 20), shapes, 448, w, 2, memo=memo, block_prompt_tokens=700)
    fewer = rollouts.CompletionShape.choose(np.full((4, 8), 20), shapes, 448, w, 2, block_prompt_tokens=600)
    assert fewer.prompt_tokens < first.prompt_tokens  # a lower rung of its own, the used one within 10%:
    assert rollouts.CompletionShape.choose(np.full((4, 8), 20), shapes, 448, w, 2, memo=memo,
                                           block_prompt_tokens=600) == first
    assert rollouts.CompletionShape.choose(np.full((4, 8), 20), shapes, 448, w, 2, memo=memo,
                                           block_prompt_tokens=900) != first  # more: a new one


@pytest.fixture(scope="module")
def tiny(sampler_dir):
    cfg = ModelConfig.from_pretrained(sampler_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(sampler_dir, cfg))
    special = chat.SpecialTokens.from_pretrained(sampler_dir)
    tok = chat.load_tokenizer(sampler_dir)
    img_cfg = image.ImageProcessorConfig.from_pretrained(sampler_dir)
    return cfg, params, special, tok, img_cfg


def _prompts(tiny, sides, seed=0):
    cfg, _, special, tok, img_cfg = tiny
    rng = np.random.default_rng(seed)
    examples = [{"image_hwc": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "problem": "the red circle"}
                for h, w in sides]
    return rollouts.encode_examples(examples, "grounding", special, tok, img_cfg, None)


def test_sizes_within_a_rung_compile_nothing_new(tiny):
    """Two steps with other image sizes and other answer lengths, all within the same rungs:
    the rollout and the update programs are compiled once, for the first step."""
    cfg, params, special, _, _ = tiny
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    shapes = StepShapes.from_caps(seq_len=512, patch_row_len=512, max_new_tokens=8, num_samples=G)
    from pr1_jax import grpo
    from pr1_jax.train_step import OptimConfig, make_optimizer

    programs = Programs(cfg, mesh, dtype=jnp.float32, optimizer=make_optimizer(OptimConfig()),
                        grpo_cfg=grpo.GRPOConfig(num_generations=G), eos_ids=special.eos_ids, pad_id=special.pad_id,
                        kernels=resolve_kernels("auto", "auto", mesh), chunk_size=4, prompts_per_micro=2, budget=None)
    state = train_state.init_train_state(params, programs.optimizer, mesh, cfg=cfg)
    counts, keys = [], []
    for step, (sides, lengths) in enumerate([(((56, 84), (84, 56)), [[3, 5], [2, 4]]),
                                             (((56, 56), (84, 84)), [[5, 1], [4, 4]])]):
        prompts = _prompts(tiny, sides, seed=step)
        pshape = rollouts.PromptSize.of(prompts).padded(shapes)
        inputs = sharding.shard_batch(rollouts.prompt_inputs(prompts, special, pshape), mesh)
        out = programs.rollout(params, inputs, jax.random.PRNGKey(step),
                               SamplingConfig(num_samples=G, max_new_tokens=8, temperature=1.0))
        tokens = np.asarray(out.tokens)
        mask = np.arange(8) < np.asarray(lengths)[..., None]
        cshape = rollouts.CompletionShape.choose(rollouts.completion_extents(mask), shapes, pshape.seq_len, 6.5e-5)
        batch = sharding.shard_batch(rollouts.assemble(
            prompts, special, pshape, cshape, tokens, mask, np.zeros((2, G), np.float32),
            np.zeros(mask.shape, np.float32), np.ones((2, G), np.float32), 2), mesh)
        state, _ = programs.update(state, params, batch)
        counts.append(programs.num_compiled())
        keys.append((pshape, cshape))
    assert keys[0] == keys[1]  # other sizes, the same rungs
    assert counts == [3, 3], counts  # prefill, decode, update: compiled for the first step only


def test_every_recipe_config_fits_its_largest_image():
    """The caps of each recipe hold the largest image `data.max_pixels` allows (PR1: 1e6 px),
    and its prompt: a 1-megapixel counting or OCR image must not stop a run."""
    import importlib

    for name in ("grounding", "counting", "detection", "ocr"):
        c = importlib.import_module(f"configs.{name}").get_config()
        shapes = StepShapes.from_config(c)
        patches = c.data.max_pixels // 14**2 + 1  # smart_resize keeps h·w ≤ max_pixels
        assert shapes.patches(patches) >= patches, name
        assert shapes.prompt(patches // 4 + 256) >= patches // 4 + 256, name  # image tokens + text
