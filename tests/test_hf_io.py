"""HF checkpoint import: the declarative table both ways, and clear errors on bad checkpoints."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig


def _all_tensors(model_dir):
    d = hf_io.SafetensorsDir(model_dir)
    return {k: d.get(k) for k in d.keys()}


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_untied_dir"])
def test_round_trip_is_bit_exact(which, request):
    model_dir = request.getfixturevalue(which)
    cfg = ModelConfig.from_pretrained(model_dir)
    params = hf_io.load_params(model_dir, cfg)
    back = hf_io.to_hf_state_dict(params, cfg)
    original = _all_tensors(model_dir)
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_sharded_checkpoint_is_read(tiny_untied_dir):
    assert (tiny_untied_dir / "model.safetensors.index.json").is_file()
    params = hf_io.load_params(tiny_untied_dir)
    assert params["lm_head"]["kernel"].shape == (64, 151936)


def test_new_key_layout_is_read(tiny_dir, tmp_path):
    """transformers' in-memory names (model.language_model.*, model.visual.*) load too."""
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.")
               else k.replace("visual.", "model.visual.", 1): v for k, v in tensors.items()}
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    save_file(renamed, str(tmp_path / "model.safetensors"))
    a, b = hf_io.load_params(tiny_dir), hf_io.load_params(tmp_path)
    np.testing.assert_array_equal(a["visual"]["blocks"]["qkv"]["kernel"], b["visual"]["blocks"]["qkv"]["kernel"])


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.load_params(tmp_path / "nope", ModelConfig())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        hf_io.SafetensorsDir(tmp_path)


def test_corrupt_files(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        hf_io.load_params(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_index_naming_a_missing_shard(tiny_untied_dir, tmp_path):
    for f in tiny_untied_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match="shard files named in the index are missing"):
        hf_io.load_params(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_in_one_error(tiny_dir, tmp_path):
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(7, np.float32)
    tensors["visual.extra.weight"] = np.zeros(3, np.float32)
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        hf_io.load_params(tmp_path)
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): visual.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.bias: (7,) (expected (64,))" in msg
