"""Sharding on 8 fake CPU devices: the mesh and the rules, params loaded (or created) straight
into their shards, the sharded forward on 2×4 and 1×8 meshes (FSDP and TP), and the
rollout and update programs compiled ahead of time for the fake mesh and run: they equal
the unsharded programs. With libtpu present, the same programs compile for a v5e-8."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from jax.sharding import PartitionSpec as P

from pr1_jax import aot, programs, sharding, train_state
from pr1_jax.programs import Programs, resolve_kernels
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL, init_params
from pr1_jax.sampler import SamplingConfig
from tests import sharding_case as case

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(case.write_checkpoint(tmp_path_factory.mktemp("sharding_case")))


def test_mesh_sizes_and_errors():
    assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.mesh_from_config({"tensor": 8, "fsdp": 1}).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert sharding.make_mesh(2, 4).devices.shape == (2, 4, 1)
    for bad in (dict(data=-1, fsdp=-1), dict(data=3), dict(data=2, fsdp=2, tensor=1)):
        with pytest.raises(ValueError):
            sharding.make_mesh(**bad)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_from_config({"model": 8})


def test_rule_tables_give_the_expected_layouts():
    cfg = case.model_config()
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    train = hf_io.flatten(sharding.param_shardings(cfg, mesh, sharding.TRAIN_RULES))
    sample = hf_io.flatten(sharding.param_shardings(cfg, mesh, sharding.SAMPLE_RULES))
    spec = lambda table, path: table[path].spec  # noqa: E731
    assert spec(train, "decoder/layers/q_proj/kernel") == P(None, "fsdp", "tensor", None)  # [L, D, H, Dh]
    assert spec(train, "decoder/layers/k_proj/kernel") == P(None, "fsdp", None, None)  # 2 kv heads ∤ tensor=4
    assert spec(train, "decoder/layers/o_proj/kernel") == P(None, "tensor", None, "fsdp")
    assert spec(train, "decoder/layers/down_proj/kernel") == P(None, "tensor", "fsdp")
    assert spec(train, "embed_tokens/embedding") == P("tensor", "fsdp")
    assert spec(train, "lm_head/kernel") == P("fsdp", "tensor")
    assert spec(train, "visual/merger/mlp_2/kernel") == P("tensor", "fsdp")  # vit_mlp2 falls back to tensor
    assert spec(train, "decoder/norm/scale") == P(None)
    assert spec(sample, "decoder/layers/q_proj/kernel") == P(None, None, "tensor", None)  # no FSDP when sampling
    assert spec(sample, "embed_tokens/embedding") == P("tensor", None)
    # The batch: rows over data × fsdp, micro-batch axis and M-RoPE's 3 axes left alone.
    batch = sharding.batch_shardings(case.rollouts(case.MICRO), sharding.make_mesh(data=2, fsdp=2, tensor=2))
    assert batch.completions.tokens.spec == P(None, ("data", "fsdp"), None, None)
    assert batch.completions.unpack.spec == P(None, ("data", "fsdp"), None, None)
    assert batch.prompts.positions.spec == P(None, None, ("data", "fsdp"), None)
    assert batch.prompts.pixels.spec == P(None, ("data", "fsdp"), None, None)


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 4, 1)])
def test_load_params_sharded(ckpt, mesh_shape, monkeypatch):
    """Equals the unsharded loader, carries the rule table's shardings, and every read of the
    files is one device's block (the model is never whole in one place)."""
    mesh = sharding.make_mesh(*mesh_shape)
    reads = []
    real = hf_io.read_hf_block
    monkeypatch.setattr(hf_io, "read_hf_block", lambda *a: reads.append((a[1], real(*a).shape)) or real(*a))
    cfg = ModelConfig.from_pretrained(ckpt)
    want = hf_io.flatten(hf_io.load_params(ckpt, cfg))
    got = hf_io.flatten(sharding.load_params(ckpt, mesh, cfg=cfg))
    shardings = hf_io.flatten(sharding.param_shardings(cfg, mesh))
    assert set(got) == set(want)
    block_of = {}  # HF tensor → the block (our layout) that one device holds of it
    for path, hf_key, _ in hf_io.param_table(cfg):
        x = got[path]
        assert x.sharding == shardings[path], path
        np.testing.assert_array_equal(np.asarray(x), want[path], err_msg=path)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[path][shard.index], err_msg=path)
        block = x.addressable_shards[0].data.shape
        for i in range(x.shape[0] if "{i}" in hf_key else 1):
            block_of[hf_key.format(i=i)] = block[1:] if "{i}" in hf_key else block
    assert {k for k, _ in reads} == set(block_of)
    for key, shape in reads:
        assert shape == block_of[key], key
    emb = got["embed_tokens/embedding"]  # vocab over tensor, width over fsdp, replicated over data
    assert emb.addressable_shards[0].data.size == emb.size // (mesh.shape["fsdp"] * mesh.shape["tensor"])
    bf16 = sharding.load_params(ckpt, mesh, dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16)[0].dtype == jnp.bfloat16


def test_init_params_sharded():
    cfg = case.model_config()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    got = hf_io.flatten(sharding.init_params(cfg, mesh, rng=jax.random.PRNGKey(3)))
    want = hf_io.flatten(meta.unbox(init_params(cfg, jax.random.PRNGKey(3))))
    shardings = hf_io.flatten(sharding.param_shardings(cfg, mesh))
    for path, x in got.items():
        assert x.sharding == shardings[path], path
        np.testing.assert_allclose(np.asarray(x), np.asarray(want[path]), atol=1e-7, err_msg=path)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1), (1, 2, 4), (1, 1, 8)],
                         ids=["2x4-data-fsdp", "1x8-fsdp", "2x4-fsdp-tensor", "1x8-tensor"])
def test_sharded_forward_equals_unsharded(ckpt, mesh_shape):
    mesh = sharding.make_mesh(*mesh_shape)
    model = Qwen2VL(case.model_config())
    fwd = programs.shard_apply(lambda p, x: model.apply({"params": p}, x), mesh)
    args = sharding.load_params(ckpt, mesh), sharding.shard_batch(case.model_inputs(range(case.FWD_PROMPTS)), mesh)
    if mesh_shape == (2, 4, 1):  # the decoder's activation constraint reaches the compiler
        assert "sharding_constraint" in fwd.lower(*args).as_text()
    logits = case.run_fast(fwd, *args)
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or (None,)
    assert logits.sharding.spec[0] in (batch_axes, batch_axes[0])
    np.testing.assert_allclose(np.asarray(logits), case.reference_forward(ckpt), **TOL)


def test_aot_programs_on_fake_mesh_equal_unsharded(ckpt):
    """`aot.compile_programs` on a (data=2, fsdp=2, tensor=2) mesh: the memory report, and the
    compiled GRPO update and greedy rollout run on real data equal the one-device programs."""
    cfg, opt = case.model_config(), case.optimizer()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    greedy = case.greedy()
    programs = Programs(cfg, mesh, dtype=jnp.float32, optimizer=opt, grpo_cfg=case.grpo_config(),
                        eos_ids=(case.VEND,), pad_id=case.PAD, kernels=resolve_kernels("xla", "xla", mesh),
                        remat=False, chunk_size=case.CHUNK, budget=None)
    compiled = aot.compile_programs(
        programs, sampling=greedy, prompts_per_step=8, prompts_per_micro=4, seq_len=case.SEQ_LEN,
        patch_row_len=case.ROW_LEN, compiler_options=case.FAST)
    report = aot.memory_report(compiled)
    print(aot.format_report(report, "cpu-8, tiny case"))
    assert set(report) == {"update", "prefill", "decode"}
    # Collectives and FLOPs per program (the pod-scale report; no chip figures for CPU devices).
    rows = {line.split()[0]: line for line in aot.roofline_report(compiled, "cpu-8", 8).splitlines()[1:]}
    assert set(rows) == {"update", "prefill", "decode"}
    assert "AG " in rows["update"]  # fsdp: the weights are all-gathered
    from pr1_jax.hlo_stats import program_stats

    update = program_stats(compiled["update"].as_text(), 8)
    assert update.flops > 0 and update.hbm_bytes > 0 and update.collectives["all-gather"]["wire_bytes"] > 0
    assert all(r["argument"] > 0 and r["peak"] >= r["argument"] for r in report.values())

    # The update: params after the step and every metric.
    params = sharding.load_params(ckpt, mesh)
    state = train_state.init_train_state(params, opt, mesh, cfg=cfg)
    state, metrics = compiled["update"](state, params, sharding.shard_batch(case.rollouts(case.MICRO), mesh))
    want_params, want_metrics = case.reference_update(ckpt)
    assert set(metrics) == set(want_metrics)
    for k, v in jax.device_get(metrics).items():
        np.testing.assert_allclose(v, want_metrics[k], **TOL, err_msg=k)
    shardings = hf_io.flatten(sharding.param_shardings(cfg, mesh))
    for path, x in hf_io.flatten(state.params).items():
        assert x.sharding == shardings[path], path
        np.testing.assert_allclose(np.asarray(x), want_params[path], **TOL, err_msg=path)
    moved = max(float(np.abs(want_params[k] - np.asarray(v)).max()) for k, v in hf_io.flatten(params).items())
    assert moved > 1e-3  # the step really changed the parameters
    assert state.opt_state.inner_state[1][0].mu["decoder"]["layers"]["q_proj"]["kernel"].sharding.spec == \
        P(None, "fsdp", "tensor", None)

    # The rollout: greedy samples and their log-probs.
    replicated = sharding.replicated(mesh)
    put = lambda x: jax.device_put(x, replicated)  # noqa: E731
    prompts = sharding.shard_batch(case.model_inputs(range(case.FWD_PROMPTS)), mesh)
    prefix = compiled["prefill"](params, prompts)
    out = compiled["decode"](params, prefix, put(jax.random.PRNGKey(0)), put(jnp.float32(1e-6)),
                             put(jnp.float32(1.0)), None)
    want_tokens, want_logp = case.reference_rollout(ckpt)
    np.testing.assert_array_equal(np.asarray(out.tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(out.logp), want_logp, **TOL)
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")


@pytest.mark.skipif(not (os.environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu")),
                    reason="needs libtpu (pip install libtpu, or TPU_LIBRARY_PATH=.../libtpu.so)")
def test_aot_compiles_for_a_v5e_8_without_the_hardware():
    devices, hbm = aot.topology_devices("v5e-8")
    assert len(devices) == 8 and devices[0].platform == "tpu" and hbm == 16 * 2**30
    mesh = sharding.make_mesh(fsdp=4, tensor=2, devices=devices)
    programs = Programs(case.model_config(), mesh, dtype=jnp.bfloat16, optimizer=case.optimizer(),
                        grpo_cfg=case.grpo_config(), eos_ids=(case.VEND,), pad_id=case.PAD,
                        kernels=resolve_kernels("auto", "auto", mesh), budget=None)
    compiled = aot.compile_programs(
        programs, sampling=SamplingConfig(num_samples=2, max_new_tokens=8, top_p=0.9, top_k=20),
        prompts_per_step=8, prompts_per_micro=4, seq_len=case.SEQ_LEN, patch_row_len=case.ROW_LEN)
    report = aot.memory_report(compiled, hbm)
    print(aot.format_report(report, "v5e-8, tiny case"))
    assert all(0 < r["peak"] < r["hbm"] and r["generated_code"] > 0 for r in report.values())


def activation_all_reduces(hlo: str, cfg) -> list:
    """All-reduces in an HLO that are not gradients of parameters: non-scalar results whose
    dimensions (1s dropped, any order) match no parameter's (the stacked layer axis dropped).
    One is expected per micro-batch program: the gradient of the merged visual tokens [M, D]
    (`embed`'s gather by `vision_index`, plain data parallelism has it too)."""
    from benchmarks.count_collectives import collectives

    key = lambda s: tuple(sorted(d for d in s if d != 1))  # noqa: E731
    params = {key(s[k:]) for s, _ in sharding._param_meta(cfg).values() for k in (0, 1)}
    return [(dt, s) for dt, s in collectives(hlo)["all-reduce"] if key(s) and key(s) not in params]


def test_fsdp_update_has_no_activation_all_reduces():
    """Issue #4: under FSDP every matmul gathers its weight; none contracts a width sharded on
    both sides into partial sums (activation-sized all-reduces, e.g. in the vision tower)."""
    from benchmarks.bench_model import smoke_config
    from benchmarks.count_collectives import compile_update

    cfg = smoke_config()
    # two prompts per device: a block of two sharing its completion rows (`batch.completion_blocks`)
    compiled, _ = compile_update("fsdp=4", per_device="2x2", new=4, cfg=cfg)
    extra = activation_all_reduces(compiled.as_text(), cfg)
    # only the merged visual tokens' gradient: 8 prompts × one 56-px image (4×4 patches → 4 tokens)
    assert [s for _, s in extra] == [(32, cfg.text.width)], extra


def test_aot_lowers_the_update_train_builds(ckpt):
    """`aot.lower_programs` (abstract arguments at the config's caps) and the program builder
    given a real step's arrays of those shapes (what `train.py` does) lower the same program."""
    cfg, opt = case.model_config(), case.optimizer()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    programs = Programs(cfg, mesh, dtype=jnp.float32, optimizer=opt, grpo_cfg=case.grpo_config(),
                        eos_ids=(case.VEND,), pad_id=case.PAD, kernels=resolve_kernels("auto", "auto", mesh),
                        chunk_size=case.CHUNK, budget=None)
    aot_text = aot.lower_programs(programs, sampling=case.greedy(), prompts_per_step=8, prompts_per_micro=4,
                                  seq_len=case.SEQ_LEN, patch_row_len=case.ROW_LEN)["update"].as_text()
    params = sharding.load_params(ckpt, mesh)
    state = train_state.init_train_state(params, opt, mesh, cfg=cfg)
    batch = sharding.shard_batch(case.rollouts(case.MICRO), mesh)
    assert programs.lower_update(state, params, batch).as_text() == aot_text
