"""The tiny case shared by the sharding tests, and (run as a script) one process of the
two-process `jax.distributed` test.

A small Qwen2-VL (vocab 1000, width 64, 2 layers, 4 q / 2 kv heads, ViT width 32) with random
weights saved as an HF directory; prompts with random images of several sizes (and a
text-only one); a GRPO step's `Rollouts`. Every prompt is a pure function of its global
index, so a process can build just its own prompts and the references can build them all.

    python tests/sharding_case.py --process=0 --port=PORT --ckpt=DIR --out=DIR   # and --process=1
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

V = 1000  # vocabulary; the special ids sit at its top
IMAGE, VSTART, VEND, PAD = V - 1, V - 3, V - 4, 0
SEQ_LEN, ROW_LEN = 40, 32  # prompt tokens, patches per packed image row
G, TC, CHUNK = 2, 5, 4  # samples per prompt, completion tokens, LM-head chunk
FWD_PROMPTS = 8  # forward batch
MICRO = [[0, 1, 2, 3], [4, 5, 6, 7]]  # update batch: M=2 micro-batches of 4 prompts
# Compile for correctness, not speed (CPU XLA's LLVM passes dominate the test time).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def model_config():
    from pr1_jax.model.config import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        text=TextConfig(vocab_size=V, width=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        mrope_section=(2, 3, 3), tie_word_embeddings=False),
        vision=VisionConfig(depth=2, width=32, num_heads=4, mlp_dim=128, out_width=64),
        image_token_id=IMAGE, video_token_id=V - 2, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def write_checkpoint(out_dir: str | os.PathLike) -> Path:
    """Random parameters in HF layout: config.json and two safetensors files with an index
    (the decoder layers in the second), as a sharded `save_pretrained` writes them."""
    import jax
    from flax.core import meta
    from safetensors.numpy import save_file

    from pr1_jax.model import hf_io
    from pr1_jax.model.qwen2_vl import init_params

    cfg, out = model_config(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(meta.unbox(init_params(cfg, jax.random.PRNGKey(7))))
    tensors = hf_io.to_hf_state_dict(params, cfg)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {k: names[k.startswith("model.layers.")] for k in tensors}
    for name in names:
        save_file({k: v for k, v in tensors.items() if weight_map[k] == name}, str(out / name),
                  metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return out


def prompt(i: int):
    """Prompt i: (token ids, image or None). Images of 16 or 32 patches; every 4th is text-only."""
    rng = np.random.default_rng(100 + i)
    ids = list(rng.integers(1, V - 10, 4 + i % 3))
    image = None
    if i % 4 != 2:
        h, w = [(4, 4), (4, 8), (8, 4)][i % 3]
        image = (rng.standard_normal((h * w, 1176)).astype(np.float32), (1, h, w))
        ids += [VSTART] + [IMAGE] * (h * w // 4) + [VEND]
    ids += list(rng.integers(1, V - 10, 3 + i % 5))
    return np.asarray(ids, np.int32), image


def model_inputs(indices, num_rows: int | None = None):
    from pr1_jax.processing import batch as pb

    rows, images = zip(*(prompt(i) for i in indices))
    images = [im for im in images if im is not None]
    return pb.build_inputs(list(rows), images, image_token_id=IMAGE, pad_id=PAD, seq_len=SEQ_LEN, row_len=ROW_LEN,
                           num_rows=num_rows or len(indices), row_of=range(len(images)))  # one per row, as training


def rollouts(micro):
    """A GRPO step's Rollouts over micro-batches of global prompt indices (NumPy)."""
    import jax

    from pr1_jax.rollouts import rollouts_from_padded

    def row(i):
        rng = np.random.default_rng(200 + i)
        length = rng.integers(2, TC + 1, G)
        return (rng.integers(1, V - 10, (G, TC)).astype(np.int32), np.arange(TC) < length[:, None],
                rng.standard_normal(G).astype(np.float32))

    per = [[row(i) for i in mb] for mb in micro]
    stack = lambda k, dt: np.asarray([[r[k] for r in mb] for mb in per], dt)  # noqa: E731
    prompts = [model_inputs(mb) for mb in micro]
    return rollouts_from_padded(jax.tree.map(lambda *xs: np.stack(xs), *prompts), stack(0, np.int32),
                                stack(1, bool), stack(2, np.float32),
                                np.zeros((len(micro), len(micro[0]), G, TC), np.float32),
                                np.ones((len(micro), len(micro[0]), G), np.float32), pad_id=0, trim=False)


def optimizer():
    from pr1_jax.train_step import OptimConfig, make_optimizer

    # eps=1 keeps Adam's first step ≈ lr·g (not lr·sign(g)), so float re-association across
    # shards moves the parameters by ~lr·1e-7, not by ±lr for gradients near zero.
    return make_optimizer(OptimConfig(learning_rate=0.1, eps=1.0, total_steps=10))


def grpo_config():
    from pr1_jax import grpo

    return grpo.GRPOConfig(num_generations=G)


def run_fast(fn, *args):
    """`fn(*args)` through `fn.lower(*args).compile(FAST)`."""
    return fn.lower(*args).compile(FAST)(*args)


# ------------------------------------------------------------------ unsharded references (one device)
@functools.lru_cache(maxsize=None)
def reference_params(ckpt: str):
    import jax

    from pr1_jax.model import hf_io

    return jax.tree.map(jax.numpy.asarray, hf_io.load_params(ckpt, model_config()))


@functools.lru_cache(maxsize=None)
def reference_forward(ckpt: str) -> np.ndarray:
    import jax

    from pr1_jax.model.qwen2_vl import Qwen2VL

    model = Qwen2VL(model_config())
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return np.asarray(run_fast(fwd, reference_params(ckpt), jax.tree.map(jax.numpy.asarray,
                                                                         model_inputs(range(FWD_PROMPTS)))))


@functools.lru_cache(maxsize=None)
def reference_update(ckpt: str):
    """(params after one GRPO step, metrics), flat NumPy."""
    import jax

    from pr1_jax.model import hf_io
    from pr1_jax.model.qwen2_vl import Qwen2VL
    from pr1_jax.train_step import init_state, make_update_fn

    params, opt = reference_params(ckpt), optimizer()
    update = make_update_fn(Qwen2VL(model_config()), opt, grpo_config(), chunk_size=CHUNK)
    state = init_state(jax.tree.map(jax.numpy.copy, params), opt)
    state, metrics = run_fast(update, state, params, jax.tree.map(jax.numpy.asarray, rollouts(MICRO)))
    return hf_io.flatten(jax.device_get(state.params)), jax.device_get(metrics)


@functools.lru_cache(maxsize=None)
def reference_rollout(ckpt: str):
    """Greedy rollouts of the 8 forward prompts on one device: (tokens, logp) [8, G, TC]."""
    import jax

    from pr1_jax.model.qwen2_vl import Qwen2VL
    from pr1_jax.sampler import Sampler

    out = Sampler(Qwen2VL(model_config()), (VEND,), PAD)(
        reference_params(ckpt), jax.tree.map(jax.numpy.asarray, model_inputs(range(FWD_PROMPTS))),
        jax.random.PRNGKey(0), greedy())
    return np.asarray(out.tokens), np.asarray(out.logp)


def greedy():
    from pr1_jax.sampler import SamplingConfig

    return SamplingConfig(num_samples=G, max_new_tokens=TC, temperature=0)


# ------------------------------------------------------------------ one process of the two-process test
def worker(process: int, port: int, ckpt: str, out: str) -> None:
    """Loads params sharded (each process reads its slices), runs a sharded forward and a GRPO
    step on a (data=2, fsdp=2, tensor=2) mesh over both processes' 4 CPU devices each, with
    every process passing only ITS prompts; process 0 writes the gathered results."""
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process))
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(
        os.environ.get("PR1_JAX_TEST_CACHE", "~/.cache/pr1_jax/jax_tests")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from jax.experimental import multihost_utils

    from pr1_jax import multihost, programs, sharding, train_state
    from pr1_jax.model import hf_io
    from pr1_jax.model.qwen2_vl import Qwen2VL

    assert multihost.initialize_distributed() and jax.process_count() == 2 and len(jax.local_devices()) == 4
    # Devices interleaved across processes: each process holds two NON-adjacent blocks of
    # the batch (as a TPU pod's physical device order can give), the general case.
    devices = sorted(jax.devices(), key=lambda d: (d.id % 4 // 2, d.process_index, d.id))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=devices)
    params = sharding.load_params(ckpt, mesh)
    model = Qwen2VL(model_config())
    results = {}

    def mine(n: int) -> list[int]:
        """The global rows of an n-row batch that this process's devices hold."""
        sh = sharding.batch_shardings(np.zeros(n), mesh)
        return sorted({i for idx in sh.addressable_devices_indices_map((n,)).values()
                       for i in range(*idx[0].indices(n)[:2])})

    # Forward: this process's 4 of the 8 prompts, packed on its own (vision_index re-pointed).
    rows = mine(FWD_PROMPTS)
    results["rows"] = multihost_utils.process_allgather(np.asarray(rows))
    local = model_inputs(rows)
    fwd = programs.shard_apply(lambda p, x: model.apply({"params": p}, x), mesh)
    logits = run_fast(fwd, params, sharding.shard_batch(local, mesh, process_local=True))
    results["logits"] = multihost.fetch(logits)
    results["local_logits"] = multihost_utils.process_allgather(multihost.host_local(logits))
    # Greedy rollouts of the same prompts: sampled on the mesh, read back per process.
    from pr1_jax.sharded_sampler import ShardedSampler

    sampler = ShardedSampler(model, (VEND,), PAD, mesh)
    sampled = sampler(params, sharding.shard_batch(local, mesh, process_local=True), jax.random.PRNGKey(0), greedy())
    results["rollout_tokens"] = multihost.fetch(sampled.tokens)
    results["rollout_logp"] = multihost.fetch(sampled.logp)
    # GRPO step: each micro-batch's 4 prompts split 2 + 2 between the processes.
    micro = [[mb[i] for i in mine(len(mb))] for mb in MICRO]
    opt = optimizer()
    update = programs.shard_update_fn(model, opt, grpo_config(), mesh, chunk_size=CHUNK)
    state = train_state.init_train_state(params, opt, mesh, cfg=model.cfg)
    state, metrics = run_fast(update, state, params, sharding.shard_batch(rollouts(micro), mesh, process_local=True))
    for k, v in jax.device_get(metrics).items():  # replicated: readable on every process
        results[f"metric/{k}"] = np.asarray(v)
    for k, v in multihost.fetch(hf_io.flatten(state.params)).items():
        results[f"param/{k}"] = v
    results["spec/q_proj"] = np.asarray(str(state.params["decoder"]["layers"]["q_proj"]["kernel"].sharding.spec))
    results["gathered_ids"] = multihost.gather(np.asarray([jax.process_index()]))
    if multihost.is_main_process():
        np.savez(Path(out) / "results.npz", **{k: np.asarray(v) for k, v in results.items()})
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ap = argparse.ArgumentParser()
    for name in ("process", "port"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    worker(a.process, a.port, a.ckpt, a.out)
