"""The one program builder: (config, model config, mesh) → the jitted programs of a run.

    programs = Programs.from_config(c, model_cfg, mesh, eos_ids, pad_id)
    out = programs.rollout(params, inputs, key, sampling, timings=t)     # prefill + decode
    batch = programs.update_batch(state, ref_params, make_batch, prompts, shards)  # micro-batch size
    state, metrics = programs.update(state, ref_params, batch)           # GRPO step
    state, metrics = programs.sft(state, batch, sft_optimizer)           # SFT warm-up step
    programs.lower_update(state, ref_params, batch)                      # the same program, lowered (AOT)

`train.py`, `aot.py` and the benchmarks build their programs here, so a benchmark measures
and the AOT report describes exactly what training runs. Kernel choices live here too
(`resolve_kernels`): the fastest that the backend and mesh allow, unless the config names one.

Shapes vary per step (`pr1_jax.shapes`): each distinct (prompt shape, completion shape) is
compiled once, the first time it is seen, and counted (`compile_events`). For the update the
micro-batch size and remat policy may be left to the builder (`batch.prompts_per_micro=0`,
`remat_policy="auto"`): it compiles the candidates from the fastest down — all of the
step's prompts in one micro-batch, fewer saved activations before more — and keeps the
first whose compiled memory fits the device (`memory_budget`). Every micro-batching gives
the same gradients for PR1's loss (a mean of equal-sized micro-batch means is the batch
mean; tests/test_programs.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from pr1_jax import grpo, sharding, train_state, train_step
from pr1_jax.errors import ConfigError
from pr1_jax.model import layers
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.sampler import DECODE_ATTENTION
from pr1_jax.structs import SampleOutput, SamplingConfig
from pr1_jax.sharded_sampler import ShardedSampler

log = logging.getLogger("pr1_jax.programs")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Implementation choices that never change the math (benchmarks/RESULTS.md has timings)."""

    attention: str  # training / scoring / prefill: layers.ATTENTION_IMPLS ("xla" | "cudnn" | "splash" | "auto")
    decode_attention: str  # decode-step attention: sampler.DECODE_ATTENTION ("xla" | "pallas" | "pallas_tpu")


def _nvidia_gpu(mesh) -> bool:
    d = mesh.devices.flat[0]
    return d.platform == "gpu" and "NVIDIA" in d.device_kind


def _tpu(mesh) -> bool:
    """TPU devices, also compile-only ones (`pr1_jax.aot`: a topology described by libtpu)."""
    return mesh.devices.flat[0].platform == "tpu"


def resolve_kernels(attention: str, decode_attention: str, mesh) -> Kernels:
    """"auto" → the fastest choice for the mesh: on TPU the Pallas TPU kernels (splash attention
    for training, scoring and prefill; the decode kernel `tpu_decode_attention`, both wrapped in
    shard_map so any mesh size works); on NVIDIA GPUs cuDNN flash attention (where the shapes
    allow, decided per call: `layers.attention`) and the fused Pallas decode step (on a mesh of
    several GPUs under shard_map: `decode_attention`; `train.py` checks that the batch shards
    divide every batch, which it needs); XLA everywhere else (CPU)."""
    if attention not in layers.ATTENTION_IMPLS:
        raise ConfigError(f"attention must be one of {layers.ATTENTION_IMPLS}, got {attention!r}")
    if decode_attention not in DECODE_ATTENTION + ("auto",):
        raise ConfigError(f"sampling.decode_attention must be one of {DECODE_ATTENTION + ('auto',)}, "
                          f"got {decode_attention!r}")
    if attention == "auto" and _tpu(mesh):
        attention = "splash"
    if decode_attention == "auto":
        decode_attention = ("pallas_tpu" if _tpu(mesh) else
                            "pallas" if _nvidia_gpu(mesh) else "xla")
    return Kernels(attention=attention, decode_attention=decode_attention)


def enable_compile_cache(path: str) -> str | None:
    """JAX's persistent compilation cache in `path` ("" = off): a rerun, a resume after
    preemption or a run of the same shapes loads its programs instead of compiling them again
    (the update of a 2B model compiles in 10–75 s on an H200). A cache set already (e.g. by
    JAX_COMPILATION_CACHE_DIR) is kept. Returns the directory in use, or None."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if not path:
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # small programs: not worth a file
    return path


def memory_budget(mesh, fraction: float = 0.92) -> float | None:
    """Bytes a program may use per device (`fraction` of the allocator's limit); None when the
    backend does not say (CPU): then the largest candidate is taken."""
    try:
        stats = mesh.devices.flat[0].memory_stats()
    except Exception:  # noqa: BLE001  backends without memory statistics
        return None
    return stats["bytes_limit"] * fraction if stats and "bytes_limit" in stats else None


def program_bytes(compiled) -> float:
    """Peak bytes per device of a compiled program: arguments + outputs + temporaries − aliased."""
    m = compiled.memory_analysis()
    get = lambda k: float(getattr(m, f"{k}_size_in_bytes", 0) or 0)  # noqa: E731
    return get("argument") + get("output") + get("temp") - get("alias") + get("generated_code")


# What "auto" tries, fastest first: with cuDNN attention, keeping the matmul and flash outputs
# (no recomputed forward) is 15% faster than full remat (RESULTS.md); else full remat only.
_AUTO_REMAT = {"cudnn": ("dots_flash", "full"), "xla": ("full",)}


class Programs:
    """The jitted programs of one run, compiled per shape on first use (module docstring)."""

    def __init__(self, model_cfg: ModelConfig, mesh, *, dtype: Any, optimizer: optax.GradientTransformation,
                 grpo_cfg: grpo.GRPOConfig, eos_ids: Sequence[int], pad_id: int, kernels: Kernels,
                 remat: bool = True, remat_policy: str = "full", vision_remat_policy: str | None = None,
                 scan_unroll: int = 1, vision_scan_unroll: int = 1, chunk_size: int = 128, prompts_per_micro: int = 0,
                 steps_per_check: int = 16, budget: float | None | str = "device"):
        self.cfg, self.mesh, self.dtype = model_cfg, mesh, dtype
        self.optimizer, self.grpo_cfg, self.kernels = optimizer, grpo_cfg, kernels
        self.chunk_size, self.prompts_per_micro = chunk_size, prompts_per_micro
        self.budget = memory_budget(mesh) if budget == "device" else budget
        self._model_kw = dict(dtype=dtype, param_dtype=dtype, remat=remat, scan_unroll=scan_unroll,
                              vision_scan_unroll=vision_scan_unroll, vision_remat_policy=vision_remat_policy,
                              attention=kernels.attention)
        cudnn = kernels.attention == "cudnn" or (kernels.attention == "auto" and _nvidia_gpu(mesh))
        self.remat_policies = _AUTO_REMAT["cudnn" if cudnn else "xla"] if remat_policy == "auto" else (remat_policy,)
        self.sampler = ShardedSampler(Qwen2VL(model_cfg, dtype=dtype, param_dtype=dtype, attention=kernels.attention),
                                      eos_ids, pad_id, mesh, steps_per_check=steps_per_check,
                                      decode_attention=kernels.decode_attention)
        self._update_fns: dict[str, Any] = {}
        self._sft_fn = None
        self._compiled: dict[tuple, Any] = {}  # (program, shapes...) → compiled executable
        self._choice: dict[tuple, tuple[int, str]] = {}  # update shape key → (prompts per micro, remat policy)
        self._micro_of_step: dict[Any, int] = {}  # a step's shapes (caller's key) → prompts per micro-batch
        self._misfits: dict[str, list[tuple[int, int]]] = {}  # remat policy → footprints that did not fit
        self.compile_events: list[dict] = []  # one entry per program compiled (kind, shapes, seconds)

    @classmethod
    def from_config(cls, c, model_cfg: ModelConfig, mesh, eos_ids: Sequence[int], pad_id: int, *,
                    total_steps: int = 1000, budget: float | None | str = "device") -> "Programs":
        """The programs `c` asks for (config keys of `configs/common.py`)."""
        optimizer = train_step.make_optimizer(train_step.OptimConfig(
            learning_rate=c.optim.learning_rate, total_steps=total_steps, schedule=c.optim.schedule,
            max_grad_norm=c.optim.max_grad_norm, weight_decay=c.optim.weight_decay, eps=c.optim.eps))
        return cls(model_cfg, mesh, dtype=jnp.dtype(c.dtype), optimizer=optimizer,
                   grpo_cfg=grpo.GRPOConfig(**c.grpo.to_dict()), eos_ids=eos_ids, pad_id=pad_id,
                   kernels=resolve_kernels(c.attention, c.sampling.decode_attention, mesh), remat=c.remat,
                   remat_policy=c.remat_policy, scan_unroll=c.scan_unroll, vision_scan_unroll=c.vision_scan_unroll,
                   chunk_size=c.chunk_size, prompts_per_micro=c.batch.prompts_per_micro, budget=budget)

    def model(self, remat_policy: str | None = None) -> Qwen2VL:
        """The training model (remat policy: the first candidate unless named)."""
        return Qwen2VL(self.cfg, remat_policy=remat_policy or self.remat_policies[0], **self._model_kw)

    # ------------------------------------------------------------------ rollout / evaluation decode
    def rollout(self, params, inputs, rng, sampling: SamplingConfig, *, end_at=None,
                timings: dict | None = None) -> SampleOutput:
        """Prefill + decode (`ShardedSampler`); counts the programs it compiles."""
        before = self.sampler.num_compiled()
        t0 = time.perf_counter()
        out = self.sampler(params, inputs, rng, sampling, end_at=end_at, timings=timings)
        if self.sampler.num_compiled() > before:
            jax.block_until_ready(out)
            self._event("rollout", tuple(inputs.input_ids.shape) + tuple(inputs.pixels.shape[1:2]),
                        time.perf_counter() - t0, self.sampler.num_compiled() - before)
        return out

    def compile_rollout_ahead(self, params, inputs, rng, sampling: SamplingConfig, *, end_at=None) -> int:
        """Compiles the rollout of these shapes on a background thread
        (`ShardedSampler.compile_ahead`): a later call with them waits at most for the rest of
        that compile. Logged as a "rollout_ahead" event; how many programs were scheduled."""
        n = self.sampler.compile_ahead(params, inputs, rng, sampling, end_at=end_at)
        if n:
            shapes = tuple(inputs.input_ids.shape) + tuple(inputs.pixels.shape[1:2]) + (sampling.num_samples,)
            self.compile_events.append({"program": "rollout_ahead", "shapes": [int(x) for x in shapes],
                                        "seconds": 0.0, "count": n})
            log.info("compiling the rollout for shapes %s (G = %d) ahead, in the background", shapes[:-1],
                     sampling.num_samples)
        return n

    # ------------------------------------------------------------------ GRPO update
    def update_fn(self, remat_policy: str):
        """The jitted GRPO update for one remat policy (state donated; `shard_update_fn` below)."""
        if remat_policy not in self._update_fns:
            self._update_fns[remat_policy] = shard_update_fn(
                self.model(remat_policy), self.optimizer, self.grpo_cfg, self.mesh, chunk_size=self.chunk_size)
        return self._update_fns[remat_policy]

    def lower_update(self, state, ref_params, batch, remat_policy: str | None = None):
        """The update program for these (abstract or concrete) arguments, lowered."""
        return self.update_fn(remat_policy or self.remat_policies[0]).lower(state, ref_params, batch)

    def update(self, state, ref_params, batch: train_step.Rollouts):
        """One GRPO optimizer step on a batch laid out by `rollouts.assemble` + `shard_batch`."""
        key = ("update",) + _shape_key(batch)
        if key not in self._compiled:
            _, policy = self._choice.get(key[3:], (None, self.remat_policies[0]))
            t0 = time.perf_counter()
            self._compiled[key] = self.lower_update(state, ref_params, batch, policy).compile()
            self._event("update", key[1:], time.perf_counter() - t0)
        return self._compiled[key](state, ref_params, batch)

    def update_batch(self, state, ref_params, make_batch, prompts: int, shards: int, step_key=None):
        """The step's batch split into micro-batches of the chosen size (and its remat policy).

        Candidates: the configured `prompts_per_micro`, or with 0 (auto) every multiple of the
        mesh's batch shards that divides the step, largest first; each with the remat policies
        from the fastest. The first compiled update that fits `self.budget` is kept for this
        step's shapes. `make_batch(prompts_per_micro)` returns the step's (sharded) batch split
        that way. Without a budget (CPU) the first candidate is taken; the last one is taken
        when none fits (the compiler's out-of-memory error is then the honest answer).
        `step_key` (hashable, e.g. the step's prompt and completion shapes): a step whose key
        was seen builds its batch once, at the chosen size, without a probe.
        """
        if step_key is not None and step_key in self._micro_of_step:
            return make_batch(self._micro_of_step[step_key])
        sizes = ([self.prompts_per_micro] if self.prompts_per_micro else
                 [b for b in range(prompts, 0, -1) if prompts % b == 0 and b % shards == 0] or [prompts])
        probe = make_batch(sizes[0])
        key = _shape_key(probe)[2:]  # the step's shapes, without (M, B)
        per_prompt = _per_prompt(_shape_key(probe))
        if key in self._choice:
            b = self._choice[key][0]
            if step_key is not None:
                self._micro_of_step[step_key] = b
            return probe if b == sizes[0] else make_batch(b)
        combos = [(policy, b) for policy in self.remat_policies for b in sizes]
        if len(combos) == 1:
            self._choice[key] = (sizes[0], self.remat_policies[0])
            if step_key is not None:
                self._micro_of_step[step_key] = sizes[0]
            return probe
        tried = []
        t0 = time.perf_counter()  # the compile time of every candidate tried, the rejected ones too
        for policy, b in combos:
            footprint = tuple(b * x for x in per_prompt)
            if (policy, b) != combos[-1] and self._known_misfit(policy, footprint):
                tried.append(f"{b} × {policy}: skipped (a smaller micro-batch did not fit)")
                continue
            batch = probe if b == sizes[0] else make_batch(b)
            compiled = self.lower_update(state, ref_params, batch, policy).compile()
            need = program_bytes(compiled)
            tried.append(f"{b} × {policy}: {need / 2**30:.1f} GiB")
            fits = self.budget is None or need <= self.budget
            if not fits:
                self._misfits.setdefault(policy, []).append(footprint)
            if fits or (policy, b) == combos[-1]:
                self._compiled[("update",) + _shape_key(batch)] = compiled
                self._choice[key] = (b, policy)
                if step_key is not None:
                    self._micro_of_step[step_key] = b
                self._event("update", _shape_key(batch), time.perf_counter() - t0,
                            count=sum("skipped" not in t for t in tried))
                log.info("update: %d prompts per micro-batch, remat %s (tried %s; budget %s)", b, policy,
                         ", ".join(tried), "none" if self.budget is None else f"{self.budget / 2**30:.1f} GiB")
                return batch
        raise AssertionError("unreachable: the last candidate is always taken")

    def _known_misfit(self, policy: str, footprint: tuple[int, int]) -> bool:
        """Whether a micro-batch of this `footprint` is at least as large as one that did not fit
        under `policy` (then it cannot fit either: a program's memory grows with its tokens and
        patches), so it need not be compiled to find out."""
        return any(all(a >= b for a, b in zip(footprint, seen)) for seen in self._misfits.get(policy, ()))

    def update_choice(self, batch: train_step.Rollouts) -> tuple[int, str]:
        """(prompts per micro-batch over all processes, remat policy) of the update for `batch`."""
        key = _shape_key(batch)
        b, policy = self._choice.get(key[2:], (key[1], self.remat_policies[0]))
        return int(b), policy

    # ------------------------------------------------------------------ SFT
    def sft(self, state, batch: train_step.Rollouts, optimizer: optax.GradientTransformation):
        """One supervised step (`train_step.sft_update`) with the warm-up's `optimizer`
        (one per run: the program is built for the first one it is given)."""
        key = ("sft",) + _shape_key(batch)
        if key not in self._compiled:
            t0 = time.perf_counter()
            if self._sft_fn is None:
                self._sft_fn = shard_sft_fn(self.model(self.remat_policies[-1]), optimizer, self.mesh,
                                                     chunk_size=self.chunk_size)
            self._compiled[key] = self._sft_fn.lower(state, batch).compile()
            self._event("sft", key[1:], time.perf_counter() - t0)
        return self._compiled[key](state, batch)

    # ------------------------------------------------------------------ accounting
    def _event(self, kind: str, shapes: tuple, seconds: float, count: int = 1) -> None:
        self.compile_events.append({"program": kind, "shapes": [int(s) for s in shapes], "seconds": round(seconds, 2),
                                    "count": count})
        log.info("compiled %s for shapes %s in %.1f s (%d programs so far)", kind, shapes, seconds,
                 self.num_compiled())

    def num_compiled(self) -> int:
        """Programs compiled so far where they were used: rollout (prefill, decode) and
        update/SFT shapes (those compiled ahead are counted by their "rollout_ahead" events)."""
        return self.sampler.num_compiled() + len(self._compiled)


# ------------------------------------------------------------------ jitted programs on the mesh
def shard_update_fn(model: Qwen2VL, optimizer: optax.GradientTransformation, grpo_cfg, mesh,
                    rules: sharding.Rules = sharding.TRAIN_RULES, chunk_size: int = 128, batch_sharding: Any = None):
    """`train_step.make_update_fn` on the mesh: `update(state, ref_params, batch) -> (state, metrics)`.

    State and reference params in the training layout, metrics replicated, the state
    donated. `batch_sharding` defaults to the batch's own (`shard_batch`).
    """
    psh = sharding.param_shardings(model.cfg, mesh, rules)
    ssh = train_state.state_shardings(optimizer, psh, mesh)
    fn = functools.partial(train_step.grpo_update, model, optimizer, grpo_cfg, chunk_size=chunk_size)
    return jax.jit(sharding.with_rules(fn, mesh, rules), in_shardings=(ssh, psh, batch_sharding),
                   out_shardings=(ssh, sharding.replicated(mesh)), donate_argnums=(0,))


def shard_sft_fn(model: Qwen2VL, optimizer: optax.GradientTransformation, mesh,
                 rules: sharding.Rules = sharding.TRAIN_RULES, chunk_size: int = 128, batch_sharding: Any = None):
    """`train_step.make_sft_fn` on the mesh: `sft(state, batch) -> (state, metrics)`."""
    ssh = train_state.state_shardings(optimizer, sharding.param_shardings(model.cfg, mesh, rules), mesh)
    fn = functools.partial(train_step.sft_update, model, optimizer, chunk_size=chunk_size)
    return jax.jit(sharding.with_rules(fn, mesh, rules), in_shardings=(ssh, batch_sharding),
                   out_shardings=(ssh, sharding.replicated(mesh)), donate_argnums=(0,))


def shard_apply(fn: Callable, mesh, rules: sharding.Rules = sharding.TRAIN_RULES, **jit_kwargs):
    """Any function of (params, batch, ...) jitted on the mesh with the rules in context
    (evaluation forward passes, parity tests). Shardings come from the arguments."""
    return jax.jit(sharding.with_rules(fn, mesh, rules), **jit_kwargs)


def _per_prompt(shape_key: tuple[int, ...]) -> tuple[float, float]:
    """(decoder tokens, vision patches) per prompt of a micro-batch of `_shape_key` shape: what
    its activations, and so its memory, grow with (times the prompts of a micro-batch)."""
    _, b, p, r_img, n, _, _, _, k, r, t, pq = shape_key
    return (k * pq if pq else b * p) / b + k * r * t / b, r_img * n / b


def _shape_key(batch: train_step.Rollouts) -> tuple[int, ...]:
    """(M, B, prompt tokens P, image rows, patches per row N, images per row J, patches per image,
    loss positions L, completion blocks K, rows per block R, row length T, packed prompt tokens
    per block Pq or 0)."""
    m, k, r, t = batch.completions.tokens.shape
    r_img, n = batch.prompts.pixels.shape[-3:-1]
    j, l_img = batch.prompts.image_patches.shape[-2:]
    pq = 0 if batch.completions.prompt_pack is None else batch.completions.prompt_pack.shape[-1]
    return (m, batch.mask.shape[1], batch.prompts.input_ids.shape[-1], r_img, n, j, l_img, batch.mask.shape[-1],
            k, r, t, pq)
