"""Where does a decode step go? Traces an 8×8 rollout on the GPU and prints the kernels
that take the most time (jax.profiler trace, aggregated by kernel name).

    python3 benchmarks/profile_rollout.py --new=64 --trace_dir=/tmp/trace
"""

import argparse
import collections
import glob
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from flax.core import meta  # noqa: E402

from benchmarks.bench_model import prompts  # noqa: E402
from pr1_jax.model.config import qwen2_vl_2b  # noqa: E402
from pr1_jax.model.qwen2_vl import Qwen2VL, init_params  # noqa: E402
from pr1_jax.sampler import Sampler, SamplingConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--unroll", type=int, default=1)
    p.add_argument("--trace_dir", default="/tmp/pr1_trace")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    cfg = qwen2_vl_2b()
    params = jax.jit(lambda: meta.unbox(init_params(cfg, dtype=jnp.bfloat16)))()
    model = Qwen2VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_unroll=args.unroll)
    sampler = Sampler(model, (151645, 151643), 151643)
    inputs = prompts(cfg, 8)
    scfg = SamplingConfig(num_samples=8, max_new_tokens=args.new, temperature=1.0, ignore_eos=True)
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(sampler(params, inputs, key, scfg).tokens)
    with jax.profiler.trace(args.trace_dir):
        jax.block_until_ready(sampler(params, inputs, key, scfg).tokens)
    path = sorted(glob.glob(f"{args.trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    total = collections.Counter()
    count = collections.Counter()
    for plane in data.planes:
        if "GPU" not in plane.name:
            continue
        for line in plane.lines:
            if "Kernel" not in line.name and "Stream" not in line.name:
                continue
            for ev in line.events:
                total[ev.name] += ev.duration_ns
                count[ev.name] += 1
    all_ns = sum(total.values())
    print(f"GPU kernel time {all_ns / 1e6:.2f} ms over {sum(count.values())} kernels "
          f"({sum(count.values()) / args.new:.0f} per step, {all_ns / 1e6 / args.new:.3f} ms per step)")
    for name, ns in total.most_common(args.top):
        print(f"{ns / 1e6:9.3f} ms {count[name]:6d}x  {name[:150]}")


if __name__ == "__main__":
    main()
