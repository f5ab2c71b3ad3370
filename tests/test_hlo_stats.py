"""hlo_stats: a compiled program's matmul FLOPs and collectives, loops counted as they run
(XLA's cost_analysis counts a while body once)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from pr1_jax.hlo_stats import program_stats


def test_a_scanned_matmul_counts_every_iteration():
    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=10)[0].sum()

    x = w = jnp.ones((128, 128))
    compiled = jax.jit(f).lower(x, w).compile()
    stats = program_stats(compiled.as_text())
    assert stats.flops == 10 * 2 * 128**3 and stats.unknown_loops == 0
    assert compiled.cost_analysis()["flops"] < stats.flops / 5  # XLA's count: one iteration
    assert 10 * 3 * 128 * 128 * 4 <= stats.hbm_bytes <= 10 * 6 * 128 * 128 * 4  # x, w read, result written


def test_collectives_in_a_loop_by_kind_with_wire_bytes():
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))

    def step(c, _):
        total = jax.lax.psum(c, "d")  # an all-reduce of [8, 32] float32 per iteration
        return c + total * 1e-3, None

    @jax.jit
    def f(x):
        body = jax.shard_map(lambda c: jax.lax.scan(step, c, None, length=6)[0], mesh=mesh, in_specs=P("d"),
                             out_specs=P("d"))
        return body(x)

    stats = program_stats(f.lower(jnp.ones((32, 32))).compile().as_text(), num_devices=4)
    ar = stats.collectives["all-reduce"]
    assert ar["count"] == 6 and ar["bytes"] == 6 * 8 * 32 * 4
    assert ar["wire_bytes"] == 6 * 2 * 8 * 32 * 4 * 3 / 4  # a ring over 4 devices
    assert stats.collectives["all-gather"]["count"] == 0
