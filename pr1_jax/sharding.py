"""Sharding over a device mesh: the mesh, the logical-axis rules, sharded parameters and
batches (the train state on the mesh: `pr1_jax/train_state.py`; the jitted programs:
`pr1_jax/programs.py`; process-level helpers: `pr1_jax/multihost.py`; the rollout on the
mesh: `pr1_jax/sharded_sampler.py`).

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)              # -1 takes the remaining devices
    params = load_params(model_dir, mesh)                     # each host reads only its slices
    batch = shard_batch(batch, mesh)                          # split over data × fsdp

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
from flax.core import meta
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pr1_jax.errors import ConfigError
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import init_params as _init_boxed
from pr1_jax.structs import ModelInputs, Rollouts

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
    """`hf_io.load_params`, sharded by `rules` on `mesh` (`hf_io.load_params_sharded`): every
    device's block is read straight from the safetensors files, so a process reads only the
    rows/columns its devices hold and the full model never exists in one place."""
    cfg = cfg or ModelConfig.from_pretrained(model_dir)
    metas = _param_meta(cfg)
    shardings = {path: logical_sharding(names, shape, mesh, rules) for path, (shape, names) in metas.items()}
    return hf_io.load_params_sharded(model_dir, cfg, shardings, dtype)


# ------------------------------------------------------------------ batches
def _batch_dim(path, root) -> int:
    """Which dimension of a batch leaf is the batch: `Rollouts` lead with micro-batches [M],
    M-RoPE positions with their 3 axes [3, B, T]."""
    at = 1 if isinstance(root, Rollouts) else 0
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


def as_one_micro_batch(inputs: ModelInputs, mesh: Mesh, rules: Rules = TRAIN_RULES) -> ModelInputs:
    """Prompts already on the mesh ([B, ...], `shard_batch`) → the prompts of a one-micro-batch
    `Rollouts` ([1, B, ...], laid out as `shard_batch` lays out a batch's): no second transfer."""
    shapes = Rollouts(prompts=jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape, a.dtype), inputs),
                      completions=None, mask=None, advantages=None, old_logp=None, group_weight=None)
    return jax.device_put(_with_micro_axis(inputs), batch_shardings(shapes, mesh, rules).prompts)


_with_micro_axis = jax.jit(lambda t: jax.tree.map(lambda a: a[None], t))  # compiled once per shape


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

    if isinstance(tree, Rollouts):
        if tree.prompts is None:  # sharded on their own (`as_one_micro_batch`)
            return tree
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
