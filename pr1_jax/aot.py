"""Ahead-of-time check: compile the rollout (prefill, decode) and update programs for a TPU
slice that is not here, and print each program's memory per device — an OOM shows up before
the slice is rented. The programs are those `train.py` builds from the same config
(`pr1_jax.programs.Programs`), at the largest shapes the config allows (its caps).

    python -m pr1_jax.aot --topology=v5e-8 --config=configs/grounding.py --model=qwen2_vl_2b \\
        --mesh=data=1,fsdp=-1,tensor=1 --config.batch.prompts_per_micro=8
    python -m pr1_jax.aot --topology=cpu-8 --config=configs/demo.py   # the fake 8-CPU mesh

Shapes come from the training config (prompts per step and micro-batch — with 0, all of
them, the first candidate training tries — G, prompt and patch caps, new tokens, dtype,
remat, LM-head chunk); the model from `--model` (a preset) or
`--model_dir` (only its config.json is read). Nothing is allocated: parameters, optimizer
state and batches are `jax.ShapeDtypeStruct`s carrying their shardings.

TPU topologies need libtpu (the compiler) but no TPU: `pip install "jax[tpu]==<your jax>"`,
or keep it out of a CPU venv with `pip install --target DIR libtpu==<pin of jax[tpu]>` and
`TPU_LIBRARY_PATH=DIR/libtpu/libtpu.so` (jax 0.10.2 pins libtpu 0.0.42.*).
`jax.experimental.topologies.get_topology_desc` then describes the slice's devices to the
compiler. `cpu-N` compiles for N host devices of this process instead (any machine).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from pr1_jax import cli, sharding, train_state, train_step
from pr1_jax.errors import ConfigError
from pr1_jax.model.config import PRESETS, ModelConfig
from pr1_jax.structs import ModelInputs
from pr1_jax.programs import Programs
from pr1_jax.structs import SamplingConfig

# name → (get_topology_desc name, its options, HBM GiB per JAX device). v4/v5p: one device
# per chip (megacore); v5e/v6e single-host slices have 8 chips on one host.
TOPOLOGIES: dict[str, tuple[str, dict, float]] = {
    "v4-8": ("v4:2x2x1", dict(chip_config_name="megacore"), 32),
    "v4-16": ("v4:2x2x2", dict(chip_config_name="megacore"), 32),
    "v5e-4": ("v5e:2x2", {}, 16),
    "v5e-8": ("v5e:2x4", dict(chips_per_host_bounds=(2, 4, 1)), 16),
    "v5e-16": ("v5e:4x4", {}, 16),
    "v5e-32": ("v5e:4x8", {}, 16),
    "v5p-8": ("v5p:2x2x1", dict(chip_config_name="megacore"), 95),
    "v5p-16": ("v5p:2x2x2", dict(chip_config_name="megacore"), 95),
    "v6e-8": ("v6e:2x4", dict(chips_per_host_bounds=(2, 4, 1)), 32),
    "v6e-16": ("v6e:4x4", {}, 32),
    # pod slices (several hosts; compiled here for all their chips at once)
    "v5e-64": ("v5e:8x8", {}, 16),
    "v5p-128": ("v5p:4x4x4", dict(chip_config_name="megacore"), 95),
    "v6e-64": ("v6e:8x8", {}, 32),
}
# Published per-chip figures (docs.cloud.google.com/tpu/docs/v5e, /v5p, /v6e, read 2026-12-02):
# peak bf16 FLOP/s, HBM bytes/s, bidirectional ICI bytes/s. One JAX device per chip.
CHIPS: dict[str, tuple[float, float, float]] = {
    "v5e": (197e12, 819e9, 400e9),
    "v5p": (459e12, 2765e9, 1200e9),
    "v6e": (918e12, 1638e9, 800e9),
}


def topology_devices(topology: str) -> tuple[list[Any], float | None]:
    """Devices of a named slice (compile-only for TPU) and their HBM in bytes (None: unknown)."""
    if topology.startswith("cpu-"):
        n = topology.split("-", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--topology={topology}: expected cpu-N with N ≥ 1 host devices, e.g. cpu-8")
        n = int(n)
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ConfigError(f"--topology={topology}: only {len(devices)} CPU devices; set "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts")
        return devices[:n], None
    from jax.experimental import topologies

    name, kwargs, gib = TOPOLOGIES.get(topology, (topology, {}, None))
    try:
        desc = topologies.get_topology_desc(name, "tpu", **kwargs)
    except RuntimeError as e:  # no libtpu, or a name it does not know: both fixed on the command line
        raise ConfigError(f"--topology={topology}: cannot describe this TPU topology ({cli.one_line(e)}); the "
                          f"names: {', '.join(TOPOLOGIES)}, a raw one such as v5e:4x4 (needs libtpu: see "
                          f"`python -m pr1_jax.aot --help`), or cpu-N") from e
    return list(desc.devices), None if gib is None else gib * 2**30


def program_shapes(cfg, mesh, *, prompts_per_step: int, prompts_per_micro: int, num_generations: int,
                   seq_len: int, patch_row_len: int, max_new_tokens: int, dtype: Any = jnp.bfloat16,
                   optimizer=None):
    """ShapeDtypeStructs (with shardings) of params, train state, one step's Rollouts and the
    rollout prompts, at the caps: the largest programs a run with these settings compiles
    (a step's shapes are rungs at most these: `pr1_jax.shapes`; T = max_new_tokens loss
    positions; every completion max_new_tokens long, one row each — the costliest packing)."""
    optimizer = optimizer or train_step.make_optimizer(train_step.OptimConfig())
    state = train_state.abstract_train_state(cfg, optimizer, mesh, dtype=dtype)
    params = state.params

    def inputs(b: int, lead: tuple[int, ...] = ()) -> ModelInputs:
        f = cfg.vision.patch_dim
        i32 = lambda *s: jax.ShapeDtypeStruct(lead + s, jnp.int32)  # noqa: E731
        return ModelInputs(input_ids=i32(b, seq_len), attention_mask=jax.ShapeDtypeStruct(lead + (b, seq_len), bool),
                           positions=i32(3, b, seq_len), pixels=jax.ShapeDtypeStruct(lead + (b, patch_row_len, f),
                                                                                     jnp.float32),
                           segment_ids=i32(b, patch_row_len), pos_hw=i32(b, patch_row_len, 2),
                           vision_index=i32(b, seq_len), image_patches=i32(b, 1, patch_row_len))

    if prompts_per_step % prompts_per_micro:
        raise ConfigError(f"batch.prompts_per_step={prompts_per_step} is not a multiple of "
                          f"batch.prompts_per_micro={prompts_per_micro}: change one of them (--config.batch.…)")
    m, b, g, tc = prompts_per_step // prompts_per_micro, prompts_per_micro, num_generations, max_new_tokens
    sds = lambda shape, dt: jax.ShapeDtypeStruct((m, b) + shape, dt)  # noqa: E731
    packed = train_step.Completions(tokens=sds((g, tc), jnp.int32), sample=sds((g, tc), jnp.int32),
                                    offset=sds((g, tc), jnp.int32), group=sds((g,), jnp.int32),
                                    unpack=sds((g, tc), jnp.int32))
    batch = train_step.Rollouts(prompts=inputs(b, (m,)), completions=packed,
                                mask=sds((g, tc), bool), advantages=sds((g,), jnp.float32),
                                old_logp=sds((g, tc), jnp.float32), group_weight=sds((g,), jnp.float32))
    prompts = inputs(prompts_per_step)
    with_sh = lambda tree: jax.tree.map(  # noqa: E731
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree,
        sharding.batch_shardings(tree, mesh))
    return params, state, with_sh(batch), with_sh(prompts), optimizer


def lower_programs(programs: Programs, *, sampling: SamplingConfig, prompts_per_step: int, prompts_per_micro: int,
                   seq_len: int, patch_row_len: int) -> dict[str, Any]:
    """{"update", "prefill", "decode"} lowered for abstract arguments at the caps, built by the
    program builder `train.py` uses (`pr1_jax.programs.Programs`)."""
    params, state, batch, prompts, _ = program_shapes(
        programs.cfg, programs.mesh, prompts_per_step=prompts_per_step, prompts_per_micro=prompts_per_micro,
        num_generations=sampling.num_samples, seq_len=seq_len, patch_row_len=patch_row_len,
        max_new_tokens=sampling.max_new_tokens, dtype=programs.dtype, optimizer=programs.optimizer)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(programs.mesh))
    return {"update": programs.lower_update(state, params, batch), **programs.sampler.lower(params, prompts, rng,
                                                                                           sampling)}


def compile_programs(programs: Programs, *, sampling: SamplingConfig, prompts_per_step: int, prompts_per_micro: int,
                     seq_len: int, patch_row_len: int,
                     compiler_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`lower_programs`, compiled: the executables, callable on real data of those shapes."""
    lowered = lower_programs(programs, sampling=sampling, prompts_per_step=prompts_per_step,
                             prompts_per_micro=prompts_per_micro, seq_len=seq_len, patch_row_len=patch_row_len)
    opts = dict(compiler_options or {})
    return {name: low.compile(opts) for name, low in lowered.items()}


def memory_report(compiled: Mapping[str, Any], hbm_bytes: float | None = None) -> dict[str, dict[str, float]]:
    """Per program and device: argument, output, temp, alias, code bytes and their peak sum."""
    out = {}
    for name, exe in compiled.items():
        m = exe.memory_analysis()
        row = {k: float(getattr(m, f"{k}_size_in_bytes", 0) or 0)
               for k in ("argument", "output", "temp", "alias", "generated_code")}
        row["peak"] = row["argument"] + row["output"] + row["temp"] - row["alias"] + row["generated_code"]
        if hbm_bytes:
            row["hbm"] = float(hbm_bytes)
        out[name] = row
    return out


def format_report(report: Mapping[str, Mapping[str, float]], title: str) -> str:
    gib = lambda x: f"{x / 2**30:8.3f}"  # noqa: E731
    cols = ("argument", "output", "alias", "temp", "generated_code", "peak")
    lines = [title, f"{'program':10s}" + "".join(f"{c[:9]:>10s}" for c in cols) + "   (GiB per device)"]
    for name, row in report.items():
        verdict = ""
        if "hbm" in row:
            verdict = f"   {'fits' if row['peak'] <= row['hbm'] else 'DOES NOT FIT'} in {row['hbm'] / 2**30:.0f} GiB"
        lines.append(f"{name:10s}" + "".join(f"{gib(row[c]):>10s}" for c in cols) + verdict)
    return "\n".join(lines)


def roofline_report(compiled: Mapping[str, Any], topology: str, num_devices: int) -> str:
    """Per program and device: matmul FLOPs, HBM bytes, collectives by kind (count, GB) from the
    optimized HLO with loops counted as they run (`pr1_jax.hlo_stats`), and a roofline estimate
    of one execution: the largest of FLOPs / peak, bytes / HBM bandwidth, wire bytes / (ICI / 2)
    (a device sends at most half its bidirectional ICI bandwidth) — a lower bound on its time."""
    from pr1_jax.hlo_stats import KINDS, program_stats

    chip = CHIPS.get(TOPOLOGIES.get(topology, (topology,))[0].split(":")[0].split("-")[0])
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
             "collective-permute": "CP"}
    lines = [f"{'program':10s}{'TFLOP':>9s}{'HBM GB':>9s}{'wire GB':>9s}  collectives (count / GB result)"
             + ("   roofline ms: flops  hbm  ici  → bound" if chip else "")]
    for name, exe in compiled.items():
        st = program_stats(exe.as_text(), num_devices)
        coll = ", ".join(f"{short[k]} {st.collectives[k]['count']:.0f}/{st.collectives[k]['bytes'] / 1e9:.2f}"
                         for k in KINDS if st.collectives[k]["count"])
        row = f"{name:10s}{st.flops / 1e12:9.2f}{st.hbm_bytes / 1e9:9.2f}{st.wire_bytes / 1e9:9.3f}  {coll or '-'}"
        if chip:
            t = (st.flops / chip[0], st.hbm_bytes / chip[1], st.wire_bytes / (chip[2] / 2))
            row += "   " + "  ".join(f"{1e3 * x:.1f}" for x in t) + f"  → {1e3 * max(t):.1f}"
        if st.unknown_loops:
            row += f"   ({st.unknown_loops} loop(s) of unknown trip count counted once: one decode chunk)"
        lines.append(row)
    return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
    """Parses "data=1,fsdp=-1,tensor=1" into {"data": 1, "fsdp": -1, "tensor": 1}."""
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise ConfigError(f"--mesh={text}: expected AXIS=SIZE pairs such as data=1,fsdp=-1,tensor=1") from None
    return out


def main(argv) -> None:
    del argv
    c, f = _CONFIG.value, _FLAGS
    if f.model_dir:
        cfg = ModelConfig.from_pretrained(cli.model_dir(f.model_dir, "--model_dir"))
    elif f.model in PRESETS:
        cfg = PRESETS[f.model]()
    else:
        raise ConfigError(f"--model={f.model}: not a preset; the presets: {', '.join(PRESETS)} (or --model_dir=DIR)")
    cli.check_training_config(c)
    devices, hbm = topology_devices(f.topology)
    mesh_cfg = parse_mesh(f.mesh) if f.mesh else dict(c.get("mesh", {}) or {})
    mesh = cli.as_config_error("--mesh" if f.mesh else "config.mesh", sharding.mesh_from_config, mesh_cfg, devices)
    batch_ways = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    micro = c.batch.prompts_per_micro or c.batch.prompts_per_step  # auto: the first candidate train.py tries
    if micro % batch_ways:
        print(f"note: prompts_per_micro={micro} does not split over data×fsdp={batch_ways}: "
              "the update batch is replicated (set --config.batch.prompts_per_micro to a multiple)")
    programs = Programs.from_config(c, cfg, mesh, eos_ids=(151645, 151643), pad_id=151643, budget=None)
    g = programs.grpo_cfg.num_generations
    sampling = SamplingConfig(num_samples=g, max_new_tokens=c.sampling.max_new_tokens,
                              top_p=c.sampling.top_p, top_k=c.sampling.top_k)
    compiled = compile_programs(programs, sampling=sampling, prompts_per_step=c.batch.prompts_per_step,
                                prompts_per_micro=micro, seq_len=c.batch.seq_len,
                                patch_row_len=c.batch.patch_row_len)
    title = (f"{f.topology} ({len(devices)} × {devices[0].device_kind}), mesh {dict(mesh.shape)}, "
             f"model {f.model_dir or f.model}, {c.batch.prompts_per_step} prompts × G={g}, "
             f"micro {micro}, seq {c.batch.seq_len}, patches {c.batch.patch_row_len}, "
             f"new {c.sampling.max_new_tokens}, {c.dtype}, remat={c.remat} ({programs.remat_policies[0]}), "
             f"attention {programs.kernels.attention}, decode {programs.kernels.decode_attention}")
    print(format_report(memory_report(compiled, hbm), title))
    # Pallas kernels lowered by Mosaic (TPU): the proof that the TPU attention kernels compiled.
    mosaic = {name: exe.as_text().count('custom_call_target="tpu_custom_call"') for name, exe in compiled.items()}
    if any(mosaic.values()):
        print("Pallas TPU kernel calls per program: " + ", ".join(f"{k} {v}" for k, v in mosaic.items()))
    print(roofline_report(compiled, f.topology, len(devices)))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", "configs/grounding.py", "training config (shapes)")
    flags.DEFINE_string("topology", "v5e-8", f"one of {sorted(TOPOLOGIES)}, a raw name such as 'v5e:4x4', or cpu-N")
    flags.DEFINE_string("model", "qwen2_vl_2b", "model preset (pr1_jax.model.config.PRESETS)")
    flags.DEFINE_string("model_dir", "", "HF checkpoint directory (config.json only); overrides --model")
    flags.DEFINE_string("mesh", "", "mesh sizes, e.g. data=1,fsdp=-1,tensor=1 (default: the config's `mesh`, "
                                    "else all devices on fsdp)")
    _FLAGS = flags.FLAGS
    cpu = [a.split("-")[-1] for a in sys.argv if a.startswith("--topology=cpu-")]
    if cpu and cpu[-1].isdigit():  # fake host devices, set before jax starts its backends
        jax.config.update("jax_num_cpu_devices", int(cpu[-1]))
    sys.exit(cli.run("pr1_jax.aot", app.run, main, flags_parser=cli.absl_flags("pr1_jax.aot")))
