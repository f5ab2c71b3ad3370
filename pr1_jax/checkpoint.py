"""Orbax checkpoints of the whole GRPO train state: exact resume, preemption, keep-N.

    ckpt = Checkpoints(workdir / "checkpoints", keep=3)       # async orbax CheckpointManager; gs://… too
    ckpt.save(step, state, rng=rng, data_state=data.get_state(), meta={"history": ...})
    got = ckpt.restore_latest(abstract_like(state), rng)     # None on a fresh workdir
    state, rng, data_state, meta = got.state, got.rng, got.data_state, got.meta
    params = ckpt.restore_params(step)                       # NumPy tree (export)

Layout: `checkpoints/step_<N>/` holds four orbax items; N counts GRPO steps done.
  params  the policy parameters (a pytree of arrays; all that `pr1_jax.export` reads);
  train   {"step": optimizer steps, "opt_state": optax state, "rng": the loop's PRNG key};
  data    the data iterator state, one JSON file per process (`process_<i>-of-<n>.json`):
          every host resumes its own shard at exactly its next example (a restart with
          another number of processes restarts the iterators, with a warning: see below);
  meta    JSON: what the run needs besides arrays (plot history, where the reference
          policy lives, the base model dir and its HF config, the run config) plus, per
          saved array, its path/shape/dtype ("signature") and a 32-bit checksum.
Step 0, when present, is the policy after the SFT warm-up. It is GRPO's frozen
reference, so it is kept for good; otherwise the newest `keep` steps are kept. The
reference is never stored per step: it is restored from its source (step 0, or the
base model directory when there was no warm-up).

Resume: `restore_latest` tries the newest step first. A checkpoint whose files cannot
be read (missing, truncated) or whose arrays do not reproduce the checksums taken at
save time is *corrupt*: it is logged with the reason, renamed `step_<N>.corrupt` (kept
for inspection, ignored by orbax) and the previous step is tried. A checkpoint that
reads fine but was written for other shapes/dtypes (a changed config) raises
ValueError instead: that is a mistake to fix, not a file to skip. Saves of a killed
process are never seen half-written: on a file system orbax writes
`step_<N>.orbax-checkpoint-tmp-*` and renames it when complete; on GCS (no atomic rename)
it writes `step_<N>/` and marks it complete with a `commit_success.txt` written last.
Leftovers are removed when the manager opens.

Preemption: `Preemption()` turns SIGTERM, and the first Ctrl-C (SIGINT), into a request
that the training loop honours at the end of the current step (`stop_requested()`, agreed
by all processes): it saves a checkpoint, waits for it and exits with status 0. A second
Ctrl-C exits at once (the signal's default action, even inside a long device call; the
last complete checkpoint stays good). Inside `exit_at_once()` (the SFT warm-up, which is
not checkpointed) SIGTERM or Ctrl-C exits at once with status 0; a restart redoes the
warm-up. SIGKILL needs nothing: a restart resumes from the last complete checkpoint (see
docs/checkpoints.md).

Storage and hosts (docs/storage.md): `directory` is a local path or any URI etils.epath
supports (gs://bucket/run/checkpoints on a TPU pod), the one location every process writes
to. Every process calls `save` and `restore` with the same directory: orbax's multi-host
protocol has each process write the shards of the arrays it holds (each shard once; OCDBT
`ocdbt.process_<i>/` files), while process 0 (orbax's primary host) creates and finalizes
the step directory and writes the JSON items; `data` is the one item every process writes
a file of. Nothing goes to per-process local paths.

Resharding: arrays are restored onto the shardings of the target given to `restore*`
(ShapeDtypeStructs with a sharding, `abstract_like`), whatever mesh saved them: a run saved
on 8 devices resumes on 4 or on 16 with the same values (the checksums check it). A
restart with another number of processes (a bigger or smaller slice) resumes the arrays
but cannot resume the data iterators, whose shards depend on the process count:
`Restored.data_state` is then None and a warning says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pr1_jax import multihost
from pr1_jax.errors import ConfigError
from pr1_jax.executables import abstract
from pr1_jax.structs import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "data", "meta")
FORMAT = 1  # bump when the layout above changes


class CorruptCheckpointError(Exception):
    """A checkpoint directory that cannot be read back exactly as it was saved."""


# ------------------------------------------------------------------ per-process JSON item (data iterators)
class _HostJsonHandler(ocp.handlers.CheckpointHandler):
    """Each process writes and reads its own JSON file: `process_<i>-of-<n>.json` (in the
    shared step directory). Restored with another process count: None (see the module doc)."""

    @staticmethod
    def _file(directory) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory, args: "HostJsonSave"):
        epath.Path(directory).mkdir(parents=True, exist_ok=True)
        self._file(directory).write_text(json.dumps(args.item))

    def restore(self, directory, args: "HostJsonRestore | None" = None) -> Any:
        path = self._file(directory)
        if not path.exists():
            found = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
            counts = {name.rsplit("-of-", 1)[-1].removesuffix(".json") for name in found}
            if found and str(jax.process_count()) not in counts:  # saved by another number of processes
                return None
            raise FileNotFoundError(f"{path} is missing (found {found})")
        return json.loads(path.read_text())

    def metadata(self, directory) -> None:
        return None

    def finalize(self, directory) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(_HostJsonHandler, for_save=True)
@dataclasses.dataclass
class HostJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_HostJsonHandler, for_restore=True)
@dataclasses.dataclass
class HostJsonRestore(ocp.args.CheckpointArgs):
    item: Any = None


# ------------------------------------------------------------------ integrity: signatures and checksums
def signature(tree) -> list[list]:
    """[[path, shape, dtype], ...] of a pytree's leaves (arrays or ShapeDtypeStructs)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [[jax.tree_util.keystr(path), list(x.shape), str(x.dtype)] for path, x in leaves]


def _as_uint32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, bits)  # 8-byte items become [..., 2] words
    return u.astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """Σ word · (2·index + 1) mod 2³²: any single changed word changes it (odd weights are
    invertible mod 2³²). Elementwise then one reduction, so sharded arrays stay sharded."""
    u = _as_uint32(x)
    index = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(u.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= u.shape[axis]
    return jnp.sum(u * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> jax.Array:
    return jnp.stack([_checksum(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def checksums(tree) -> list[int]:
    """One uint32 checksum per leaf of a pytree of arrays (bit-level, order-sensitive); the same
    on every process of a multi-host run."""
    return [int(v) for v in multihost.fetch(_checksums(jax.tree.leaves(tree)))]


def abstract_like(tree):
    """ShapeDtypeStructs with each array's sharding: the restore target for a tree like `tree`."""
    return abstract(tree, default_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _check_signature(step_dir: epath.Path, item: str, saved: list | None, target) -> None:
    if saved is None:
        raise CorruptCheckpointError(f"meta lists no arrays for {item!r} (not a pr1_jax checkpoint "
                                     f"of format {FORMAT})")
    want = signature(target)
    if saved == want:
        return
    diff = [f"{a[0]}: saved {a[1:]} vs now {b[1:]}" for a, b in zip(saved, want) if a != b][:5]
    if len(saved) != len(want):
        diff.insert(0, f"{len(saved)} saved arrays vs {len(want)} now")
    raise ConfigError(f"{step_dir} ({item}) was written for other shapes/dtypes than this run's "
                      f"(changed model, dtype or optimizer config?): " + "; ".join(diff)
                      + "; use the run's config, or another --config.workdir")


def _verify(meta: dict, items: dict) -> None:
    """Checksums of the restored arrays against those taken at save time."""
    for name, tree in items.items():
        want = meta.get("checksums", {}).get(name)
        got = checksums(tree)
        if want != got:
            paths = [s[0] for s in meta["signature"][name]]
            bad = [p for p, a, b in zip(paths, want or [], got) if a != b] if want else ["<no checksums>"]
            raise CorruptCheckpointError(f"{name}: {len(bad)} array(s) differ from what was saved "
                                         f"(first: {bad[:3]})")


# ------------------------------------------------------------------ the manager
@dataclasses.dataclass
class Restored:
    step: int  # GRPO steps done
    state: TrainState
    rng: jax.Array
    data_state: dict | None  # None: saved by another number of processes (module doc)
    meta: dict


class Checkpoints:
    """An async orbax CheckpointManager over `directory/step_<N>` (see the module docstring).
    `directory`: a local path or a URI such as gs://bucket/run/checkpoints, the same on every
    process."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = multihost.storage_path(directory)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            step_prefix="step", enable_async_checkpointing=async_save, read_only=read_only,
            create=not read_only, cleanup_tmp_directories=not read_only,
            preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(max(1, keep)),
                                                                policies.CustomSteps([0])]))
        handlers = {"params": ocp.handlers.StandardCheckpointHandler(),
                    "train": ocp.handlers.StandardCheckpointHandler(),
                    "data": _HostJsonHandler(), "meta": ocp.handlers.JsonCheckpointHandler()}
        # Orbax's multi-host defaults: process 0 is the primary host (directories, JSON items,
        # finalization); every process writes its own array shards to `directory`.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ---------------------------------------------------------------- writing
    def save(self, step: int, state: TrainState, *, rng: jax.Array, data_state: Mapping,
             meta: Mapping | None = None) -> None:
        """Starts an asynchronous save of step `step`; returns once arrays are copied off device.

        `state` may be donated to the next update right after this returns.
        """
        if step in self._manager.all_steps():
            log.info("checkpoint step %d already exists in %s; not saved again", step, self.directory)
            return
        train = {"step": state.step, "opt_state": state.opt_state, "rng": rng}
        meta = dict(meta or {}, format=FORMAT, step=int(step),
                    signature={"params": signature(state.params), "train": signature(train)},
                    checksums={"params": checksums(state.params), "train": checksums(train)})
        self._manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
            data=HostJsonSave(dict(data_state)), meta=ocp.args.JsonSave(meta)))
        log.info("checkpoint step %d → %s", step, self.directory / f"step_{step}")

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ---------------------------------------------------------------- reading
    def steps(self) -> list[int]:
        """Complete checkpoints on disk, oldest first (not yet checked for corruption)."""
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / f"step_{step}"

    def read_meta(self, step: int) -> dict:
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as e:  # noqa: BLE001 (orbax raises many types for unreadable files)
            raise CorruptCheckpointError(f"meta unreadable: {type(e).__name__}: {_first_line(e)}") from e

    def restore(self, step: int, like: TrainState, rng_like: jax.Array) -> Restored:
        """Step `step` onto the shapes, dtypes and shardings of `like` / `rng_like` (arrays or
        ShapeDtypeStructs). Raises CorruptCheckpointError or ValueError (see module doc)."""
        meta = self.read_meta(step)
        like_train = {"step": like.step, "opt_state": like.opt_state, "rng": rng_like}
        for item, target in (("params", like.params), ("train", like_train)):
            _check_signature(self.step_dir(step), item, meta.get("signature", {}).get(item), target)
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_like(like.params)),
                                  train=ocp.args.StandardRestore(abstract_like(like_train)),
                                  data=HostJsonRestore())
        try:
            got = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"arrays unreadable: {type(e).__name__}: {_first_line(e)}") from e
        _verify(meta, {"params": got.params, "train": got.train})
        train = got.train
        state = TrainState(step=train["step"], params=got.params, opt_state=train["opt_state"])
        if got.data is None:
            log.warning("%s was saved by another number of processes than this run's %d: the arrays are "
                        "restored onto this run's mesh, but the data iterators cannot be carried over to "
                        "another split of the data and start afresh", self.step_dir(step), jax.process_count())
        return Restored(step, state, train["rng"], None if got.data is None else dict(got.data), meta)

    def restore_latest(self, like: TrainState, rng_like: jax.Array) -> Restored | None:
        """The newest checkpoint that reads back exactly; corrupt ones are set aside with a warning."""
        for step in reversed(self.steps()):
            try:
                got = self.restore(step, like, rng_like)
            except CorruptCheckpointError as e:
                older = [s for s in self.steps() if s < step]
                log.warning("checkpoint %s is corrupt or incomplete (%s). Renaming it to %s.corrupt "
                            "and trying %s.", self.step_dir(step), e, self.step_dir(step).name,
                            f"step {older[-1]}" if older else "nothing older (starting afresh)")
                self._set_aside(step)
                continue
            log.info("resuming from %s (GRPO step %d)", self.step_dir(step), step)
            return got
        return None

    def restore_params(self, step: int | None = None, like=None):
        """The policy parameters of `step` (default: the newest), verified.

        `like`: a tree of arrays/ShapeDtypeStructs to restore onto (shardings included);
        None gives NumPy arrays on the host, whatever mesh saved them (for export).
        """
        if step is None and not self.steps():
            raise FileNotFoundError(f"{self.directory} holds no complete checkpoint (step_<N> directories)")
        step = self.steps()[-1] if step is None else step
        if step not in self.steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (have {self.steps()})")
        meta = self.read_meta(step)
        saved = meta.get("signature", {}).get("params")
        host = like is None
        like = self._host_target(step) if host else like
        _check_signature(self.step_dir(step), "params", saved, like)
        try:
            params = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_like(like)))).params
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"{self.step_dir(step)}: params unreadable: {type(e).__name__}: "
                                         f"{_first_line(e)}") from e
        _verify(meta, {"params": params})
        return jax.device_get(params) if host else params

    # ---------------------------------------------------------------- internals
    def _host_target(self, step: int):
        """The saved params tree as ShapeDtypeStructs on one local device."""
        try:
            tree = self._manager.item_metadata(step).params
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"{self.step_dir(step)}: params metadata unreadable: {e}") from e
        device = jax.local_devices(backend="cpu")[0] if _has_cpu() else jax.local_devices()[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.step_dir(step)
            dst = src.with_name(src.name + ".corrupt")
            n = 1
            while dst.exists():
                dst, n = src.with_name(f"{src.name}.corrupt{n}"), n + 1
            src.rename(dst)  # on GCS: a copy of every object, then the originals deleted
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"pr1_jax_set_aside_{step}")
        self._manager.reload()


def _first_line(e: Exception, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text[:limit] + (" …" if len(text) > limit else "")


def _has_cpu() -> bool:
    try:
        return bool(jax.local_devices(backend="cpu"))
    except RuntimeError:
        return False


# ------------------------------------------------------------------ preemption
class Preemption:
    """SIGTERM or a first SIGINT (Ctrl-C) → a stop request honoured at the next step boundary
    (or at once, see below); a second SIGINT → the default action: the process ends now.

    Install once in the main thread; `close()` restores the previous handlers. A signal already
    ignored (SIG_IGN) stays ignored.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._requested = False
        self._exit_at_once = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM and Ctrl-C keep their default action (no checkpoint "
                        "on preemption)")
            return
        for s in signals:
            if signal.getsignal(s) is signal.SIG_IGN:
                # Ignored by whoever started us (nohup; `cmd &` in a script, so that the terminal's
                # Ctrl-C is not meant for this process): left ignored, as Python itself does for SIGINT.
                continue
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self._requested = True
        if signum == signal.SIGINT:
            # A Python handler runs only between bytecodes, i.e. after the device call in flight;
            # the default action ends the process when the second Ctrl-C arrives.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self._exit_at_once:
            log.warning("%s during a phase without checkpoints: exiting now", name)
            raise SystemExit(0)
        again = "; Ctrl-C again to exit now" if signum == signal.SIGINT else ""
        log.warning("%s received: saving a checkpoint at the end of this step, then exiting%s", name, again)

    @property
    def requested(self) -> bool:
        """This process got the signal."""
        return self._requested

    def stop_requested(self) -> bool:
        """True on every process once any process got the signal (an all-gather when multi-host)."""
        flag = self._requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flag = bool(np.max(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
        return flag

    @contextlib.contextmanager
    def exit_at_once(self):
        """Within this block a SIGTERM or SIGINT (or one received before it) exits with status 0
        immediately."""
        if self._requested:
            raise SystemExit(0)
        self._exit_at_once = True
        try:
            yield
        finally:
            self._exit_at_once = False

    def close(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


# ------------------------------------------------------------------ run logs consistent with a resume
def trim_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool]) -> None:
    """Rewrites a JSON-lines log keeping the rows `keep` accepts (drops unparsable ones).

    On resume from step N, the rows a killed run wrote after N are dropped: the resumed
    run writes them again, so the log has exactly one row per step. `path`: local (replaced
    atomically) or a URI (an object is rewritten whole, which is atomic on GCS).
    """
    path = multihost.storage_path(path)
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if keep(row):
            rows.append(line)
    text = "".join(r + "\n" for r in rows)
    if not multihost.is_local(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
