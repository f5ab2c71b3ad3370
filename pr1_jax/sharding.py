"""Sharding over a device mesh: the mesh, the logical-axis rules, sharded params, batches and
programs (process-level helpers: `pr1_jax/multihost.py`; the rollout on the mesh:
`pr1_jax/sharded_sampler.py`).

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)              # -1 takes the remaining devices
    params = load_params(model_dir, mesh)                     # each host reads only its slices
    update = shard_update_fn(model, optimizer, grpo_cfg, mesh)
    state = init_train_state(params, optimizer, mesh)
    state, metrics = update(state, ref_params, shard_batch(batch, mesh))

The training loop (`pr1_jax/train.py`) adds: `Pretrained.load(dir, mesh=mesh)`,
`check_batch_sizes`, `replicate` (PRNG keys), `shard_batch(..., process_local=True)` (each
process's prompts), and from `multihost`: `local_batch_size`, `host_local` (completions
back), `gather` (metrics), `is_main_process` (who writes files).

The model names every parameter and activation dimension with a *logical* axis
("embed", "heads", "batch", ...; see `pr1_jax/model/layers.py`). ONE table maps those
names to the mesh axes for training (`TRAIN_RULES`, FSDP + optional tensor parallelism)
and a second, smaller one for sampling (`SAMPLE_RULES`: no FSDP, so decoding does not
all-gather the weights at every token; the rollout program re-lays the training params
out once at its start). A dimension that a mesh axis does not divide is left unsharded
along that axis (e.g. 2 KV heads on tensor=4), so any model runs on any mesh.

Mesh axes: `data` (pure data parallel: params replicated), `fsdp` (batch AND params
sharded; weights gathered per layer), `tensor` (Megatron-style: heads, MLP and vocab
split). The batch is split over data × fsdp.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pr1_jax import train_step
from pr1_jax.errors import ConfigError
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import ModelInputs, Qwen2VL, init_params as _init_boxed

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical axis → mesh axes, in priority order (a mesh axis is used at most once per array;
# a later rule for the same name is a fallback). Names not listed stay unsharded:
# "length", "head_dim", "norm", "vit_norm", "layers" (the scan axis), "patch", and
# "act_embed" / "act_vit_embed": the width of ACTIVATIONS (weights name theirs "embed" /
# "vit_embed", FSDP-sharded). Activations are split over the batch with their width whole,
# so each FSDP matmul all-gathers its weight (and reduce-scatters its gradient) instead of
# contracting a width sharded on both sides into activation-sized all-reduces (issue #4).
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),  # activations and data: rows split over data × fsdp
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # FSDP: every weight matrix split along its model width ...
    ("vit_embed", "fsdp"),
    ("heads", "tensor"),  # ... and along heads / MLP width with tensor parallelism
    ("kv_heads", "tensor"),
    ("vit_heads", "tensor"),
    ("mlp", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_mlp2", "fsdp"),  # merger: mlp_0 [4W, 4W] → (tensor, fsdp); mlp_2 [4W, D] → (tensor, fsdp)
    ("vit_mlp2", "tensor"),
)

# Sampling: weights replicated over data × fsdp (no per-token all-gathers), split by tensor.
SAMPLE_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vit_heads", "tensor"),
    ("mlp", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_mlp2", "tensor"),
)


# ------------------------------------------------------------------ the mesh
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all); one size may be -1.

    Axis types are Auto (`jax.sharding.Mesh`), so logical rules and GSPMD propagation
    decide the layouts. On TPU the device order follows the physical torus
    (`mesh_utils.create_device_mesh`), so fsdp/tensor collectives ride the fastest links.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # unusual device sets: plain order
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(cfg: Mapping[str, int] | None, devices: Sequence[Any] | None = None) -> Mesh:
    """`make_mesh` from a config block such as `{"data": 1, "fsdp": -1, "tensor": 1}`."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)} (expected {MESH_AXES})")
    return make_mesh(devices=devices, **{k: int(v) for k, v in cfg.items()})


# ------------------------------------------------------------------ logical names → shardings
def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """The PartitionSpec of an array with these logical dimension names.

    Mesh axes of size 1 are dropped, and a dimension keeps only the leading mesh axes of
    its rule whose product divides it (jit arguments must split evenly).
    """
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    out = []
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(names, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@functools.lru_cache(maxsize=8)
def _param_meta(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """{flat path: (shape, logical names)} of the model's parameters, without allocating them."""
    boxed = jax.eval_shape(lambda: _init_boxed(cfg))
    is_box = lambda x: isinstance(x, meta.Partitioned)  # noqa: E731
    flat = hf_io.flatten(jax.tree.map(lambda x: x, boxed, is_leaf=is_box))
    return {k: (tuple(v.value.shape), tuple(v.names)) if is_box(v) else (tuple(v.shape), (None,) * len(v.shape))
            for k, v in flat.items()}


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = TRAIN_RULES) -> dict:
    """The parameter tree's NamedShardings under `rules` (same nesting as the params)."""
    return hf_io.unflatten({k: logical_sharding(names, shape, mesh, rules)
                            for k, (shape, names) in _param_meta(cfg).items()})


def with_rules(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """`fn` traced with the logical rules and the mesh in context, so the model's
    `nn.with_logical_constraint` calls become real sharding constraints."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules),
              nn.intercept_methods(_no_rules_in_dense_general)):
            return fn(*args, **kwargs)

    return wrapped


def _no_rules_in_dense_general(next_fun, args, kwargs, context):
    """flax#3676: `nn.DenseGeneral` creates (and, under `apply`, shape-checks) its kernel flat
    [in, out] and unboxes it BEFORE reshaping, so the logical constraint of a 3-D kernel
    meets a 2-D array. Parameter layouts come from the jit in_shardings anyway, so
    DenseGeneral runs without rules (it has no activation constraints of its own)."""
    if isinstance(context.module, nn.DenseGeneral):
        with nn.logical_axis_rules(()):
            return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)


# ------------------------------------------------------------------ parameters, created sharded
def init_params(cfg: ModelConfig, mesh: Mesh, rules: Rules = TRAIN_RULES, rng: jax.Array | None = None,
                dtype: Any = jnp.float32) -> dict:
    """Random parameters created directly in their shards (never whole on one device)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    init = jax.jit(lambda r: meta.unbox(_init_boxed(cfg, r, dtype)), out_shardings=param_shardings(cfg, mesh, rules))
    return init(rng)


def load_params(model_dir: str | os.PathLike, mesh: Mesh, rules: Rules = TRAIN_RULES, cfg: ModelConfig | None = None,
                dtype: Any = np.float32) -> dict:
    """`hf_io.load_params`, sharded: every device's block is read straight from the safetensors
    files (`get_slice`), so a process reads only the rows/columns its devices hold and the
    full model never exists in one place. Same checks and errors as the unsharded loader.
    """
    cfg = cfg or ModelConfig.from_pretrained(model_dir)
    metas = _param_meta(cfg)
    files = _open_checked(model_dir, cfg, {k: s for k, (s, _) in metas.items()})
    flat = {}
    for path, hf_key, rule in hf_io.param_table(cfg):
        shape, names = metas[path]
        sharding = logical_sharding(names, shape, mesh, rules)
        flat[path] = jax.make_array_from_callback(shape, sharding, _block_reader(files, hf_key, rule, shape, dtype))
    return hf_io.unflatten(flat)


def _open_checked(model_dir, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> hf_io.SafetensorsDir:
    """`hf_io.SafetensorsDir` after `hf_io.load_params`' checks: every missing, unexpected or
    mis-shaped tensor reported in ONE error."""
    files = hf_io.SafetensorsDir(model_dir)
    expected: dict[str, tuple] = {}
    for path, hf_key, rule in hf_io.param_table(cfg):
        expected.update(hf_io._expected(cfg, path, hf_key, rule, shapes[path]))
    present = files.keys()
    ignorable = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    problems = {"missing": sorted(set(expected) - present),
                "unexpected": sorted(present - set(expected) - ignorable),
                "wrong shape": [f"{k}: {files.shape(k)} (expected {s})" for k, s in expected.items()
                                if k in present and files.shape(k) != tuple(s)]}
    if any(problems.values()):
        lines = [f"checkpoint {model_dir} does not match the {cfg.model_type} config:"]
        lines += [f"  {t} ({len(v)}): " + ", ".join(v[:20]) + (" …" if len(v) > 20 else "")
                  for t, v in problems.items() if v]
        raise ValueError("\n".join(lines))
    return files


def _block_reader(files: hf_io.SafetensorsDir, hf_key: str, rule: str, shape: tuple[int, ...], dtype) -> Callable:
    """The `make_array_from_callback` callback of one parameter: device index → its block.

    Devices that hold the same block (replicas over data/tensor) share one read.
    """
    cache: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(d)[:2] for s, d in zip(index, shape))
        if bounds not in cache:
            if "{i}" in hf_key:  # stacked on a leading layer axis: one HF tensor per layer
                (l0, l1), rest = bounds[0], bounds[1:]
                blocks = [read_hf_block(files, hf_key.format(i=i), rule, shape[1:], rest) for i in range(l0, l1)]
                cache[bounds] = np.stack(blocks).astype(dtype)
            else:
                cache[bounds] = read_hf_block(files, hf_key, rule, shape, bounds).astype(dtype)
        return cache[bounds]

    return read


def read_hf_block(files: hf_io.SafetensorsDir, hf_key: str, rule: str, shape: tuple[int, ...],
                  bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Block `bounds` ((start, stop) per dimension of OUR layout `shape`) of one HF tensor.

    Reads from the file only the HF rows and columns the block needs (the layout rules are
    those of `hf_io`: HF [out, in] ↔ ours [*in, *out]); inner dimensions of a flattened
    group (e.g. head_dim under heads) are read whole and cut in memory.
    """
    handle, key = files.key_to_file[hf_key]
    tensor = handle.get_slice(key)
    cut = lambda bs: tuple(slice(a, b) for a, b in bs)  # noqa: E731
    if rule == "copy":
        return tensor[cut(bounds)]
    if rule == "vector":  # HF [prod(shape)] flat
        (a, b), inner = bounds[0], math.prod(shape[1:])
        flat = tensor[a * inner:b * inner].reshape((b - a,) + tuple(shape[1:]))
        return flat[(slice(None),) + cut(bounds[1:])]
    if not (rule.startswith("kernel") or rule == "patch"):
        raise ValueError(rule)
    n_in = 1 if rule == "patch" else int(rule[len("kernel"):])
    (i0, i1), (o0, o1) = bounds[0], bounds[n_in]
    in_inner, out_inner = math.prod(shape[1:n_in]), math.prod(shape[n_in + 1:])
    rows, cols = slice(o0 * out_inner, o1 * out_inner), slice(i0 * in_inner, i1 * in_inner)
    if len(tensor.get_shape()) == 2:
        block = tensor[rows, cols]
    else:  # patch: HF Conv3d [W, C, T, 14, 14]; the columns are the flattened rest
        block = tensor[rows].reshape(rows.stop - rows.start, -1)[:, cols]
    ours = block.T.reshape((i1 - i0,) + tuple(shape[1:n_in]) + (o1 - o0,) + tuple(shape[n_in + 1:]))
    return ours[(slice(None),) + cut(bounds[1:n_in]) + (slice(None),) + cut(bounds[n_in + 1:])]


# ------------------------------------------------------------------ train state and the update program
def state_shardings(optimizer: optax.GradientTransformation, params_sharding: dict,
                    mesh: Mesh) -> train_step.TrainState:
    """TrainState shardings: optimizer moments like their params, counters replicated."""
    shapes = jax.eval_shape(optimizer.init, jax.tree.map(lambda s: jax.ShapeDtypeStruct((1,), jnp.float32),
                                                         params_sharding))
    opt = optax.tree_map_params(optimizer, lambda _, s: s, shapes, params_sharding,
                                transform_non_params=lambda _: replicated(mesh))
    return train_step.TrainState(step=replicated(mesh), params=params_sharding, opt_state=opt)


def abstract_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules: Rules = TRAIN_RULES, dtype: Any = jnp.float32) -> train_step.TrainState:
    """The TrainState as ShapeDtypeStructs carrying their shardings (nothing allocated): the
    target to restore a checkpoint onto, or to compile the update ahead of time."""
    psh = param_shardings(cfg, mesh, rules)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                          hf_io.unflatten({k: jax.ShapeDtypeStruct(shape, dtype)
                                           for k, (shape, _) in _param_meta(cfg).items()}), psh)
    state = jax.eval_shape(lambda p: train_step.init_state(p, optimizer), params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                        state_shardings(optimizer, psh, mesh))


def init_train_state(params, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules = TRAIN_RULES,
                     cfg: ModelConfig | None = None) -> train_step.TrainState:
    """`train_step.init_state` with the state created in its shards (params copied, not aliased)."""
    psh = param_shardings(cfg, mesh, rules) if cfg else jax.tree.map(lambda x: x.sharding, params)
    ssh = state_shardings(optimizer, psh, mesh)
    return jax.jit(lambda p: train_step.init_state(p, optimizer), in_shardings=(psh,), out_shardings=ssh)(params)


def shard_update_fn(model: Qwen2VL, optimizer: optax.GradientTransformation, grpo_cfg, mesh: Mesh,
                    rules: Rules = TRAIN_RULES, chunk_size: int = 128, batch_sharding: Any = None):
    """`train_step.make_update_fn` on the mesh: `update(state, ref_params, batch) -> (state, metrics)`.

    State and reference params in the training layout, metrics replicated, the state
    donated. `batch_sharding` defaults to the batch's own (`shard_batch`).
    """
    psh = param_shardings(model.cfg, mesh, rules)
    ssh = state_shardings(optimizer, psh, mesh)
    fn = functools.partial(train_step.grpo_update, model, optimizer, grpo_cfg, chunk_size=chunk_size)
    return jax.jit(with_rules(fn, mesh, rules), in_shardings=(ssh, psh, batch_sharding),
                   out_shardings=(ssh, replicated(mesh)), donate_argnums=(0,))


def shard_sft_fn(model: Qwen2VL, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules = TRAIN_RULES,
                 chunk_size: int = 128, batch_sharding: Any = None):
    """`train_step.make_sft_fn` on the mesh: `sft(state, batch) -> (state, metrics)`."""
    ssh = state_shardings(optimizer, param_shardings(model.cfg, mesh, rules), mesh)
    fn = functools.partial(train_step.sft_update, model, optimizer, chunk_size=chunk_size)
    return jax.jit(with_rules(fn, mesh, rules), in_shardings=(ssh, batch_sharding),
                   out_shardings=(ssh, replicated(mesh)), donate_argnums=(0,))


def shard_apply(fn: Callable, mesh: Mesh, rules: Rules = TRAIN_RULES, **jit_kwargs):
    """Any function of (params, batch, ...) jitted on the mesh with the rules in context
    (evaluation forward passes, parity tests). Shardings come from the arguments."""
    return jax.jit(with_rules(fn, mesh, rules), **jit_kwargs)


# ------------------------------------------------------------------ batches
def _batch_dim(path, root) -> int:
    """Which dimension of a batch leaf is the batch: `Rollouts` lead with micro-batches [M],
    M-RoPE positions with their 3 axes [3, B, T]."""
    at = 1 if isinstance(root, train_step.Rollouts) else 0
    return at + any(getattr(k, "name", None) == "positions" for k in path)


def batch_shardings(tree, mesh: Mesh, rules: Rules = TRAIN_RULES, global_shapes: Any = None):
    """NamedShardings for a batch (`Rollouts`, `ModelInputs`, `SampleOutput` or plain arrays
    with a leading batch dimension): rows split over the rule for "batch" (data × fsdp);
    packed image rows [R, N, F] are split the same way (vision runs data-parallel)."""
    shapes = tree if global_shapes is None else global_shapes

    def one(path, x):
        at = _batch_dim(path, tree)
        names = tuple("batch" if i == at else None for i in range(np.ndim(x)))
        return logical_sharding(names, np.shape(x), mesh, rules)

    return jax.tree_util.tree_map_with_path(one, shapes)


def constrain_batch(tree, mesh: Mesh, rules: Rules = TRAIN_RULES):
    """Inside a jitted program: `with_sharding_constraint` of a batch to `batch_shardings`."""
    return jax.lax.with_sharding_constraint(tree, batch_shardings(tree, mesh, rules))


def shard_batch(tree, mesh: Mesh, rules: Rules = TRAIN_RULES, *, process_local: bool = False, merge: int = 2):
    """Host batch (NumPy) → global jax.Arrays split along the batch.

    process_local=False: every process holds the whole global batch (one process, or the
      same data everywhere); each device takes its rows.
    process_local=True: each process holds only ITS rows (the data pipeline shards by
      `jax.process_index()`); they become the global rows its devices hold (`host_local`
      reads them back). Packed image rows are local too, so `vision_index` (an index into
      the packed features) is re-pointed at the global rows (`_offset_vision_index`).
    """
    if not process_local or jax.process_count() == 1:
        sh = batch_shardings(tree, mesh, rules)
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                            tree, sh)
    global_shapes = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(_global_shape(np.shape(x), _batch_dim(path, tree), mesh, rules), x.dtype),
        tree)
    sh = batch_shardings(tree, mesh, rules, global_shapes)
    for s, g in zip(jax.tree.leaves(sh), jax.tree.leaves(global_shapes)):
        if len(s.spec) == 0 or all(a is None for a in s.spec):
            raise ValueError(f"process-local batch of global shape {g.shape} cannot be split over the batch "
                             f"axes of mesh {dict(mesh.shape)}: make the global batch divisible")
    tree = _offset_vision_index(tree, sh, global_shapes, merge)
    return jax.tree.map(lambda x, s, g: jax.make_array_from_process_local_data(s, np.asarray(x), g.shape),
                        tree, sh, global_shapes)


def _global_shape(local: tuple[int, ...], at: int, mesh: Mesh, rules: Rules) -> tuple[int, ...]:
    """Local shape → global: the batch dimension times the number of processes' row blocks."""
    spec = nn.logical_to_mesh_axes(tuple("batch" if i == at else None for i in range(len(local))), rules)
    axes = spec[at] if at < len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    total = math.prod(mesh.shape[a] for a in axes)
    coords = {tuple(c[mesh.axis_names.index(a)] for a in axes)
              for c in np.ndindex(mesh.devices.shape) if mesh.devices[c].process_index == jax.process_index()}
    return local[:at] + (local[at] * total // max(len(coords), 1),) + local[at + 1:]


def _offset_vision_index(tree, shardings, global_shapes, merge: int):
    """Re-points `vision_index` of process-local `ModelInputs` into the GLOBAL packed features.

    A process's packed image rows land in the global rows its devices hold: its blocks of
    the row axis in ascending order (as `make_array_from_process_local_data` places them),
    contiguous or not. vision_index = row · N/merge² + column is mapped row by row.
    """

    def fix(inputs: ModelInputs, pix_sharding: NamedSharding, pix_shape) -> ModelInputs:
        at = len(pix_shape) - 3  # [(M,) R, N, F]
        per_row = pix_shape[at + 1] // (merge * merge)
        spans = sorted({idx[at].indices(pix_shape[at])[:2]
                        for idx in pix_sharding.addressable_devices_indices_map(pix_shape).values()})
        global_row = np.concatenate([np.arange(a, b) for a, b in spans])  # local packed row → global row
        vi = np.asarray(inputs.vision_index)
        return inputs.replace(vision_index=(global_row[vi // per_row] * per_row + vi % per_row).astype(vi.dtype))

    if isinstance(tree, train_step.Rollouts):
        return tree.replace(prompts=fix(tree.prompts, shardings.prompts.pixels, global_shapes.prompts.pixels.shape))
    if isinstance(tree, ModelInputs):
        return fix(tree, shardings.pixels, global_shapes.pixels.shape)
    return tree


# ------------------------------------------------------------------ the training loop's plumbing
def replicate(tree, mesh: Mesh):
    """Host values that are the same on every process (a PRNG key) → arrays replicated on
    every device of the mesh."""
    sh = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sh, lambda i: np.asarray(x)[i]), tree)


def batch_shards(mesh: Mesh, rules: Rules = TRAIN_RULES) -> int:
    """How many blocks a batch is split into: the product of the mesh axes of the "batch" rule
    (data × fsdp)."""
    return math.prod(mesh.shape[a] for a in _batch_axes(rules))


def check_batch_sizes(sizes: Mapping[str, int], mesh: Mesh, rules: Rules = TRAIN_RULES) -> None:
    """ValueError naming every batch size ({config key: prompts}) that the batch shards (data ×
    fsdp) do not divide: every device must get whole rows, and every process its own rows."""
    shards, axes = batch_shards(mesh, rules), _batch_axes(rules)
    mine = {tuple(c[mesh.axis_names.index(a)] for a in axes)
            for c in np.ndindex(mesh.devices.shape) if mesh.devices[c].process_index == jax.process_index()}
    if len(mine) * jax.process_count() != shards:
        raise ValueError(f"mesh {dict(mesh.shape)} does not give each of the {jax.process_count()} processes its "
                         f"own rows of the batch (a tensor axis across hosts?): make data × fsdp a multiple of "
                         f"the process count")
    bad = [f"{k}={v}" for k, v in sizes.items() if v % shards]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: batch sizes must be multiples of the {shards} batch shards "
                         f"(data × fsdp) of mesh {dict(mesh.shape)}; change them, or config.mesh")


def _batch_axes(rules: Rules) -> tuple[str, ...]:
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
