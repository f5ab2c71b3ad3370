"""Collectives in the compiled sharded GRPO update (issue #4), on fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        .venv/bin/python benchmarks/count_collectives.py --mesh=fsdp=4 [--top=12] [--dtype=bf16]

Lowers and compiles (never runs) the update `pr1_jax.programs` builds for the `bench_fsdp.py --smoke`
model on the given mesh, then counts all-reduce / all-gather / reduce-scatter / all-to-all /
collective-permute in the optimized HLO and lists each kind's result shapes, largest
first. FSDP should show all-gathers of weights and reduce-scatters of gradients; an
all-reduce of an activation-sized array ([B, G, T, D], ...) is a matmul contracting over a
sharded width (partial sums) instead of a gathered weight. `collectives(hlo)` is reused by
tests/test_sharding.py.
"""

from __future__ import annotations

import argparse
import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_fsdp import parse_mesh  # noqa: E402
from benchmarks.bench_model import SMOKE_NEW, SMOKE_SIDE, host_rollouts, parse_shape, smoke_config  # noqa: E402
from pr1_jax import grpo, sharding, train_state  # noqa: E402
from pr1_jax.programs import Kernels, Programs  # noqa: E402
from pr1_jax.train_step import OptimConfig, make_optimizer  # noqa: E402

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = TYPE[dims]{layout} kind(` or a tuple result `(f32[..], bf16[..]) kind(`; -start for async forms.
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")
_ARR = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """{kind: [(dtype, shape), ...]} of every collective in an HLO text (tuple results split)."""
    out: dict[str, list] = {k: [] for k in KINDS}
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        for dt, dims in _ARR.findall(m.group(1)):
            if dt in ("token", "u32", "s32") and not dims:
                continue
            out[m.group(2)].append((dt, tuple(int(d) for d in dims.split(",") if d)))
    return out


def compile_update(mesh_spec: str, per_device: str = "2x2", new: int = SMOKE_NEW // 2, side: int = SMOKE_SIDE,
                   micro: int = 1, chunk: int = 256, dtype=jnp.bfloat16, cfg=None):
    """(compiled update, mesh) of the smoke model; arguments are abstract (nothing allocated)."""
    cfg = cfg or smoke_config()
    sizes = parse_mesh(mesh_spec)
    n = math.prod(sizes.values())
    mesh = sharding.make_mesh(**sizes, devices=jax.devices()[:n])
    b_dev, g = parse_shape(per_device)
    b = b_dev * sizes["data"] * sizes["fsdp"]
    programs = Programs(cfg, mesh, dtype=dtype, optimizer=make_optimizer(OptimConfig()),
                        grpo_cfg=grpo.GRPOConfig(num_generations=g), eos_ids=(151645, 151643), pad_id=151643,
                        kernels=Kernels(attention="xla", decode_attention="xla"), chunk_size=chunk, budget=None)
    state = train_state.abstract_train_state(cfg, programs.optimizer, mesh, dtype=dtype)
    params = state.params
    host = host_rollouts(cfg, b, g, new, micro, side, shards=sizes["data"] * sizes["fsdp"])
    bsh = sharding.batch_shardings(host, mesh)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), host, bsh)
    return programs.lower_update(state, params, batch).compile(), mesh


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="fsdp=4")
    p.add_argument("--per_device", default="2x2")
    p.add_argument("--new_tokens", type=int, default=SMOKE_NEW // 2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "f32"))
    p.add_argument("--top", type=int, default=12, help="shapes listed per kind")
    p.add_argument("--dump", default=None, help="write the optimized HLO here")
    args = p.parse_args()
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    compiled, _ = compile_update(args.mesh, args.per_device, args.new_tokens, chunk=args.chunk, dtype=dtype)
    hlo = compiled.as_text()
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(hlo)
    cfg = smoke_config()
    print(f"mesh {args.mesh}: text D={cfg.text.width} mlp={cfg.text.mlp_dim} V={cfg.text.vocab_size}, "
          f"vision W={cfg.vision.width}; per device {args.per_device}, {args.new_tokens} new tokens")
    for kind, ops in collectives(hlo).items():
        sizes = collections.Counter(f"{dt}[{','.join(map(str, s))}]" for dt, s in ops)
        elems = sum(math.prod(s) for _, s in ops)
        print(f"{kind:<19}{len(ops):5d} ops {elems:12d} elements")
        ranked = sorted(sizes.items(), key=lambda kv: -math.prod(int(d) for d in re.findall(r"\d+", kv[0].split("[")[1]) or [1]))
        for shape, c in ranked[:args.top]:
            print(f"    {c:4d}x {shape}")


if __name__ == "__main__":
    main()
