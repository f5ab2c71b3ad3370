"""Reward registry: name → `fn(completions: list[str], **columns) -> np.ndarray[float32]`.

    from pr1_jax import rewards
    fn = rewards.get("pr1_detection", do_penalty=False)   # knobs bound as keyword defaults
    r = fn(texts, solution=gts, problem=..., image=...)   # [B] float32, never raises on text

Every registered function takes the decoded completions first and the dataset columns as
keyword arguments (unknown columns such as `problem`, `image`, `prompts`, `current_step`
are accepted and ignored), and returns one float32 per completion.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

RewardFn = Callable[..., np.ndarray]

_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: registers `fn` under `name` (names are unique)."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def get(name: str, **knobs) -> RewardFn:
    """The reward registered as `name`; `knobs` (e.g. `do_penalty=False`) are bound as defaults."""
    if name not in _REGISTRY:
        _task_rewards()
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(names())}") from None
    if not knobs:
        return fn
    bound = functools.partial(fn, **knobs)
    functools.update_wrapper(bound, fn)
    return bound


def names() -> list[str]:
    """Registered reward names, sorted (PR1's and those of the tasks in `pr1_jax/tasks`)."""
    _task_rewards()
    return sorted(_REGISTRY)


def _task_rewards() -> None:
    """Registers the rewards that task modules define (e.g. pointing's), by importing them."""
    import pr1_jax.tasks  # noqa: F401  (lazy: the tasks import this package)
