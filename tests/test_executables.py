"""Executables: one compile per argument signature, on use or ahead (on a background thread),
and the sharded rollout compiled ahead gives the rollout compiled on use, token for token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax import sharding
from pr1_jax.executables import Executables, abstract
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.processing import batch as pb
from pr1_jax.sampler import SamplingConfig
from pr1_jax.sharded_sampler import ShardedSampler

PAD, EOS = 151643, (151645, 151643)


def _f(x, y, *, n):
    return x * n + y.sum()


def test_one_compile_per_signature_on_use_or_ahead():
    exe = Executables(jax.jit(_f, static_argnames=("n",)), ("n",))
    x, y = jnp.arange(4.0), jnp.ones((2, 3))
    np.testing.assert_array_equal(exe(x, y, n=2), _f(x, y, n=2))
    exe(x + 1, y, n=2)  # the same signature: no compile
    assert (exe.num_compiled, exe.num_ahead) == (1, 0)
    exe(x, jnp.ones((3, 3)), n=2)  # another shape
    exe(x, y, n=3)  # another static argument
    assert exe.num_compiled == 3
    # Ahead (abstract arguments): scheduled once, then used by the call without a compile of its own.
    assert exe.compile_ahead(*abstract((x, jnp.ones((5, 3)))), n=2)
    assert not exe.compile_ahead(x, jnp.ones((5, 3)), n=2)  # scheduled already
    assert not exe.compile_ahead(x, y, n=2)  # compiled already
    np.testing.assert_array_equal(exe(x, jnp.ones((5, 3)), n=2), _f(x, jnp.ones((5, 3)), n=2))
    assert (exe.num_compiled, exe.num_ahead) == (3, 1)
    with pytest.raises(TypeError, match="positionally"):
        exe(x, y=y, n=2)


def test_a_failed_compile_ahead_is_compiled_on_use_once(monkeypatch):
    exe = Executables(jax.jit(_f, static_argnames=("n",)), ("n",))
    x, y = jnp.arange(4.0), jnp.ones((2, 3))

    def broken(args, kwargs):
        raise RuntimeError("out of host memory")

    monkeypatch.setattr(exe, "_compile", broken)
    assert exe.compile_ahead(x, y, n=2)
    for _ in range(2):
        np.testing.assert_array_equal(exe(x, y, n=2), _f(x, y, n=2))
    assert (exe.num_compiled, exe.num_ahead) == (1, 1)


def test_a_layout_not_compiled_for_is_compiled_anew():
    """An executable takes only the shardings it was compiled for: another layout of the same
    shapes is another program (not an error at the call)."""
    mesh = sharding.make_mesh(data=2, fsdp=1, devices=jax.devices()[:2])
    exe = Executables(jax.jit(_f, static_argnames=("n",)), ("n",))
    x = jnp.arange(4.0)
    y = jnp.ones((2, 3))
    split = jax.device_put(y, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    whole = jax.device_put(y, sharding.replicated(mesh))
    exe(x, split, n=1)
    exe(x, whole, n=1)
    exe(x, jax.device_put(y + 1, split.sharding), n=1)
    assert exe.num_compiled == 2


def test_rollout_compiled_ahead_equals_compiled_on_use(sampler_dir):
    """On 2 fake devices: the rollout of another G compiled ahead (from the shapes alone) runs
    without compiling and gives the tokens of a sampler that compiles it on use."""
    cfg = ModelConfig.from_pretrained(sampler_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(sampler_dir, cfg))
    model = Qwen2VL(cfg)
    mesh = sharding.make_mesh(data=2, fsdp=1, devices=jax.devices()[:2])
    ids = [np.arange(3, 3 + n, dtype=np.int32) for n in (5, 7)]
    inputs = sharding.shard_batch(pb.build_inputs(ids, [], image_token_id=-1, pad_id=PAD), mesh,
                                  sharding.SAMPLE_RULES)
    params = jax.device_put(params, sharding.replicated(mesh))
    sc = SamplingConfig(num_samples=2, max_new_tokens=5, temperature=1.0, top_p=0.9, top_k=20)
    ahead, on_use = ShardedSampler(model, EOS, PAD, mesh), ShardedSampler(model, EOS, PAD, mesh)
    ahead(params, inputs, jax.random.PRNGKey(0), sc)
    assert ahead.num_compiled() == 2
    four = SamplingConfig(num_samples=4, max_new_tokens=5, temperature=1.0, top_p=0.9, top_k=20)
    assert ahead.compile_ahead(abstract(params), abstract(inputs), jax.random.PRNGKey(1), four) == 1  # decode only
    got = ahead(params, inputs, jax.random.PRNGKey(3), four)
    assert (ahead.num_compiled(), ahead.num_compiled_ahead()) == (2, 1)
    want = on_use(params, inputs, jax.random.PRNGKey(3), four)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.logp), np.asarray(want.logp))
    assert got.tokens.shape == (2, 4, 5)
