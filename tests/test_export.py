"""Export: HF → pr1_jax checkpoint → HF is bit-exact; transformers loads an export of a
trained checkpoint and its logits equal pr1_jax's; shards, bfloat16, the command line."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import checkpoint, export
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


def _save_as_checkpoint(model_dir, directory):
    """The HF weights as a pr1_jax checkpoint, with the meta that `train` records."""
    cfg = ModelConfig.from_pretrained(model_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(model_dir, cfg))
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

    assert export.main([f"--checkpoint={trained / 'checkpoints' / 'step_1'}", f"--out={tmp_path}"]) == 0
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
