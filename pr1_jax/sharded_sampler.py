"""The rollout on a device mesh: `Sampler` with its prompts, outputs and prefix split along
the batch (data × fsdp) and the weights in the sampling layout (`sharding.SAMPLE_RULES`).

    sampler = ShardedSampler(model, eos_ids, pad_id, mesh)
    out = sampler(params, sharding.shard_batch(inputs, mesh), rng, SamplingConfig(...))

Both programs are GSPMD, except with decode_attention="pallas": each layer's fused decode
kernel, which GSPMD cannot partition, runs under `shard_map` on the same mesh (rows over
data × fsdp, kv heads over tensor where it divides them: `model/decode_attention.py`), so
the number of prompts must be a multiple of data × fsdp.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pr1_jax import sampler as sampler_lib
from pr1_jax.executables import Executables, abstract
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.sharding import (SAMPLE_RULES, Rules, batch_shards, constrain_batch, logical_sharding, param_shardings,
                              replicated, with_rules)
from pr1_jax.structs import ModelInputs


class ShardedSampler(sampler_lib.Sampler):
    """`Sampler` on the mesh: prompts and outputs split along the batch (data × fsdp); the
    params, passed in any layout (the training one), are re-laid out at the start of each of
    the two programs (prefill, decode) into the sampling layout (`SAMPLE_RULES`), then read
    in place at every token. (With FSDP that is two weight all-gathers per rollout.)
    decode_attention="pallas": the fused decode kernel per device under shard_map (module
    docstring); the prompts must then split evenly over the batch axes."""

    def __init__(self, model: Qwen2VL, eos_ids: Sequence[int], pad_id: int, mesh: Mesh,
                 rules: Rules = SAMPLE_RULES, steps_per_check: int = 16, decode_attention: str = "xla"):
        # Compacting live rows gathers them across devices: one device (or batch shard) only.
        super().__init__(model, eos_ids, pad_id, steps_per_check, decode_attention=decode_attention,
                         compact=batch_shards(mesh, rules) == 1)
        self.mesh, self.rules = mesh, rules
        sample_sh = param_shardings(model.cfg, mesh, rules)

        def prefill(params, prompts):
            params = jax.lax.with_sharding_constraint(params, sample_sh)
            out = sampler_lib.prefill(model, params, constrain_batch(prompts, mesh, rules))
            return constrain_prefix(out, mesh, rules)

        def decode(params, prefix, rng, temperature, top_p, end_at, **static):
            params = jax.lax.with_sharding_constraint(params, sample_sh)
            prefix = constrain_prefix(prefix, mesh, rules)
            if end_at is not None:
                end_at = constrain_batch(end_at, mesh, rules)
            out = sampler_lib.decode(model, params, prefix, rng, temperature, top_p, end_at, **static)
            return constrain_batch(out, mesh, rules)

        # Executables rather than jit's cache, so that a rollout can be compiled ahead of use.
        self._prefill = Executables(jax.jit(with_rules(prefill, mesh, rules)))
        self._decode = Executables(jax.jit(with_rules(decode, mesh, rules), static_argnames=self.STATIC),
                                   self.STATIC)

    def __call__(self, params, prompts: ModelInputs, rng: jax.Array, cfg: sampler_lib.SamplingConfig,
                 *args, **kwargs) -> sampler_lib.SampleOutput:
        self._check_rows(prompts)
        return super().__call__(params, prompts, jax.device_put(rng, replicated(self.mesh)), cfg, *args, **kwargs)

    def scalars(self, cfg: sampler_lib.SamplingConfig) -> tuple[jax.Array, jax.Array]:
        # Placed as the programs expect them (an executable takes only the layouts it was built for).
        return jax.device_put(super().scalars(cfg), replicated(self.mesh))

    def num_compiled(self) -> int:
        """Programs compiled by rollouts (those compiled ahead are `num_compiled_ahead`)."""
        return self._prefill.num_compiled + self._decode.num_compiled

    def num_compiled_ahead(self) -> int:
        return self._prefill.num_ahead + self._decode.num_ahead

    def compile_ahead(self, params, prompts, rng, cfg: sampler_lib.SamplingConfig, end_at=None) -> int:
        """Compiles the rollout programs of these arguments (concrete or abstract: only their
        shapes and layouts count) on a background thread, so that the first rollout of this
        signature waits for nothing or less (`executables.py`). Returns how many programs were
        scheduled (0: compiled already)."""
        pre_args, dec_args, static = self._abstract_args(params, prompts, rng, cfg, end_at)
        return int(self._prefill.compile_ahead(*pre_args)) + int(self._decode.compile_ahead(*dec_args, **static))

    def _check_rows(self, prompts: ModelInputs) -> None:
        """Before any compile: the fused decode's shard_map needs the same rows on every device
        (GSPMD, with "xla", takes any count)."""
        rows, shards = np.shape(prompts.input_ids)[0], batch_shards(self.mesh, self.rules)
        if self.decode_attention == "pallas" and rows % shards:
            raise ValueError(f"decode_attention='pallas' on mesh {dict(self.mesh.shape)} needs a multiple of its "
                             f"{shards} batch shards (data × fsdp) of prompts, got {rows}: pad the batch or use 'xla'")

    def lower(self, params, prompts, rng, cfg: sampler_lib.SamplingConfig) -> dict[str, Any]:
        """The two rollout programs lowered for (abstract) arguments: {"prefill", "decode"},
        each to `.compile()` ahead of time."""
        pre_args, dec_args, static = self._abstract_args(params, prompts, rng, cfg)
        return {"prefill": self._prefill.lower(*pre_args), "decode": self._decode.lower(*dec_args, **static)}

    def _abstract_args(self, params, prompts, rng, cfg: sampler_lib.SamplingConfig, end_at=None):
        """The two programs' arguments as shapes and layouts: (prefill's, decode's, decode's static)."""
        self._check_rows(prompts)
        params, prompts, end_at = abstract(params), abstract(prompts), abstract(end_at)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(self.mesh))
        rng = jax.ShapeDtypeStruct(np.shape(rng), rng.dtype, sharding=replicated(self.mesh))
        prefix = jax.eval_shape(self._prefill.jitted, params, prompts)
        prefix = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), prefix,
                              prefix_shardings(prefix, self.mesh, self.rules))
        return (params, prompts), (params, prefix, rng, scalar, scalar, end_at), self.static_args(cfg)


def prefix_shardings(prefix: sampler_lib.Prefix, mesh: Mesh, rules: Rules = SAMPLE_RULES) -> sampler_lib.Prefix:
    """Shardings of a `Prefix`: rows over the batch axes (K/V carry the layers first)."""
    names = lambda x, at: tuple("batch" if i == at else None for i in range(np.ndim(x)))  # noqa: E731
    return sampler_lib.Prefix(
        logits=logical_sharding(names(prefix.logits, 0), np.shape(prefix.logits), mesh, rules),
        k=logical_sharding(names(prefix.k, 1), np.shape(prefix.k), mesh, rules),
        v=logical_sharding(names(prefix.v, 1), np.shape(prefix.v), mesh, rules),
        mask=logical_sharding(names(prefix.mask, 0), np.shape(prefix.mask), mesh, rules),
        next_pos=logical_sharding(names(prefix.next_pos, 0), np.shape(prefix.next_pos), mesh, rules))


def constrain_prefix(prefix: sampler_lib.Prefix, mesh: Mesh, rules: Rules = SAMPLE_RULES) -> sampler_lib.Prefix:
    return jax.lax.with_sharding_constraint(prefix, prefix_shardings(prefix, mesh, rules))
