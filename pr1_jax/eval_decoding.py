"""Greedy decoding of `pr1_jax.evaluate`'s batches: on one device, or with the training
rollout's sampler on a mesh of this process's devices (each batch's prompts split over them).

    mesh = eval_mesh(devices=0, batch_size=8)                 # None for one device
    decoder = make_decoder(pre, "grounding", max_new_tokens=512, mesh=mesh)
    completions = greedy_decode(decoder, prompt_batch, examples)   # [Completion(text, num_tokens, stopped)]

Texts are decoded without the stop token, as vLLM returns them, special tokens kept or dropped
as the task's PR1 script does (`Task.skip_special_tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import numpy as np

from pr1_jax import tasks
from pr1_jax.errors import ConfigError
from pr1_jax.processing import chat


class Completion(NamedTuple):
    text: str  # decoded without the stop token
    num_tokens: int  # generated tokens, stop token included
    stopped: bool  # a stop token was produced (else max_new_tokens was reached)


@dataclasses.dataclass
class Decoder:
    pre: Any  # pretrained.Pretrained
    sampler: Any  # sampler.Sampler, or sharded_sampler.ShardedSampler on a mesh of several devices
    cfg: Any  # sampler.SamplingConfig (greedy, one sample)
    skip_special_tokens: bool
    mesh: Any = None  # jax.sharding.Mesh of the ShardedSampler (prompts split over its devices)


def make_decoder(pre, task: str, max_new_tokens: int, mesh=None) -> Decoder:
    """Greedy decoding on one device, or with `mesh` (several devices) the training rollout's
    sampler on the mesh: each batch's prompts are split over the devices (`ShardedSampler`)."""
    from pr1_jax.sampler import Sampler, SamplingConfig
    from pr1_jax.sharded_sampler import ShardedSampler

    eos, pad = pre.special.eos_ids, pre.special.pad_id
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    sampler = ShardedSampler(pre.model(), eos, pad, mesh) if mesh else Sampler(pre.model(), eos_ids=eos, pad_id=pad)
    cfg = SamplingConfig(num_samples=1, max_new_tokens=int(max_new_tokens), temperature=0.0)
    return Decoder(pre, sampler, cfg, tasks.get(task).skip_special_tokens, mesh)


def greedy_decode(decoder: Decoder, batch, examples: Sequence[Any]) -> list[Completion]:
    """Greedy completions of a prompt batch, one per row (`examples`: the batch's rows, None
    for padding; not needed to decode, there so that tests can substitute known answers)."""
    import jax
    import jax.numpy as jnp

    if decoder.mesh is not None:
        from pr1_jax import sharding

        inputs = sharding.shard_batch(batch.inputs, decoder.mesh)  # this (single) process's whole batch
    else:
        inputs = jax.tree.map(jnp.asarray, batch.inputs)
    out = decoder.sampler(decoder.pre.params, inputs, jax.random.PRNGKey(0), decoder.cfg)
    tokens, lengths = np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0])
    eos = set(decoder.pre.special.eos_ids)
    rows, stopped = [], []
    for t, n in zip(tokens, lengths):
        ids = t[:int(n)]
        stop = len(ids) > 0 and int(ids[-1]) in eos
        rows.append(ids[:-1] if stop else ids)
        stopped.append(stop)
    texts = chat.decode_batch(decoder.pre.tokenizer, rows, skip_special_tokens=decoder.skip_special_tokens)
    return [Completion(text, int(n), s) for text, n, s in zip(texts, lengths, stopped)]


def eval_mesh(devices: int, batch_size: int):
    """The mesh `devices` asks for (all of this process's devices on the batch), None for one."""
    import jax

    from pr1_jax import sharding

    local = jax.local_devices()
    if devices < 0 or devices > len(local):
        raise ConfigError(f"devices must be in 0..{len(local)} (0 = all {len(local)} of this process), got {devices}")
    n = devices or len(local)
    if n == 1:
        return None
    if batch_size % n:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of the {n} devices that decode it "
                          f"(--batch_size={-(-batch_size // n) * n}, or --devices=1)")
    return sharding.make_mesh(fsdp=n, devices=local[:n])
