"""Live parity of the Flax Qwen2-VL with transformers' Qwen2VLForConditionalGeneration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.processing import batch as pb
from tests.helpers import mixed_batch


def _hf_logits(model_dir, inputs, pv, thw, image_token_id):
    from transformers import Qwen2VLForConditionalGeneration

    hf = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(inputs.input_ids, dtype=torch.long)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=torch.tensor(inputs.attention_mask, dtype=torch.long),
                 pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(thw),
                 mm_token_type_ids=(ids == image_token_id).long())
    return out.logits.numpy(), hf


def _ours(model_dir, inputs, dtype=jnp.float32):
    cfg = ModelConfig.from_pretrained(model_dir)
    params = hf_io.load_params(model_dir, cfg, dtype=np.float32)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    model = Qwen2VL(cfg, dtype=dtype, param_dtype=dtype)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jax.tree.map(jnp.asarray, inputs))
    return np.asarray(logits.astype(jnp.float32))


@pytest.fixture(scope="module", params=["tiny_dir", "tiny_untied_dir"])
def case(request):
    model_dir = request.getfixturevalue(request.param)
    cfg = ModelConfig.from_pretrained(model_dir)
    rows, images, pv, thw = mixed_batch(model_dir, cfg)
    inputs = pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=151643)
    ref, hf = _hf_logits(model_dir, inputs, pv, thw, cfg.image_token_id)
    return model_dir, cfg, inputs, ref, hf, thw


def test_configs_differ(tiny_dir, tiny_untied_dir):
    a, b = ModelConfig.from_pretrained(tiny_dir), ModelConfig.from_pretrained(tiny_untied_dir)
    assert a.text.tie_word_embeddings and not b.text.tie_word_embeddings
    assert (a.text.num_heads, a.text.num_kv_heads) != (b.text.num_heads, b.text.num_kv_heads)


def test_logits_match_transformers_float32(case):
    model_dir, cfg, inputs, ref, _, _ = case
    # The batch holds two images of different sizes, a text-only row and a left-padded row.
    assert (~inputs.attention_mask[3]).sum() > 0 and not (inputs.input_ids[2] == cfg.image_token_id).any()
    ours = _ours(model_dir, inputs)
    valid = inputs.attention_mask
    err = np.abs(ours - ref)[valid].max()
    print(f"float32 max |Δlogits| = {err:.2e}")
    assert err <= 1e-4


def test_logits_bfloat16_close(case):
    model_dir, cfg, inputs, ref, _, _ = case
    ours = _ours(model_dir, inputs, jnp.bfloat16)
    valid = inputs.attention_mask
    err = np.abs(ours - ref)[valid]
    scale = np.abs(ref[valid]).max()
    print(f"bfloat16 max |Δlogits| = {err.max():.3e}, mean {err.mean():.3e} (logit scale {scale:.2f})")
    assert err.max() <= 0.05 * scale
    # Greedy choices almost always agree with float32 transformers.
    agree = (ours.argmax(-1) == ref.argmax(-1))[valid].mean()
    assert agree >= 0.9


def test_positions_match_transformers(case):
    _, cfg, inputs, _, hf, thw = case
    ids = torch.tensor(inputs.input_ids, dtype=torch.long)
    mask = torch.tensor(inputs.attention_mask, dtype=torch.long)
    pos, deltas = hf.model.get_rope_index(ids, (ids == cfg.image_token_id).int(), torch.tensor(thw),
                                          attention_mask=mask)
    ours, our_deltas, _ = pb.mrope_positions(inputs.input_ids, inputs.attention_mask, list(thw),
                                             cfg.image_token_id)
    valid = inputs.attention_mask
    np.testing.assert_array_equal(ours[:, valid], pos.numpy()[:, valid])
    np.testing.assert_array_equal(our_deltas, deltas.numpy().reshape(-1))
