"""Where does a decode step go? Traces an 8×8 rollout on the GPU and prints the kernels
that take the most time (jax.profiler trace, aggregated by kernel name).

    python3 benchmarks/profile_rollout.py --new=64 --trace_dir=/tmp/trace [--steps_per_check=16]

--count_ops (any backend, no weights): compiles the rollout program at 2 and 3 decoder layers
and prints the ops of the optimized decode-step body (the loop body that writes the caches)
per layer, by opcode (on GPU each fusion/custom-call is a kernel launch), and any copy or
transpose there as large as a layer's cache.
"""

import argparse
import collections
import dataclasses
import glob
import math
import re

import jax
import jax.numpy as jnp

from flax.core import meta  # noqa: E402

from benchmarks.bench_model import prompts  # noqa: E402
from pr1_jax.model.config import qwen2_vl_2b  # noqa: E402
from pr1_jax.model.qwen2_vl import Qwen2VL, init_params  # noqa: E402
from pr1_jax.sampler import Sampler, SamplingConfig  # noqa: E402

EOS, PAD = (151645, 151643), 151643
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}  # no kernel


def _step_body(hlo: str) -> list[str]:
    """Instruction lines of the while body with the most dynamic-update-slices (the decode step)."""
    comps, lines = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            lines = comps.setdefault(head.group(1), [])
        elif lines is not None and line.startswith("  ") and " = " in line:
            lines.append(line.strip())
    bodies = [comps.get(n, []) for n in set(re.findall(r"body=%?([\w.\-]+)", hlo))]
    return max(bodies, key=lambda b: (sum("dynamic-update-slice" in x for x in b), len(b)))


def _opcode(line: str) -> str:
    m = re.search(r"\s([a-z][\w\-]*)\(", line.split(" = ", 1)[1])
    return m.group(1) if m else "?"


def _elements(line: str) -> int:
    dims = re.match(r"[^=]*= \(?\w+\[([\d,]*)\]", line)
    return math.prod(int(d) for d in dims.group(1).split(",")) if dims and dims.group(1) else 0


def count_ops(args) -> None:
    b, g, tc = 8, 8, args.new
    per_layers = {}
    for num_layers in (2, 3):
        cfg = qwen2_vl_2b()
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=num_layers),
                                  vision=dataclasses.replace(cfg.vision, depth=1))
        params = jax.eval_shape(lambda: meta.unbox(init_params(cfg, dtype=jnp.bfloat16)))  # noqa: B023
        sampler = Sampler(Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), EOS, PAD,
                          steps_per_check=args.steps_per_check)
        hlo = sampler._generate.lower(
            params, prompts(cfg, b), jax.random.PRNGKey(0), jnp.float32(1.0), jnp.float32(1.0), num_samples=g,
            max_new_tokens=tc, top_k=0, use_top_p=False, greedy=False, eos_ids=EOS, pad_id=PAD, ignore_eos=True,
            return_logits=False, steps_per_check=args.steps_per_check, decode_attention=args.decode_attention,
            decode_splits=args.decode_splits).compile().as_text()
        if args.hlo_out:  # the optimized program, to read which fusions/command buffers a step has
            with open(f"{args.hlo_out}.{num_layers}layers.txt", "w") as f:
                f.write(hlo)
        body = [x for x in _step_body(hlo) if _opcode(x) not in _FREE]
        per_layers[num_layers] = collections.Counter(map(_opcode, body))
        cache = b * g * tc * cfg.text.num_kv_heads * cfg.text.head_dim
        big = [x for x in body if re.search(r"copy|transpose", x.split(" = ", 1)[0] + _opcode(x))
               and _elements(x) >= cache]
        print(f"{num_layers} layers: {len(body)} ops in the step body; {len(big)} cache-sized copies/transposes")
        for x in big:
            print("   ", x[:160])
    diff = per_layers[3] - per_layers[2]
    print(f"per layer ({jax.default_backend()}): {sum(diff.values())} ops {dict(diff.most_common())}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--unroll", type=int, default=1)
    p.add_argument("--steps_per_check", type=int, default=16)
    p.add_argument("--decode_attention", default="xla", choices=("xla", "pallas"))
    p.add_argument("--decode_splits", type=int, default=0)
    p.add_argument("--count_ops", action="store_true", help="per-layer ops of the decode step's HLO, then exit")
    p.add_argument("--hlo_out", default=None, help="--count_ops: also write the optimized HLO to PATH.<n>layers.txt")
    p.add_argument("--attention", default="xla", help="vision and prefill attention (layers.ATTENTION_IMPLS)")
    p.add_argument("--trace_dir", default="/tmp/pr1_trace")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    if args.count_ops:
        return count_ops(args)
    cfg = qwen2_vl_2b()
    params = jax.jit(lambda: meta.unbox(init_params(cfg, dtype=jnp.bfloat16)))()
    model = Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_unroll=args.unroll,
                    attention=args.attention)
    sampler = Sampler(model, EOS, PAD, steps_per_check=args.steps_per_check,
                      decode_attention=args.decode_attention, decode_splits=args.decode_splits)
    inputs = prompts(cfg, 8)
    scfg = SamplingConfig(num_samples=8, max_new_tokens=args.new, temperature=1.0, ignore_eos=True)
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(sampler(params, inputs, key, scfg).tokens)
    with jax.profiler.trace(args.trace_dir):
        jax.block_until_ready(sampler(params, inputs, key, scfg).tokens)
    total, count = kernel_times(args.trace_dir)
    all_ns = sum(total.values())
    print(f"GPU kernel time {all_ns / 1e6:.2f} ms over {sum(count.values())} kernels "
          f"({sum(count.values()) / args.new:.0f} per step, {all_ns / 1e6 / args.new:.3f} ms per step)")
    for name, ns in total.most_common(args.top):
        print(f"{ns / 1e6:9.3f} ms {count[name]:6d}x {ns / 1e3 / count[name]:8.1f} us  {name[:150]}")
    # Kernels of the decode step: launched once per step or once per layer and step.
    step = {n: ns for n, ns in total.items() if count[n] % (args.new - 1) == 0 or count[n] % args.new == 0}
    print(f"per-step kernels: {sum(step.values()) / 1e6 / args.new:.3f} ms per step")
    for name, ns in sorted(step.items(), key=lambda x: -x[1]):
        print(f"{ns / 1e3 / args.new:8.1f} us/step {count[name] / args.new:5.1f}/step {ns / 1e3 / count[name]:7.1f} us  "
              f"{name[:120]}")
    once = {n: ns for n, ns in total.items() if n not in step}  # vision, prefill, per-chunk checks
    print(f"other kernels (vision, prefill, per chunk): {sum(once.values()) / 1e6:.2f} ms in all")
    for name, ns in sorted(once.items(), key=lambda x: -x[1])[:args.top]:
        print(f"{ns / 1e6:9.3f} ms {count[name]:6d}x  {name[:120]}")


def kernel_times(trace_dir: str, plane_filter: str = "GPU") -> tuple[collections.Counter, collections.Counter]:
    """Total ns and count per kernel name in the newest trace under `trace_dir`, over the
    device planes whose name contains `plane_filter` (e.g. "GPU:0" for one device)."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if plane_filter not in plane.name:
            continue
        for line in plane.lines:
            if "Kernel" not in line.name and "Stream" not in line.name:
                continue
            for ev in line.events:
                total[ev.name] += ev.duration_ns
                count[ev.name] += 1
    return total, count


if __name__ == "__main__":
    main()
