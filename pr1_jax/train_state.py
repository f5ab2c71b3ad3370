"""The training state on the device mesh: its shardings, its abstract form, and creating it.

    state = init_train_state(params, optimizer, mesh, cfg=model_cfg)     # created in its shards
    target = abstract_train_state(model_cfg, optimizer, mesh)            # ShapeDtypeStructs with shardings

Optimizer moments are laid out like their parameters (`sharding.TRAIN_RULES`), counters
replicated. The restore target of a checkpoint (`checkpoint.Checkpoints.restore_latest`) and
the argument of an ahead-of-time compile (`aot.py`) are `abstract_train_state`s.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from pr1_jax import sharding
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.structs import TrainState
from pr1_jax.train_step import init_state


def state_shardings(optimizer: optax.GradientTransformation, params_sharding: dict,
                    mesh: jax.sharding.Mesh) -> TrainState:
    """TrainState shardings: optimizer moments like their params, counters replicated."""
    shapes = jax.eval_shape(optimizer.init, jax.tree.map(lambda s: jax.ShapeDtypeStruct((1,), jnp.float32),
                                                         params_sharding))
    opt = optax.tree_map_params(optimizer, lambda _, s: s, shapes, params_sharding,
                                transform_non_params=lambda _: sharding.replicated(mesh))
    return TrainState(step=sharding.replicated(mesh), params=params_sharding, opt_state=opt)


def abstract_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                         rules: sharding.Rules = sharding.TRAIN_RULES, dtype: Any = jnp.float32) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their shardings (nothing allocated): the
    target to restore a checkpoint onto, or to compile the update ahead of time."""
    psh = sharding.param_shardings(cfg, mesh, rules)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                          hf_io.unflatten({k: jax.ShapeDtypeStruct(shape, dtype)
                                           for k, (shape, _) in sharding._param_meta(cfg).items()}), psh)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                        state_shardings(optimizer, psh, mesh))


def init_train_state(params, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                     rules: sharding.Rules = sharding.TRAIN_RULES, cfg: ModelConfig | None = None) -> TrainState:
    """`init_state` with the state created in its shards (params copied, not aliased)."""
    psh = sharding.param_shardings(cfg, mesh, rules) if cfg else jax.tree.map(lambda x: x.sharding, params)
    ssh = state_shardings(optimizer, psh, mesh)
    return jax.jit(lambda p: init_state(p, optimizer), in_shardings=(psh,), out_shardings=ssh)(params)
