"""Qwen3-VL (dense) against transformers' Qwen3VLForConditionalGeneration on tiny random
checkpoints that transformers writes: config and checkpoint keys both ways, logits (tied
and untied heads) with controls showing that DeepStack and the position table matter, the
vision tower with its DeepStack features, positions, interleaved M-RoPE tables, image
preprocessing, greedy decoding, sharded loading and forward, the export, the presets, and
one GRPO step of the real entry point."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pr1_jax import sampler as sampler_lib
from pr1_jax.model import hf_io
from pr1_jax.model.config import PRESETS, ModelConfig
from pr1_jax.model.decoder import mrope
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.processing import batch as pb
from tests.helpers import mixed_batch, random_images

EOS = (151645, 151643)
PAD = 151643
# Patch grids 6×10, 18×12 and 4×4 against the tiny 8×8 position table: resampled up, down and
# both; with the packing the 6×10 and 4×4 images share a packed row.
SIZES = ((100, 150), (300, 200), (40, 40))


def _hf_model(model_dir):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_kwargs(inputs, pv, thw, image_token_id):
    ids = torch.tensor(inputs.input_ids, dtype=torch.long)
    return dict(input_ids=ids, attention_mask=torch.tensor(inputs.attention_mask, dtype=torch.long),
                pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(thw),
                mm_token_type_ids=(ids == image_token_id).long())


def _batch(model_dir, cfg):
    rows, images, pv, thw = mixed_batch(model_dir, cfg, sizes=SIZES)
    inputs = pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=PAD,
                             patch_dim=cfg.vision.patch_dim)
    return rows, images, pv, thw, inputs


def _forward(cfg, params, inputs, method=None):
    model = Qwen2VL(cfg)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
    return np.asarray(fn(params, jax.tree.map(jnp.asarray, inputs)))


_CASES = {}


def _case(kind, tmp_path_factory):
    """Sharper random weights (init std 0.15: logits of ~±7) so that a missing piece shows.
    Built once per kind ("tied" / "untied" head) for the whole module."""
    from pr1_jax import tiny

    if kind not in _CASES:
        tied = kind == "tied"
        model_dir = tiny.write_tiny_checkpoint_qwen3(tmp_path_factory.mktemp(f"tiny_qwen3_{kind}"),
                                                     seed=1 if tied else 2, init_std=0.15, tie_word_embeddings=tied)
        cfg = ModelConfig.from_pretrained(model_dir)
        rows, images, pv, thw, inputs = _batch(model_dir, cfg)
        hf = _hf_model(model_dir)
        with torch.no_grad():
            ref = hf(**_hf_kwargs(inputs, pv, thw, cfg.image_token_id)).logits.numpy()
        params = jax.tree.map(jnp.asarray, hf_io.load_params(model_dir, cfg))
        _CASES[kind] = dict(dir=model_dir, cfg=cfg, inputs=inputs, pv=pv, thw=thw, ref=ref, hf=hf, params=params,
                            tied=tied)
    return _CASES[kind]


@pytest.fixture(scope="module", params=["tied", "untied"])
def case(request, tmp_path_factory):
    """Both checkpoints: tied and untied heads."""
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tied-head checkpoint, for checks that one checkpoint covers."""
    return _case("tied", tmp_path_factory)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """The untied-head checkpoint (sharded load and export also carry the separate lm_head)."""
    return _case("untied", tmp_path_factory)


def test_config_and_checkpoint_round_trip(case):
    """config.json → ModelConfig → config.json → the same ModelConfig (and transformers reads
    ours); the table names exactly the tensors save_pretrained writes, in its key layout."""
    from transformers import Qwen3VLConfig

    cfg = case["cfg"]
    t, v = cfg.text, cfg.vision
    assert cfg.model_type == "qwen3_vl" and t.tie_word_embeddings == case["tied"]
    assert (t.head_dim, t.num_heads * t.head_dim, t.width) == (32, 128, 64)  # head_dim decoupled from width
    assert (t.qk_norm, t.attention_bias, t.mrope_interleaved, t.mrope_section) == (True, False, True, (6, 5, 5))
    assert (v.patch_size, v.patch_dim, v.mlp, v.num_position_embeddings, v.deepstack_indexes) == (
        16, 1536, "gelu_tanh", 64, (0, 1))
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    theirs = Qwen3VLConfig(**cfg.to_hf_dict())
    assert theirs.text_config.rope_parameters["mrope_section"] == [6, 5, 5]
    assert theirs.vision_config.deepstack_visual_indexes == [0, 1] and theirs.tie_word_embeddings == case["tied"]
    files = hf_io.SafetensorsDir(case["dir"])
    raw = {k for _, k in files.key_to_file.values()}  # the keys as saved
    back = hf_io.to_hf_state_dict(hf_io.load_params(case["dir"], cfg), cfg)
    assert set(back) == raw
    assert "model.visual.deepstack_merger_list.1.norm.weight" in back
    assert "model.language_model.layers.2.self_attn.k_norm.weight" in back
    assert not any(k.endswith("q_proj.bias") for k in back) and ("lm_head.weight" in back) != case["tied"]
    for k in back:
        np.testing.assert_array_equal(back[k], files.get(hf_io.canonical_key(k)), err_msg=k)


def test_logits_match_transformers_float32(case):
    cfg, inputs, ref = case["cfg"], case["inputs"], case["ref"]
    # Two images of different sizes, a text-only row and a left-padded row.
    assert (~inputs.attention_mask[3]).sum() > 0 and not (inputs.input_ids[2] == cfg.image_token_id).any()
    assert any(len(set(r[r >= 0])) > 1 for r in inputs.segment_ids)  # two images share a packed row
    ours = _forward(cfg, case["params"], inputs)
    valid = inputs.attention_mask
    err = np.abs(ours - ref)[valid].max()
    print(f"float32 max |Δlogits| = {err:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert err <= 1e-4 and np.abs(ref).max() > 3


def test_deepstack_and_position_table_matter(tied):
    """Controls: without the DeepStack planes, or with the position table shifted by one row,
    the logits are far from transformers'."""
    cfg, inputs, ref, params = tied["cfg"], tied["inputs"], tied["ref"], tied["params"]
    valid = inputs.attention_mask

    def without_deepstack(m: Qwen2VL, x):
        vision = m.encode_images(x.pixels, x.segment_ids, x.pos_hw)
        planes = m.embed(x.input_ids, vision, x.vision_index)
        assert planes.shape[-2:] == (1 + len(cfg.vision.deepstack_indexes), cfg.text.width)
        t = x.input_ids.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & x.attention_mask[:, None, None, :]
        hidden, _ = m.decode(planes[:, None, :, 0], x.positions[:, :, None], mask)
        return m.logits(hidden[:, 0])

    no_ds = _forward(cfg, params, inputs, method=without_deepstack)
    shifted = dict(params, visual=dict(params["visual"], pos_embed={
        "embedding": jnp.roll(params["visual"]["pos_embed"]["embedding"], 1, axis=0)}))
    no_pos = _forward(cfg, shifted, inputs)
    assert np.abs(no_ds - ref)[valid].max() > 0.5 and np.abs(no_pos - ref)[valid].max() > 0.1
    text_row = 2  # no image: DeepStack adds nothing there
    np.testing.assert_allclose(no_ds[text_row][valid[text_row]], ref[text_row][valid[text_row]], atol=1e-4)


def test_vision_tower_and_deepstack_features(tied):
    """Merged features and each DeepStack merger's output equal transformers' per image, on
    grids of 18×12, 16×16 (the processor's largest) and 4×6 patches (table 8×8)."""
    from transformers import Qwen2VLImageProcessorPil

    cfg, params = tied["cfg"], tied["params"]
    proc = Qwen2VLImageProcessorPil.from_pretrained(tied["dir"])
    out = proc(images=random_images([(300, 200), (256, 256), (70, 110)], seed=3), return_tensors="np")
    pv, thw = out["pixel_values"], out["image_grid_thw"]
    assert thw[:, 1:].tolist() == [[18, 12], [16, 16], [4, 6]]
    starts = np.concatenate([[0], np.cumsum(np.prod(thw, axis=1))])
    images = [(pv[starts[i]:starts[i + 1]], tuple(thw[i])) for i in range(len(thw))]
    packed = pb.pack_images(images, merge=2, patch_dim=cfg.vision.patch_dim)
    feats = np.asarray(Qwen2VL(cfg).apply({"params": params}, jnp.asarray(packed.pixels),
                                          jnp.asarray(packed.segment_ids), jnp.asarray(packed.pos_hw),
                                          method=Qwen2VL.encode_images))
    ours = np.concatenate([feats[o: o + int(np.prod(g)) // 4] for o, (_, g) in zip(packed.token_offset, images)])
    with torch.no_grad():
        theirs = tied["hf"].model.visual(torch.tensor(pv), grid_thw=torch.tensor(thw))
    refs = [theirs.pooler_output] + list(theirs.deepstack_features)
    assert ours.shape[1] == len(refs) == 3
    for j, r in enumerate(refs):
        err = np.abs(ours[:, j] - r.numpy()).max()
        print(f"plane {j}: max |Δ| = {err:.2e}")
        assert err <= 1e-5, j


def test_positions_match_transformers(case):
    cfg, inputs = case["cfg"], case["inputs"]
    ids = torch.tensor(inputs.input_ids, dtype=torch.long)
    mask = torch.tensor(inputs.attention_mask, dtype=torch.long)
    pos, deltas = case["hf"].model.get_rope_index(ids, (ids == cfg.image_token_id).int(),
                                                  torch.tensor(case["thw"]), attention_mask=mask)
    ours, our_deltas, _ = pb.mrope_positions(inputs.input_ids, inputs.attention_mask, list(case["thw"]),
                                             cfg.image_token_id)
    valid = inputs.attention_mask
    np.testing.assert_array_equal(ours[:, valid], pos.numpy()[:, valid])
    np.testing.assert_array_equal(our_deltas, deltas.numpy().reshape(-1))


@pytest.mark.parametrize("preset", ["qwen3_vl_2b", "qwen3_vl_4b"])
def test_interleaved_mrope_tables_match_transformers(preset):
    """The released layout (head_dim 128, mrope_section [24, 20, 20], θ 5e6) at (t, h, w)
    positions that differ per axis, against HF's rotary embedding."""
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = PRESETS[preset]()
    rope = Qwen3VLTextRotaryEmbedding(Qwen3VLConfig(**cfg.to_hf_dict()).text_config)
    pos = np.random.default_rng(0).integers(0, 3000, (3, 2, 7))
    cos_ref, sin_ref = rope(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))
    cos, sin = mrope(jnp.asarray(pos)[:, :, None], cfg.text)
    np.testing.assert_allclose(np.asarray(cos[:, 0]), cos_ref.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.asarray(sin[:, 0]), sin_ref.numpy(), atol=2e-3)
    # Not the blocked (Qwen2-VL) layout: the h and w axes own interleaved frequencies.
    blocked = dataclasses.replace(cfg.text, mrope_interleaved=False)
    assert np.abs(np.asarray(mrope(jnp.asarray(pos)[:, :, None], blocked)[0][:, 0]) - cos_ref.numpy()).max() > 0.5


def test_image_preprocessing_matches_transformers(case):
    """16 px patches, 32 px factor, mean = std = 0.5: bit for bit the processor's output."""
    from transformers import Qwen2VLImageProcessorPil

    from pr1_jax.processing import image as image_lib

    icfg = image_lib.ImageProcessorConfig.from_pretrained(case["dir"])
    assert (icfg.factor, icfg.patch_dim, icfg.image_mean) == (32, case["cfg"].vision.patch_dim, (0.5, 0.5, 0.5))
    proc = Qwen2VLImageProcessorPil.from_pretrained(case["dir"])
    for img in random_images([(100, 150), (300, 200), (17, 400)], seed=4):
        out = proc(images=[img], return_tensors="np")
        pixels, grid = image_lib.preprocess(img, icfg)
        np.testing.assert_array_equal(grid, out["image_grid_thw"][0])
        np.testing.assert_array_equal(pixels, out["pixel_values"])


def test_greedy_equals_transformers_generate(untied):
    """32 greedy tokens of our sampler (prefill with DeepStack, then cached decode steps with
    q/k norms and interleaved M-RoPE) equal transformers' generate."""
    cfg, inputs = untied["cfg"], untied["inputs"]
    n = 32
    kwargs = _hf_kwargs(inputs, untied["pv"], untied["thw"], cfg.image_token_id)
    ref = untied["hf"].generate(**kwargs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    ref = ref[:, inputs.input_ids.shape[1]:].numpy()
    assert ref.shape[1] == n and len(np.unique(ref)) > n  # diverse, not a degenerate repeat
    # "pallas": the fused decode step (RoPE, cache write and attention in one kernel, interpreted
    # on CPU) gets q and k already through q_norm / k_norm.
    for decode_attention in ("xla", "pallas"):
        sampler = sampler_lib.Sampler(Qwen2VL(cfg), EOS, PAD, decode_attention=decode_attention)
        out = sampler(untied["params"], jax.tree.map(jnp.asarray, inputs), jax.random.PRNGKey(0),
                      sampler_lib.SamplingConfig(max_new_tokens=n, temperature=0, ignore_eos=True))
        np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), ref, err_msg=decode_attention)


def test_packed_group_scoring_equals_full_forward(tied):
    """The GRPO step's scoring (`decode_group`: prompt and its completions packed in one row,
    DeepStack on the prompt's image tokens only) equals the full forward of every
    [prompt, completion] row, token by token."""
    from pr1_jax.rollouts import completion_extents, pack_completions
    from pr1_jax.train_step import completion_log_probs

    cfg, params = tied["cfg"], tied["params"]
    rows, images, _, _ = mixed_batch(tied["dir"], cfg, sizes=SIZES)
    rows, images = rows[:2], images[:2]  # two prompts with images of different sizes
    build = lambda r, im: pb.build_inputs(r, im, image_token_id=cfg.image_token_id, pad_id=PAD,  # noqa: E731
                                          patch_dim=cfg.vision.patch_dim)
    comp = np.random.default_rng(0).integers(0, 150000, (2, 3, 6)).astype(np.int32)  # B=2, G=3, Tc=6
    mask = np.arange(6) < np.array([[6, 2, 5], [1, 6, 4]])[..., None]
    packed = jax.tree.map(jnp.asarray, pack_completions(comp, completion_extents(mask), 6, 2, 8, PAD))
    ours = completion_log_probs(Qwen2VL(cfg), params, jax.tree.map(jnp.asarray, build(rows, images)), packed,
                                chunk_size=4)[0]
    full_rows = [np.concatenate([rows[i], comp[i, j]]) for i in range(2) for j in range(3)]
    logits = _forward(cfg, params, build(full_rows, [images[i] for i in range(2) for _ in range(3)]))[:, -7:-1]
    full = np.take_along_axis(jax.nn.log_softmax(logits, -1), comp.reshape(6, 6, 1), -1).reshape(2, 3, 6)
    np.testing.assert_allclose(np.asarray(ours)[mask], full[mask], atol=1e-4)


def test_sharded_load_and_forward(untied):
    """Parameters read in their shards on an fsdp × tensor mesh of fake devices (the new
    tensors included) and the sharded forward equal the one-device ones."""
    from pr1_jax import programs, sharding

    cfg = untied["cfg"]
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    params = sharding.load_params(untied["dir"], mesh, cfg=cfg)
    for path, x in hf_io.flatten(params).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(hf_io.flatten(untied["params"])[path]), err_msg=path)
    model = Qwen2VL(cfg)
    fwd = programs.shard_apply(lambda p, x: model.apply({"params": p}, x), mesh)
    logits = np.asarray(fwd(params, sharding.shard_batch(untied["inputs"], mesh)))
    valid = untied["inputs"].attention_mask
    assert np.abs(logits - untied["ref"])[valid].max() <= 1e-4


def test_export_loads_in_transformers(untied, tmp_path):
    """`pr1_jax.export` of a checkpoint of the (perturbed) parameters: transformers loads it
    with no missing or unexpected keys, and its logits equal ours (untied: the lm_head too; the
    tied layout's keys are checked in test_config_and_checkpoint_round_trip)."""
    from pr1_jax import checkpoint, export
    from pr1_jax.train_step import OptimConfig, init_state, make_optimizer

    cfg, inputs = untied["cfg"], untied["inputs"]
    params = jax.tree.map(lambda a: a * 1.01, untied["params"])  # not the weights transformers started from
    ckpt = checkpoint.Checkpoints(tmp_path / "checkpoints")
    ckpt.save(3, init_state(params, make_optimizer(OptimConfig())), rng=jax.random.PRNGKey(0), data_state={},
              meta={"model_dir": str(untied["dir"]), "model_config": cfg.to_hf_dict()})
    ckpt.close()
    out = export.export(tmp_path / "checkpoints", tmp_path / "hf", dtype="float32")
    assert ModelConfig.from_pretrained(out) == cfg
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_vl"
    from transformers import Qwen3VLForConditionalGeneration

    hf, info = Qwen3VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        ref = hf.eval()(**_hf_kwargs(inputs, untied["pv"], untied["thw"], cfg.image_token_id)).logits.numpy()
    ours = _forward(cfg, params, inputs)
    assert np.abs(ours - ref)[inputs.attention_mask].max() <= 1e-4


@pytest.mark.parametrize("preset, billions", [("qwen3_vl_2b", (2.0, 2.3)), ("qwen3_vl_4b", (4.3, 4.6))])
def test_presets(preset, billions):
    """The released sizes (≈2.1B / 4.4B parameters: Qwen3-1.7B / Qwen3-4B decoders, tied,
    plus a 0.4B tower with 3 DeepStack mergers); config.json round trip."""
    cfg = PRESETS[preset]()
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    n = sum(int(np.prod(s)) for s in hf_io.param_shapes(cfg).values())
    print(f"{preset}: {n / 1e9:.3f}B parameters")
    assert billions[0] < n / 1e9 < billions[1]


def test_grpo_step_of_the_entry_point(tmp_path):
    """`pr1_jax.train` on a tiny Qwen3-VL (`--config.model_dir=tiny`, `tiny.model_type=qwen3_vl`):
    one GRPO step, its metrics, the rollout's and the update's log-probs equal."""
    from configs import demo
    from pr1_jax import train

    c = demo.get_config()
    c.workdir = str(tmp_path)
    c.tiny = dict(model_type="qwen3_vl", seed=0, min_pixels=64 * 64, max_pixels=128 * 128)
    c.mesh.update(fsdp=1)
    c.data.synthetic, c.data.eval_examples, c.data.eval_batch = 4, 2, 2
    c.sft.steps, c.total_steps, c.eval_every = 0, 1, 1
    c.batch.prompts_per_step, c.batch.prompts_per_micro = 2, 2
    c.grpo.num_generations = 2
    c.sampling.max_new_tokens = 8
    summary = train.train_and_evaluate(c, devices=jax.devices()[:1])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 1 and np.isfinite(rows[0]["loss"])
    assert 0 <= rows[0]["sampler_logp_gap"] < 1e-4  # the sampler's log-probs = the update's (DeepStack in both)
    assert summary["steps"] == 1
    assert ModelConfig.from_pretrained(tmp_path / "base_model").model_type == "qwen3_vl"
