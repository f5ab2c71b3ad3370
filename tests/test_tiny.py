"""pr1_jax.tiny: the NumPy writer's checkpoint is one transformers reads as it reads its own
(no missing or unexpected keys, the same tensors), and our loader reads back what was drawn."""

import json

import numpy as np
import pytest

from pr1_jax import tiny
from pr1_jax.errors import ConfigError
from pr1_jax.model import hf_io
from pr1_jax.processing.image import ImageProcessorConfig


def test_numpy_checkpoint_is_a_transformers_checkpoint(tmp_path):
    pytest.importorskip("torch")  # the transformers model class (torch is in requirements.txt; not on TPU VMs)
    from safetensors.numpy import load_file
    from transformers import Qwen2VLForConditionalGeneration

    out = tiny.write_tiny_checkpoint(tmp_path / "np", writer="numpy", seed=3)
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    written = load_file(out / "model.safetensors")
    state = model.state_dict()
    # transformers keeps the release key names on save; compare through its state dict's names
    assert len(written) >= 30
    for key, value in written.items():
        ours = [k for k in state if k.endswith(key.split("model.", 1)[-1])]
        assert ours, key
        np.testing.assert_array_equal(state[ours[0]].detach().numpy(), value)
    # the sampler's stop ids and the image pipeline are those of the transformers writer
    ref = tiny.write_tiny_checkpoint(tmp_path / "tf")
    gen = [json.loads((d / "generation_config.json").read_text()) for d in (out, ref)]
    assert [(g["eos_token_id"], g["pad_token_id"]) for g in gen] == [([151645, 151643], 151643)] * 2
    assert ImageProcessorConfig.from_pretrained(out) == ImageProcessorConfig.from_pretrained(ref)


def test_numpy_checkpoint_reads_back_and_is_reproducible(tmp_path):
    a = tiny.write_numpy_checkpoint(tmp_path / "a", seed=1)
    b = tiny.write_numpy_checkpoint(tmp_path / "b", seed=1)
    pa, pb = hf_io.flatten(hf_io.load_params(a)), hf_io.flatten(hf_io.load_params(b))
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    assert np.all(pa["decoder/norm/scale"] == 1) and np.all(pa["visual/blocks/fc1/bias"] == 0)
    assert 0.015 < np.std(pa["embed_tokens/embedding"]) < 0.025


def test_unknown_writer_and_missing_torch_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'transformers' or 'numpy'"):
        tiny.write_tiny_checkpoint(tmp_path, writer="jax")
    with pytest.raises(ValueError, match="qwen2_vl only"):
        tiny.write_tiny_checkpoint(tmp_path, writer="numpy", model_type="qwen3_vl")
    monkeypatch.setattr(tiny.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="tiny.writer=numpy"):
        tiny.write_tiny_checkpoint(tmp_path)
