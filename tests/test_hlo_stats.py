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


# TPU's optimized HLO (as libtpu writes it, reduced to what is read): matmuls are convolutions with
# batch/head dims turned into padded spatial windows, and loops carry no known_trip_count: a scan's
# condition compares its counter with a constant, and a bidirectional collective matmul adds 2 per trip.
TPU_LIKE_HLO = """HloModule tpu_like, entry_computation_layout={()->f32[]}

%cond (p.1: (s32[], bf16[768,4,64,1])) -> pred[] {
  %p.1 = (s32[], bf16[768,4,64,1]{3,2,1,0}) parameter(0)
  %limit = s32[]{:T(128)} constant(6)
  %i.1 = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i.1, %limit), direction=LT
}

%body (p.2: (s32[], bf16[768,4,64,1])) -> (s32[], bf16[768,4,64,1]) {
  %p.2 = (s32[], bf16[768,4,64,1]{3,2,1,0}) parameter(0)
  %i.2 = s32[]{:T(128)} get-tuple-element(%p.2), index=0
  %two = s32[]{:T(128)} constant(2)
  %next = s32[]{:T(128)} add(%i.2, %two)
  %x = bf16[768,2,32,1]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  %w = bf16[2,32,4,64]{3,2,1,0:T(8,128)(2,1)} parameter(2)
  %qk = bf16[768,4,64,1]{3,2,1,0:T(8,128)(2,1)} convolution(%x, %w), window={size=4x2 pad=3_3x0_0 rhs_reversal=1x0}, dim_labels=b1f0_1i0o->b0f1, metadata={op_name="jit(f)/k_proj/dot_general"}
  %a = bf16[256,4,32]{2,1,0} parameter(3)
  %o = bf16[4,32,128]{2,1,0} parameter(4)
  %proj = bf16[256,128,1]{0,1,2} convolution(%a, %o), window={size=4}, dim_labels=b0f_0io->bf0, metadata={op_name="jit(f)/o_proj/dot_general"}
  ROOT %t.2 = (s32[], bf16[768,4,64,1]{3,2,1,0}) tuple(%next, %qk)
}

ENTRY %main () -> f32[] {
  %start = s32[]{:T(128)} constant(0)
  %init = bf16[768,4,64,1]{3,2,1,0} constant({...})
  %t.1 = (s32[], bf16[768,4,64,1]{3,2,1,0}) tuple(%start, %init)
  %loop = (s32[], bf16[768,4,64,1]{3,2,1,0}) while(%t.1), condition=%cond, body=%body
  ROOT %r = f32[]{:T(128)} constant(0)
}
"""


def test_tpu_convolutions_and_counted_loops():
    stats = program_stats(TPU_LIKE_HLO, num_devices=8)
    assert stats.unknown_loops == 0
    trips = 3  # 0, 2, 4 < 6
    # b1f0_1i0o: [768 rows, 2 kv, 32] x [2 kv, 32, 4, 64]: the kv window (2 taps, no padding) is contracted with
    # the 32 features; the padded window of 4 over the size-1 dim broadcasts (1 valid tap per output position).
    k_proj = 2 * 768 * 4 * 64 * 32 * 2
    o_proj = 2 * 256 * 128 * 32 * 4  # [256, 4 heads, 32] x [4, 32, 128]: heads and features contracted
    assert stats.flops_by_op["k_proj/dot_general"] == trips * k_proj
    assert stats.flops_by_op["o_proj/dot_general"] == trips * o_proj
    assert stats.flops == trips * (k_proj + o_proj)


def test_a_scan_compiled_for_tpu_counts_like_the_math():
    """With libtpu (the compiler only, no TPU): an FSDP-sharded scanned matmul and its gradient for
    v5e-8 count exactly the matmul FLOPs, through convolutions and inferred trip counts."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install --target DIR libtpu; CI has none)")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding

    devices = topologies.get_topology_desc("v5e:2x4", "tpu", chips_per_host_bounds=(2, 4, 1)).devices
    mesh = Mesh(np.array(devices), ("x",))

    def f(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

    w = jax.ShapeDtypeStruct((6, 512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x", None)))
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
    stats = program_stats(jax.jit(jax.grad(f)).lower(w, x).compile().as_text(), num_devices=8)
    assert stats.unknown_loops == 0
    assert stats.flops == 3 * 6 * 2 * 32 * 512 * 512  # forward + two backward matmuls, 32 rows per device
