"""Export: HF → pr1_jax checkpoint → HF is bit-exact; transformers loads an export of a
trained checkpoint and its logits equal pr1_jax's; shards, bfloat16, the checkpoint's dtype by
default, --overwrite leaves no foreign weights; transformers' greedy generation through the
documented recipe (`pr1_jax.hf_generate`, docs/export.md) equals `pr1_jax.infer`'s."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import checkpoint, export, hf_generate, infer
from pr1_jax.errors import ConfigError
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.processing import batch as pb
from pr1_jax.train_step import OptimConfig, init_state, make_optimizer
from tests.helpers import mixed_batch
from tests.test_checkpoint import REPO, run_train, train_env


def _tensors(model_dir):
    d = hf_io.SafetensorsDir(model_dir)
    return {k: d.get(k) for k in d.keys()}


def _save_as_checkpoint(model_dir, directory, dtype=jnp.float32):
    """The HF weights as a pr1_jax checkpoint (in `dtype`), with the meta that `train` records."""
    cfg = ModelConfig.from_pretrained(model_dir)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), hf_io.load_params(model_dir, cfg))
    state = init_state(params, make_optimizer(OptimConfig()))
    ckpt = checkpoint.Checkpoints(directory)
    ckpt.save(7, state, rng=jax.random.PRNGKey(0), data_state={},
              meta={"model_dir": str(model_dir), "model_config": cfg.to_hf_dict()})
    ckpt.close()


@pytest.mark.parametrize("which, shard", [("tiny_dir", "5GB"), ("tiny_untied_dir", "20MB")])
def test_hf_round_trip_is_bit_exact(which, shard, request, tmp_path):
    model_dir = request.getfixturevalue(which)
    _save_as_checkpoint(model_dir, tmp_path / "checkpoints")
    out = export.export(tmp_path / "checkpoints", tmp_path / "hf", dtype="float32", max_shard_size=shard)
    original, back = _tensors(model_dir), _tensors(out)
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype == np.float32, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert ModelConfig.from_pretrained(out) == ModelConfig.from_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), name
    sharded = shard == "20MB"
    assert (out / "model.safetensors.index.json").is_file() == sharded
    assert (out / "model.safetensors").is_file() == (not sharded)
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in original.values())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir):
    """The real entry point: SFT warm-up (1 step) then one GRPO step; checkpoint step 1."""
    workdir = tmp_path_factory.mktemp("export") / "run"
    run_train(workdir, tiny_dir, "--config.total_steps=1", "--config.checkpoint_every=1000")
    return workdir


def test_transformers_loads_an_export_of_a_trained_checkpoint(trained, tiny_dir, tmp_path):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "pr1_jax.export", f"--checkpoint={trained}", f"--out={out}",
                           "--dtype=float32"], cwd=REPO, env=train_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, info = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # The trained weights, not the base model's.
    base, exported = _tensors(tiny_dir), _tensors(out)
    changed = [k for k in base if not np.array_equal(base[k], exported[k])]
    assert len(changed) > len(base) // 2, changed

    cfg = ModelConfig.from_pretrained(out)
    rows, images, pv, thw = mixed_batch(out, cfg)
    inputs = pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=151643)
    ids = torch.tensor(inputs.input_ids, dtype=torch.long)
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, attention_mask=torch.tensor(inputs.attention_mask, dtype=torch.long),
                        pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(thw),
                        mm_token_type_ids=(ids == cfg.image_token_id).long()).logits.numpy()
    ckpt = checkpoint.Checkpoints(trained / "checkpoints", read_only=True)
    params = jax.tree.map(jnp.asarray, ckpt.restore_params(1))
    ckpt.close()
    ours = np.asarray(Qwen2VL(cfg).apply({"params": params}, jax.tree.map(jnp.asarray, inputs)))
    err = np.abs(ours - ref)[inputs.attention_mask].max()
    print(f"exported checkpoint: max |Δlogits| vs transformers = {err:.2e}")
    assert err <= 1e-4


def test_bfloat16_export(trained, tmp_path):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    assert export.main([f"--checkpoint={trained / 'checkpoints' / 'step_1'}", f"--out={tmp_path}",
                        "--dtype=bfloat16"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    ckpt = checkpoint.Checkpoints(trained / "checkpoints", read_only=True)
    f32 = hf_io.to_hf_state_dict(ckpt.restore_params(1), ModelConfig.from_pretrained(tmp_path))
    ckpt.close()
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16
    state = hf.state_dict()
    for key in ("model.language_model.layers.0.self_attn.q_proj.weight", "model.visual.patch_embed.proj.weight"):
        legacy = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        want = torch.from_numpy(f32[legacy]).to(torch.bfloat16)  # torch's round-to-nearest-even
        assert torch.equal(state[key], want), key


def test_sizes_and_paths(tmp_path):
    assert export.parse_size("5GB") == 5 * 10**9 and export.parse_size("20MB") == 20 * 10**6
    assert export.parse_size("2GiB") == 2 * 2**30 and export.parse_size(123) == 123
    with pytest.raises(ValueError, match="size"):
        export.parse_size("five")
    (tmp_path / "checkpoints").mkdir()
    assert export.resolve_checkpoint(tmp_path, None) == (tmp_path / "checkpoints", None)
    assert export.resolve_checkpoint(tmp_path / "checkpoints" / "step_12", None) == (tmp_path / "checkpoints", 12)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export.export(tmp_path / "checkpoints", tmp_path / "out")
    with pytest.raises(ConfigError, match="contradicts"):
        export.resolve_checkpoint(tmp_path / "checkpoints" / "step_12", 13)


# ------------------------------------------------------------------ dtype, --overwrite, steps
@pytest.fixture(scope="module")
def sampler_ckpt(sampler_dir, tmp_path_factory):
    """`sampler_dir`'s float32 weights as checkpoint step 7 (sharp random logits: diverse greedy ids)."""
    directory = tmp_path_factory.mktemp("sampler_ckpt") / "checkpoints"
    _save_as_checkpoint(sampler_dir, directory)
    return directory


def test_default_dtype_is_the_checkpoints(tiny_dir, tmp_path):
    _save_as_checkpoint(tiny_dir, tmp_path / "bf16", dtype=jnp.bfloat16)
    out = export.export(tmp_path / "bf16", tmp_path / "hf")  # float32 runs: test_generate_recipe_equals_infer
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {str(x.dtype) for x in _tensors(out).values()} == {"bfloat16"}


def test_overwrite_replaces_foreign_weights(sampler_ckpt, sampler_dir, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    out = tmp_path / "hf"
    out.mkdir()
    foreign = ["model-00001-of-00003.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "vocab.json"]
    for name in foreign + ["README.md"]:
        (out / name).write_text("another model's")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        export.export(sampler_ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(foreign + ["README.md"])  # refused: nothing touched
    before = {p.name: p.stat().st_size for p in sampler_dir.iterdir()}
    with pytest.raises(ConfigError, match="is the base model directory"):  # would delete the base's weights
        export.export(sampler_ckpt, sampler_dir, overwrite=True)
    assert {p.name: p.stat().st_size for p in sampler_dir.iterdir()} == before
    export.export(sampler_ckpt, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert not names & set(foreign) and "README.md" in names and "model.safetensors" in names
    _, info = Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_missing_step_lists_the_steps(sampler_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"step 999 does not exist .*the steps there: 7"):
        export.export(sampler_ckpt, tmp_path / "hf", step=999)
    assert not (tmp_path / "hf").exists()  # nothing written for a mistake


# ------------------------------------------------------------------ the transformers recipe (docs/export.md)
def test_generate_recipe_equals_infer(sampler_ckpt, tmp_path):
    """transformers' greedy generate through `hf_generate` on the export = pr1_jax.infer's ids."""
    import matplotlib.cbook

    image = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    prompt, n = "Output the bounding box of the woman in the image.", 24
    out = export.export(sampler_ckpt, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"  # the checkpoint's
    loaded = hf_generate.load(out)
    ref = hf_generate.generate(out, image, prompt, max_new_tokens=n, loaded=loaded)
    assert len(ref) == n and len(set(ref)) > n // 2  # long and diverse: a real comparison
    assert infer.run(out, image, prompt, max_new_tokens=n)["token_ids"] == ref

    # Why the recipe builds mm_token_type_ids: without them transformers' M-RoPE positions are
    # silently wrong (no error, other tokens).
    model, tokenizer, processor = loaded
    inputs = hf_generate.build_inputs(tokenizer, processor, image, prompt)
    assert int(inputs["mm_token_type_ids"].sum()) == int(inputs["image_grid_thw"].prod()) // 4
    del inputs["mm_token_type_ids"]
    wrong = model.generate(**inputs, max_new_tokens=n, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert wrong != ref
