"""Test set-up: 8 fake CPU devices (for sharding tests), a persistent compile cache,
float32 matmuls at full precision, and session-scoped tiny HF checkpoints."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.expanduser(os.environ.get("PR1_JAX_TEST_CACHE", "~/.cache/pr1_jax/jax_tests")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Qwen2-VL checkpoint (tied embeddings, 4 q heads / 2 kv heads)."""
    from pr1_jax import tiny
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tied"), seed=0)


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory):
    """A second config: untied lm_head, 8 q heads / 1 kv head, 3 layers, sharded safetensors."""
    from pr1_jax import tiny
    return tiny.write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_untied"), seed=1, hidden_size=64, num_heads=8,
        num_kv_heads=1, num_layers=3, mrope_section=(1, 1, 2), tie_word_embeddings=False,
        vision_depth=3, vision_width=48, vision_heads=3, safe_serialization_max_shard="20MB")


@pytest.fixture(scope="session")
def sampler_dir(tmp_path_factory):
    """Sharper random weights (init std 0.15, untied head) so greedy outputs are diverse."""
    from pr1_jax import tiny
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sampler"), seed=3, init_std=0.15,
                                      tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_qwen2_5_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint: window 56 px = 2×2 merged tokens, full attention
    in block 1 of 3, untied lm_head."""
    from pr1_jax import tiny
    return tiny.write_tiny_checkpoint_qwen2_5(tmp_path_factory.mktemp("tiny_qwen2_5"), seed=5,
                                              tie_word_embeddings=False)
