"""Weak scaling of the GRPO update over one host's devices (issue #4): FSDP over N against 1.

    python3 benchmarks/bench_fsdp.py [--per_device=8x8] [--meshes="fsdp=1;fsdp=4;data=4"] \
        [--remat=full --chunk=256] [--out=benchmarks/fsdp.jsonl]

Every mesh gets the same work PER DEVICE: `--per_device` B prompts × G completions of 256
tokens (the `bench_model.py` prompts: a 448×448 image and 62 text tokens = 318 prompt
tokens), so a mesh of n devices updates on n·B prompts. The mesh of 1 device is the
first device alone. Each mesh builds the 2B model's parameters and train state in their
shards (`pr1_jax.sharding`: `make_mesh(devices=...)`, `init_params`, `init_train_state`),
splits the batch (`shard_batch`) and runs the sharded update (`shard_update_fn`, the
training layout `TRAIN_RULES`): one compile, one warm-up, then the best and the median of
`--repeats` steps. Reported per mesh: seconds/step, sequences/s per device, MFU per device
(FLOPs needed, `bench_model.update_flops`, over 989 TFLOP/s), the compiled program's memory
per device, and efficiency = (sequences/s per device on this mesh) / (on the 1-device mesh).
fsdp=N shards parameters, gradients and optimizer state and splits the batch; data=N
(plain data parallelism, parameters replicated, gradients all-reduced) is the comparison.

Prints a table and appends one JSON line per mesh to `--out`. A mesh that fails (out of
memory, ...) gives a record with "error"; the others still run.
`--smoke`: a tiny model and small shapes, e.g. on a CPU with 4 host devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        .venv/bin/python benchmarks/bench_fsdp.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.bench_model import (NEW, SIDE, SMOKE_NEW, SMOKE_SIDE, host_rollouts, parse_shape,  # noqa: E402
                                    program_gb, smoke_config, time_updates, update_flops)
from pr1_jax import grpo, sharding, train_state  # noqa: E402
from pr1_jax.model.config import PRESETS  # noqa: E402
from pr1_jax.programs import Kernels, Programs  # noqa: E402
from pr1_jax.train_step import OptimConfig, make_optimizer  # noqa: E402

PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense bf16


def parse_mesh(spec: str) -> dict[str, int]:
    """"fsdp=4" or "data=2,fsdp=2" → {"data": 1, "fsdp": 4, "tensor": 1}."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        k, _, v = item.partition("=")
        if k.strip() not in sizes:
            raise ValueError(f"bad mesh {spec!r}: axes are {tuple(sizes)}")
        sizes[k.strip()] = int(v)
    return sizes


def bench_mesh(cfg, spec: str, b_dev: int, g: int, new: int, side: int, micro: int, chunk: int, remat: str,
               vremat: str | None, repeats: int, profile_top: int = 0, attn: str = "xla", unroll: int = 1,
               hlo_out: str | None = None, vunroll: int = 1) -> dict:
    sizes = parse_mesh(spec)
    n = math.prod(sizes.values())
    if n > jax.device_count():
        raise ValueError(f"mesh {spec} needs {n} devices, have {jax.device_count()}")
    mesh = sharding.make_mesh(**sizes, devices=jax.devices()[:n])
    batch_shards = sizes["data"] * sizes["fsdp"]  # the batch is split over data × fsdp
    b = b_dev * batch_shards
    # The update as training builds it (pr1_jax.programs), with these options.
    programs = Programs(cfg, mesh, dtype=jnp.bfloat16, optimizer=make_optimizer(OptimConfig()),
                        grpo_cfg=grpo.GRPOConfig(num_generations=g), eos_ids=(151645, 151643), pad_id=151643,
                        kernels=Kernels(attention=attn, decode_attention="xla"), remat=True, remat_policy=remat,
                        vision_remat_policy=vremat, scan_unroll=unroll, vision_scan_unroll=vunroll,
                        chunk_size=chunk, budget=None)
    params = sharding.init_params(cfg, mesh, dtype=jnp.bfloat16)  # also the frozen reference
    state = train_state.init_train_state(params, programs.optimizer, mesh, cfg=cfg)  # a copy: donated step by step
    batch = sharding.shard_batch(host_rollouts(cfg, b, g, new, micro, side, shards=batch_shards), mesh)
    t0 = time.perf_counter()
    compiled = programs.lower_update(state, params, batch).compile()
    compile_s = time.perf_counter() - t0
    if hlo_out:  # the optimized program, gzipped: kernel names of --profile_top are its fusion names
        import gzip
        with gzip.open(hlo_out, "wt") as f:
            f.write(compiled.as_text())
    state, m, times = time_updates(compiled, state, params, batch, repeats)
    if profile_top:  # where the time of one step goes on device 0 (collectives included)
        from benchmarks.profile_rollout import kernel_times
        trace_dir = f"/tmp/pr1_fsdp_trace_{spec.replace('=', '').replace(',', '_')}"
        with jax.profiler.trace(trace_dir):
            state, m = compiled(state, params, batch)
            jax.block_until_ready(m)
        total, count = kernel_times(trace_dir, "GPU:0")
        print(f"[{spec}] device 0: {sum(total.values()) / 1e6:.1f} ms of kernels in one step; top kernels:")
        for name, ns in total.most_common(profile_top):
            print(f"  {ns / 1e6:9.3f} ms {count[name]:5d}x  {name[:120]}")
    s, med = min(times), statistics.median(times)
    p, patches = int(batch.prompts.input_ids.shape[-1]), int(batch.prompts.pixels.shape[-2])
    flops_dev = update_flops(cfg, b, g, p, new, patches) / n
    loss, gb = float(m["loss"]), program_gb(compiled)  # SPMD: the program of one device
    del state, params, batch, compiled
    return {"measure": "update_scaling", "mesh": spec, "devices": n, **sizes, "prompts": b, "samples": g,
            "sequences": b * g, "per_device_sequences": b * g / n, "seq": p + new, "micro": micro, "chunk": chunk,
            "remat": remat, "vremat": vremat or remat, "attn": attn, "unroll": unroll, "vunroll": vunroll,
            "seconds": round(s, 4), "median_seconds": round(med, 4),
            "sequences_per_s_per_device": round(b * g / s / n, 2),
            "tokens_per_s_per_device": round(b * g * (p + new) / s / n, 1),
            "mfu_per_device": round(flops_dev / s / (PEAK_TFLOPS * 1e12), 4),
            "program_gb_per_device": gb,
            "compile_s": round(compile_s, 1), "loss_finite": bool(math.isfinite(loss))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2_vl_2b", choices=sorted(PRESETS))
    p.add_argument("--per_device", default=None, help="prompts x G per device (8x8; --smoke 2x2)")
    p.add_argument("--meshes", default=None,
                   help="';'-separated meshes (default 'fsdp=1;fsdp=N;data=N', N = all devices)")
    p.add_argument("--micro", type=int, default=1, help="micro-batches per step (B/micro prompts each)")
    p.add_argument("--chunk", type=int, default=256, help="LM-head chunk (completion tokens)")
    p.add_argument("--remat", default="full", help="remat policy (pr1_jax.model.qwen2_vl.REMAT_POLICIES)")
    p.add_argument("--vremat", default=None, help="vision remat policy (default: --remat)")
    p.add_argument("--attn", default="xla", help="training attention: xla or cudnn (pr1_jax.model.layers)")
    p.add_argument("--unroll", type=int, default=1, help="decoder layers per scan step (28: fully unrolled)")
    p.add_argument("--vunroll", type=int, default=1, help="vision blocks per scan step (32: fully unrolled)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hlo_out", default=None, help="write the optimized HLO of the (last) mesh here, gzipped")
    p.add_argument("--profile_top", type=int, default=0, help="print the N kernels taking most time on device 0")
    p.add_argument("--new_tokens", type=int, default=None, help=f"completion tokens ({NEW}; --smoke 8)")
    p.add_argument("--side", type=int, default=None, help=f"image side in pixels ({SIDE}; --smoke {SMOKE_SIDE})")
    p.add_argument("--deadline_s", type=float, default=0,
                   help="skip meshes that would start later than this many seconds after launch (0: never)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--smoke", action="store_true", help="a tiny model, to check the script on a CPU")
    args = p.parse_args()
    start = time.perf_counter()
    cfg = smoke_config() if args.smoke else PRESETS[args.preset]()
    b_dev, g = parse_shape(args.per_device or ("2x2" if args.smoke else "8x8"))
    new = args.new_tokens or (SMOKE_NEW // 2 if args.smoke else NEW)
    side = args.side or (SMOKE_SIDE if args.smoke else SIDE)
    n_all = jax.device_count()
    meshes = [m.strip() for m in (args.meshes or f"fsdp=1;fsdp={n_all};data={n_all}").split(";") if m.strip()]
    device = jax.devices()[0].device_kind
    base = None  # sequences/s per device on the 1-device mesh
    rows = []
    for spec in meshes:
        try:
            if args.deadline_s > 0 and time.perf_counter() - start > args.deadline_s:
                raise TimeoutError("skipped: --deadline_s reached")
            rec = bench_mesh(cfg, spec, b_dev, g, new, side, args.micro, args.chunk, args.remat, args.vremat,
                             args.repeats, args.profile_top, args.attn, args.unroll, args.hlo_out, args.vunroll)
        except Exception as e:  # noqa: BLE001  out of memory or any other failure: record it, go on
            rec = {"measure": "update_scaling", "mesh": spec, "error": f"{type(e).__name__}: {str(e)[:600]}"}
        gc.collect()
        if "error" not in rec and rec["devices"] == 1 and base is None:
            base = rec["sequences_per_s_per_device"]
        if "error" not in rec:
            rec["efficiency"] = round(rec["sequences_per_s_per_device"] / base, 3) if base else None
        rec.update(device=device, device_count=n_all, per_device=f"{b_dev}x{g}", preset="smoke" if args.smoke
                   else args.preset, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                   xla_flags=os.environ.get("XLA_FLAGS", ""))
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    print(f"\n{device} × {n_all}, {cfg.text.num_layers}-layer model, per device {b_dev} prompts × G={g}, "
          f"{new} completion tokens, remat={args.remat}, chunk={args.chunk}")
    print(f"{'mesh':<16}{'devices':>8}{'s/step':>9}{'seq/s/dev':>11}{'MFU/dev':>9}{'GB/dev':>8}{'efficiency':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['mesh']:<16}  error: {r['error'][:100]}")
            continue
        eff = "—" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f}%"
        gb = "—" if r["program_gb_per_device"] is None else f"{r['program_gb_per_device']:.1f}"
        print(f"{r['mesh']:<16}{r['devices']:>8}{r['seconds']:>9.3f}{r['sequences_per_s_per_device']:>11.2f}"
              f"{100 * r['mfu_per_device']:>8.1f}%{gb:>8}{eff:>12}")


if __name__ == "__main__":
    main()
