"""A jitted function's executables, one per signature of its arguments, that can also be
compiled *ahead* of their first call, on a background thread, while the device runs other work.

    exe = Executables(jax.jit(f, static_argnames=("n",)))
    y = exe(x, n=3)                                    # compiled on the first call of this signature
    exe.compile_ahead(jax.ShapeDtypeStruct(...), n=4)  # True: scheduled; returns at once
    exe.num_compiled                                   # programs compiled by calls (not ahead)

Why not `jax.jit`'s own cache: an executable made by `.lower(...).compile()` never enters it, so
a program compiled in advance would be compiled again at its first call. Here both kinds live
in one table. The curriculum uses it (`train.py`): a later stage with more rollouts per prompt
has its rollout programs compiled during the stage before, so the switch compiles only its update.

A signature is the static arguments, the tree of the others, and each leaf's shape and dtype;
leaves' shardings must be equivalent (`Sharding.is_equivalent_to`) for an executable to be
reused: a compiled program accepts only the layouts it was compiled for.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable, Sequence

import jax

log = logging.getLogger(__name__)


def abstract(tree: Any, default_sharding: Any = None) -> Any:
    """The shapes, dtypes and shardings of a tree of arrays (for lowering or as a checkpoint's
    restore target; no buffer is kept). Leaves without a sharding (NumPy) get `default_sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default_sharding), tree)


class Executables:
    """`jitted`'s compiled programs by argument signature (module docstring)."""

    def __init__(self, jitted: Callable, static_argnames: Sequence[str] = ()):
        self.jitted, self.static_argnames = jitted, tuple(static_argnames)
        # (statics, tree, shapes) → [(shardings, executable or Future of one)]
        self._table: dict[tuple, list[tuple[tuple, Any]]] = {}
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.num_compiled = 0  # compiled by a call (what a step waited for)
        self.num_ahead = 0  # compiled (or compiling) ahead of use

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        key, shardings, dynamic = self._signature(args, kwargs)
        have, exe = self._find(key, shardings)
        if isinstance(exe, concurrent.futures.Future):
            try:
                exe = exe.result()  # compiled ahead: wait for it if it is not done yet
            except Exception as e:  # noqa: BLE001  compile it here instead (then it is counted as compiled)
                log.warning("a program compiled ahead failed (%s); compiling it now", e)
                exe = None
            else:
                with self._lock:
                    self._put(key, have, exe)  # in the future's place
        if exe is None:
            exe = self.jitted.lower(*args, **kwargs).compile()
            with self._lock:
                self._put(key, shardings if have is None else have, exe)
                self.num_compiled += 1
        return exe(*dynamic)

    def compile_ahead(self, *args, **kwargs) -> bool:
        """Schedules this signature's compile on the background thread (arguments may be
        abstract: `abstract(tree)`). False when it is compiled or scheduled already."""
        key, shardings, _ = self._signature(args, kwargs)
        with self._lock:
            if self._find(key, shardings)[1] is not None:
                return False
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
            self._put(key, shardings, self._pool.submit(self._compile, args, kwargs))
            self.num_ahead += 1
        return True

    def _compile(self, args, kwargs):
        t0 = time.perf_counter()
        exe = self.jitted.lower(*args, **kwargs).compile()
        log.info("compiled ahead in %.1f s", time.perf_counter() - t0)
        return exe

    def _signature(self, args, kwargs) -> tuple[tuple, tuple, list]:
        statics = tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames))
        extra = [k for k in kwargs if k not in self.static_argnames]
        if extra:
            raise TypeError(f"pass {extra} positionally: only static arguments may be keywords")
        leaves, tree = jax.tree.flatten(args)
        shapes = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
        shardings = tuple(getattr(x, "sharding", None) for x in leaves)
        return (statics, tree, shapes), shardings, list(args)

    def _find(self, key: tuple, shardings: tuple) -> tuple[tuple | None, Any]:
        """(the shardings it was compiled for, the executable or its Future), or (None, None)."""
        for have, exe in self._table.get(key, ()):
            if all(_equivalent(a, b, len(s[0])) for a, b, s in zip(have, shardings, key[2])):
                return have, exe
        return None, None

    def _put(self, key: tuple, shardings: tuple, exe: Any) -> None:
        entries = self._table.setdefault(key, [])
        entries[:] = [(s, e) for s, e in entries if s != shardings]
        entries.append((shardings, exe))


def _equivalent(a, b, ndim: int) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or a.is_equivalent_to(b, ndim)
