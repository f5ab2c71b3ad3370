"""What every command line shares: an expected mistake ends in ONE line on stderr and exit
status 2, a bug keeps its traceback.

    def main(argv=None) -> int:                      # argparse commands
        return cli.run("pr1_jax.export", _main, argv)
    sys.exit(cli.run("pr1_jax.train", app.run, main, flags_parser=cli.absl_flags("pr1_jax.train")))

Expected (`expected_message`): `ConfigError` (a value to change; `InferError`/`EvalError` are
ones), files and directories that are missing, not writable or of the wrong kind
(`FileNotFoundError`, `PermissionError`, ...), a corrupt checkpoint, a missing third-party
package, and flag mistakes: argparse's (`ArgumentParser`) and absl/ml_collections' (`absl_flags`:
unknown flags, values that do not parse, config files that do not load, unknown config keys
— named with the closest valid key). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import math
import numbers
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from pr1_jax.errors import ConfigError

USAGE_ERROR = 2  # argparse's status for a usage mistake; every command uses it
# Filesystem failures a person fixes by choosing another path or fixing permissions or space.
_FS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_FS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _closest(word: str, choices: Sequence[str]) -> str:
    """"; did you mean X?" for the closest of `choices` to `word` (a typo), else ""."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def fail(name: str, message: str) -> int:
    """Prints `name: error: message` as one line on stderr; returns the exit status (2)."""
    print(f"{name}: error: {one_line(message)}", file=sys.stderr, flush=True)
    return USAGE_ERROR


def expected_message(e: BaseException) -> str | None:
    """The one-line message of an expected failure, None for a bug (which keeps its traceback)."""
    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, _FS_ERRORS) or isinstance(e, OSError) and e.errno in _FS_ERRNOS:
        if not (e.strerror and e.filename):  # raised with a message of ours, which says what to do
            return str(e)
        where = f"{e.filename}" + (f" → {e.filename2}" if e.filename2 else "")
        hint = {PermissionError: "choose a location you can write, or change its permissions",
                FileNotFoundError: "check the path"}.get(type(e), "choose another path")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "free some space or choose another disk"
        return f"{where}: {e.strerror} ({hint})"
    if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] not in ("pr1_jax", "configs"):
        return f"{e}: install the requirements (pip install -r requirements.txt)"
    corrupt = getattr(sys.modules.get("pr1_jax.checkpoint"), "CorruptCheckpointError", None)
    if corrupt is not None and isinstance(e, corrupt):  # only importable once checkpoint.py is loaded
        return f"corrupt checkpoint: {e} (export another --step, or restore the directory)"
    return None


def run(name: str, fn: Callable[..., Any], *args, **kwargs) -> int:
    """`fn(*args, **kwargs)` → its exit status (None → 0); an expected failure prints one line
    and gives 2, Ctrl-C one line and 130; a bug propagates with its traceback."""
    try:
        code = fn(*args, **kwargs)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an expected failure
        message = expected_message(e)
        if message is None:
            raise
        return fail(name, message)
    return 0 if code is None else int(code)


# ------------------------------------------------------------------ checks shared by the commands
def writable_dir(path: str | os.PathLike, key: str, error: type[ConfigError] = ConfigError):
    """Creates `path` (and its parents) and writes a probe file in it: permission bits do not
    tell (root, read-only mounts). `error` (a ConfigError) naming the flag `key` when that fails.

    Returns a `pathlib.Path` for a local directory; for a URI that etils.epath supports
    (gs://bucket/dir, …; docs/storage.md) an `epath.Path`, after writing and deleting a probe
    object there (a missing client package or missing credentials fail here, in one line).
    """
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        return _writable_uri(text, key, error)
    p = Path(os.path.expanduser(text.removeprefix("file://")))
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".pr1_jax_probe_"):
            pass
    except OSError as e:
        reason = "it is a file" if p.is_file() else e.strerror or one_line(e)
        raise error(f"{key}: cannot write to {path} ({reason}): choose a directory you can write") from e
    return p


def _writable_uri(uri: str, key: str, error: type[ConfigError]):
    import uuid

    from etils import epath

    try:
        p = epath.Path(uri)  # not mkdir: object stores have no directories (gcsfs would create a missing bucket)
        probe = p / f".pr1_jax_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 (each storage client raises its own types)
        hint = ("; gs:// needs `pip install gcsfs` (etils.epath reaches GCS through fsspec) and credentials "
                "(gcloud auth application-default login, or a TPU VM's service account)" if uri.startswith("gs://")
                else "")
        raise error(f"{key}: cannot write to {uri} ({type(e).__name__}: {one_line(e)[:300]}){hint}") from e
    return p


def model_dir(path: str, key: str) -> Path:
    """A Hugging Face checkpoint directory (config.json), else a ConfigError naming `key`."""
    if not path:
        raise ConfigError(f"{key} is not set: pass {key}=DIR, a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint "
                          f"directory (e.g. Qwen2-VL-2B-Instruct)")
    p = Path(os.path.expanduser(path))
    if not p.is_dir():
        raise ConfigError(f"{key}={path}: no such directory; pass the directory of a Hugging Face Qwen2-VL "
                          f"checkpoint (with config.json)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}={path}: no config.json there, so not a Hugging Face checkpoint directory")
    try:
        config = json.loads((p / "config.json").read_bytes())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{key}={path}: its config.json is not valid JSON ({one_line(e)}): "
                          f"restore the checkpoint directory") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{key}={path}: its config.json is not a JSON object: restore the checkpoint directory")
    return p


def as_config_error(key: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """`fn(...)`, its ValueError turned into a ConfigError that names the config key to change
    (for checks that live in library code raising plain ValueError)."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e


def check_sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, *,
                   names: dict[str, str] | None = None) -> None:
    """ConfigError unless temperature is finite and ≥ 0, 0 < top_p ≤ 1 and top_k an integer ≥ 0.
    `SamplingConfig` compares these, and NaN passes no comparison, so it would sample garbage
    (`infer --temperature=nan` exited 0). `names`: how the message names each value, e.g.
    {"top_p": "--config.sampling.top_p"}."""
    name = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", **(names or {})}
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"{name['temperature']} must be a finite number ≥ 0 (0 = greedy), got {temperature}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):  # False for NaN too
        raise ConfigError(f"{name['top_p']} must be in (0, 1] (1 = off), got {top_p}")
    integral = isinstance(top_k, numbers.Integral) or isinstance(top_k, float) and top_k.is_integer()
    if isinstance(top_k, bool) or not integral or top_k < 0:
        raise ConfigError(f"{name['top_k']} must be an integer ≥ 0 (0 = off), got {top_k}")


def check_training_config(c) -> None:
    """A training config's GRPO and sampling values (`train`, `aot`), checked before anything
    loads: the training loop builds its `SamplingConfig` only after the SFT warm-up and the
    first evaluation, where a mistake would cost minutes and end in a traceback."""
    from pr1_jax import grpo, rewards
    from pr1_jax import tasks as tasks_lib

    tasks = tasks_lib.names()
    if c.task not in tasks:
        raise ConfigError(f"--config.task={c.task!r} is not a task; the tasks: {', '.join(tasks)}"
                          + _closest(c.task, tasks))
    names = c.rewards if isinstance(c.rewards, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"--config.rewards must be a non-empty tuple of reward names, got {c.rewards!r}; "
                          f"the rewards: {', '.join(rewards.names())}")
    for name in names:
        if name not in rewards.names():
            raise ConfigError(f"--config.rewards: no reward named {name!r}; the rewards: "
                              f"{', '.join(rewards.names())}" + _closest(name, rewards.names()))
    for key in ("optim.learning_rate", "sft.learning_rate"):
        section, field = key.split(".")
        lr = c[section].get(field, 0.0)
        if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"--config.{key} must be a finite number ≥ 0, got {lr}")
    step, micro = c.batch.prompts_per_step, c.batch.prompts_per_micro
    if isinstance(step, int) and isinstance(micro, int) and micro > 0 and step % micro:
        raise ConfigError(f"--config.batch.prompts_per_step={step} is not a multiple of "
                          f"--config.batch.prompts_per_micro={micro}: change one of them (0 = chosen by the run)")
    as_config_error("--config.grpo", grpo.GRPOConfig, **c.grpo.to_dict())
    if not (isinstance(c.sampling.max_new_tokens, int) and c.sampling.max_new_tokens > 0):
        raise ConfigError(f"--config.sampling.max_new_tokens must be a positive integer, got "
                          f"{c.sampling.max_new_tokens}")
    for key in ("temperature", "temperature_begin", "temperature_end"):  # whichever the schedule uses
        check_sampling(c.grpo.get(key, 1.0), c.sampling.top_p, c.sampling.top_k,
                       names={"temperature": f"--config.grpo.{key}", "top_p": "--config.sampling.top_p",
                              "top_k": "--config.sampling.top_k"})


# ------------------------------------------------------------------ argparse
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one line (`pr1_jax.export: error: ...`), exit 2."""

    def __init__(self, name: str, **kwargs):
        kwargs.setdefault("prog", f"python -m {name}")
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # docstrings as written
        super().__init__(**kwargs)
        self.name = name

    def error(self, message: str):
        self.exit(fail(self.name, f"{message} (see {self.prog} --help)"))


# ------------------------------------------------------------------ absl + ml_collections configs
_HELP = ("--help", "--helpshort", "--helpfull", "-?", "-help")


def absl_flags(name: str, config_flag: str = "config", help_config: str | None = None
               ) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run` that raises ConfigError for flag mistakes (absl would
    print two lines and exit 1, or end in ml_collections' `AttributeError: "'key'"`), names the
    closest key of an unknown `--config.KEY`, lists the config's keys and values in `--help`
    (those of `--config`, else of `help_config`), and exits 0 after `--help`."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        FLAGS = flags.FLAGS  # noqa: N806
        args = list(argv[1:])
        path = _flag_value(args, config_flag)
        if path is None:
            path = FLAGS[config_flag].default_unparsed
        wants_help = any(a.split("=")[0] in _HELP for a in args)
        if path:
            _check_config_file(path, config_flag)
        if wants_help:
            FLAGS[config_flag].help += _config_help(FLAGS, config_flag, path or help_config)
        try:
            return FLAGS(argv)
        except SystemExit as e:
            if wants_help and e.code == 1:  # absl exits 1 after --help; argparse commands exit 0
                raise SystemExit(0) from None
            raise
        except flags.Error as e:
            raise ConfigError(f"{_flags_error(e)} (see python -m {name} --help)") from None
        except (AttributeError, KeyError) as e:  # ml_collections on an unknown --config.KEY
            message = _unknown_key(args, config_flag, path, FLAGS, name)
            if message is None:
                raise
            raise ConfigError(message) from e

    return parse


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag=V` or `--flag V` (the last one given), else None."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(f"--{flag}="):
            value = a.split("=", 1)[1]
        elif a == f"--{flag}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def _check_config_file(path: str, flag: str) -> None:
    file = Path(path.split(":", 1)[0])
    if not file.is_file():
        here = sorted(str(p) for p in Path("configs").glob("*.py") if "def get_config" in p.read_text())
        raise ConfigError(f"--{flag}={path}: no such config file (relative paths start at {Path.cwd()})"
                          + (f"; the configs here: {', '.join(here)}" if here else ""))


def _config_help(FLAGS, flag: str, path: str | None) -> str:  # noqa: N803
    if not path or not Path(path.split(":", 1)[0]).is_file():
        return f"\n\nTo list a config's keys and values: --{flag}=FILE --help."
    config = _load(FLAGS, flag, path)
    return (f"\n\nKeys of {path} and their values (override any with --{flag}.KEY=VALUE; what they mean: "
            f"configs/common.py):\n" + "\n".join(f"  {k} = {v!r}" for k, v in _leaves(config)))


def _load(FLAGS, flag: str, path: str):  # noqa: N803
    """The config `path` loads to, through the flag's own parser (the file's `get_config(arg)`)."""
    try:
        return FLAGS[flag].parser.parse(path)
    except (TypeError, ValueError) as e:  # ml_collections puts the whole traceback in the message
        raise ConfigError(f"--{flag}={path}: {_last_line(str(e))}") from None


def _leaves(config, prefix: str = "") -> list[tuple[str, Any]]:
    """[(dotted key, value)] of a ConfigDict's leaves, in definition order."""
    out = []
    for k, v in config.items():
        if hasattr(v, "items"):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _missing_part(config, key: str) -> str | None:
    """The first prefix of the dotted `key` that `config` does not have (None: it has it all)."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not hasattr(node, "items") or part not in node:
            return ".".join(parts[:i + 1])
        node = node[part]
    return None


def _unknown_key(args, flag: str, path: str | None, FLAGS, name: str) -> str | None:  # noqa: N803
    if not path:
        return None
    config = _load(FLAGS, flag, path)
    keys = [k for k, _ in _leaves(config)]
    for a in args:
        for prefix in (f"--{flag}.", f"--no{flag}."):
            if a.startswith(prefix):
                key = a[len(prefix):].split("=", 1)[0]
                missing = _missing_part(config, key)
                if missing is not None:
                    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
                    best = f"; the closest is --{flag}.{close[0]}" if close else ""
                    return (f"--{flag}.{key}: {path} has no key {missing!r}{best} "
                            f"(python -m {name} --{flag}={path} --help lists them all)")
    return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _flags_error(e: Exception) -> str:
    """One line from an absl flags error (a config file that fails to load carries a traceback)."""
    text = str(e)
    return _last_line(text) if "Traceback" in text else one_line(text)
