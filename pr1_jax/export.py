"""Export a pr1_jax checkpoint as a Hugging Face Qwen2-VL directory (transformers, vLLM).

    python -m pr1_jax.export --checkpoint=runs/demo/checkpoints --out=/tmp/pr1_hf \\
        [--step=N] [--dtype=bfloat16|float32] [--max_shard_size=5GB] [--base_model_dir=DIR] [--overwrite]

`--checkpoint` is the checkpoints directory (`WORKDIR/checkpoints`), the run's workdir, or
one `step_<N>` directory; the newest step by default. `--dtype` defaults to the checkpoint's
(a float32 run exports float32; bfloat16 only when every saved array is bfloat16). `--out`
must be new or empty; `--overwrite` reuses a directory, removing its weight files first so
that no shard of another model is left beside the new ones. The output directory gets:
  model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
      when the weights exceed --max_shard_size (written by the `safetensors` package; key
      names: the original Qwen release layout, through the same table as the import,
      `pr1_jax.model.hf_io`);
  config.json            `ModelConfig.to_hf_dict()` plus the exported dtype;
  generation_config.json the base model's (or one with its bos/eos ids);
  tokenizer files and preprocessor_config.json, copied from the base model directory
      recorded in the checkpoint (`--base_model_dir` when it has moved).

    from transformers import Qwen2VLForConditionalGeneration
    model = Qwen2VLForConditionalGeneration.from_pretrained("/tmp/pr1_hf")

`--checkpoint`, `--out` and `--base_model_dir` may be local or any URI etils.epath supports
(gs://bucket/run on a TPU pod; docs/storage.md): orbax reads the checkpoint from there, and
every file is written whole through epath.

Generating with transformers from it, without torchvision (docs/export.md):
`pr1_jax.hf_generate.generate("/tmp/pr1_hf", "cat.jpg", "Output the bounding box of the cat in the image.")`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pr1_jax import cli
from pr1_jax.errors import ConfigError

log = logging.getLogger(__name__)

NAME = "pr1_jax.export"
DTYPES = ("bfloat16", "float32")
# Files of an HF checkpoint directory that describe the tokenizer and processors.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json")
# What transformers (or vLLM) could load as weights: none may survive from an earlier export.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """"5GB" → 5·10⁹ bytes (HF's convention; "5GiB" → 5·2³⁰)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"size {text!r}: expected a positive number with an optional unit such as 5GB, 500MB, "
                          f"2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# ------------------------------------------------------------------ safetensors
def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(x).astype(ml_dtypes.bfloat16)  # round to nearest even, as torch does
    return np.asarray(x).astype(dtype)


def checkpoint_dtype(params) -> str:
    """The dtype an export keeps everything of: bfloat16 when every array is, else float32."""
    import jax

    kinds = {str(np.asarray(x).dtype) for x in jax.tree.leaves(params)}
    return "bfloat16" if kinds == {"bfloat16"} else "float32"


def _storage(path):
    """(`path` as an etils.epath.Path, whether it is local): pr1_jax.multihost imports jax, which
    a command-line mistake should not wait for."""
    from pr1_jax import multihost

    return multihost.storage_path(path), multihost.is_local(path)


def write_safetensors(out_dir, tensors: Mapping[str, np.ndarray], max_shard_size: int) -> list[str]:
    """model.safetensors, or shards of at most `max_shard_size` bytes (a bigger tensor gets
    a shard of its own) with model.safetensors.index.json. Returns the file names.
    `out_dir`: local (streamed to the file) or a URI (each shard encoded in memory, then written)."""
    from safetensors.numpy import save, save_file  # NumPy arrays, ml_dtypes bfloat16 included

    out_dir, local = _storage(out_dir)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = x
        size += x.nbytes
    meta = {"format": "pt"}  # what transformers checks before loading
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        if local:
            save_file(shard, out_dir / name, metadata=meta)
        else:
            (out_dir / name).write_bytes(save(shard, metadata=meta))
    if len(shards) == 1:
        return names
    index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]


# ------------------------------------------------------------------ the export
def resolve_checkpoint(path: str | os.PathLike, step: int | None):
    """(checkpoints directory as an epath.Path, step) from a checkpoints dir, a workdir or a
    step_<N> dir, local or a URI."""
    path, _ = _storage(path)
    m = re.fullmatch(r"step_(\d+)", path.name)
    if m:
        if step is not None and step != int(m.group(1)):
            raise ConfigError(f"--step={step} contradicts --checkpoint={path}: give one of them")
        return path.parent, int(m.group(1))
    if (path / "checkpoints").is_dir() and not any(path.glob("step_*")):
        return path / "checkpoints", step
    return path, step


def check_out_dir(out: str | os.PathLike, overwrite: bool):
    """`out` if an export may write there: new, empty, or non-empty with `overwrite` (a URI:
    checked by writing a probe object)."""
    out, local = _storage(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={out} is a file: give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out={out} is not empty: choose a new directory, or pass --overwrite to replace "
                          f"its weight files")
    if not local:
        return cli.writable_dir(out, "--out")  # an object store has no directories to create
    out = Path(out)
    parent = out
    while not parent.exists():  # nothing is created yet: the restore may still fail
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"--out: cannot write to {out} ({parent} is {'a file' if parent.is_file() else 'read-only'})"
                          f": choose a directory you can write")
    return out


def clear_weights(out) -> None:
    """Removes what transformers could load as weights: an export of fewer shards must not
    leave another model's shards beside its own."""
    for pattern in WEIGHT_PATTERNS:
        for stale in out.glob(pattern):
            stale.unlink()


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
           dtype: str | None = None, max_shard_size: str | int = "5GB",
           base_model_dir: str | os.PathLike | None = None, overwrite: bool = False):
    """Writes the HF directory `out` from a pr1_jax checkpoint; returns `out` (a pathlib.Path,
    or an epath.Path for a URI).

    `dtype`: None → the checkpoint's (`checkpoint_dtype`). Raises ConfigError for a value to
    change (an occupied `out` without `overwrite`, a dtype, a step that does not exist) and
    FileNotFoundError for missing checkpoints or base model files.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {DTYPES} (or None: the checkpoint's)")
    shard_bytes = parse_size(max_shard_size)
    directory, step = resolve_checkpoint(checkpoint, step)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist: pass --checkpoint=WORKDIR, "
                                f"WORKDIR/checkpoints or WORKDIR/checkpoints/step_<N> of a training run")
    out = check_out_dir(out, overwrite)  # before the (slow) restore: a mistake here costs nothing

    from pr1_jax.checkpoint import Checkpoints
    from pr1_jax.model import hf_io
    from pr1_jax.model.config import ModelConfig

    ckpt = Checkpoints(directory, read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint (step_<N> directories): pass the "
                                    f"--checkpoint of a run that saved one")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} does not exist in {directory}; the steps there: "
                                    f"{', '.join(map(str, steps))} (leave --step out for the newest, {steps[-1]})")
        step = steps[-1] if step is None else step
        meta = ckpt.read_meta(step)
        if "model_config" not in meta:  # the architecture cannot be given on the command line
            raise ConfigError(f"{ckpt.step_dir(step)} records no model config (not saved by pr1_jax.train): "
                              f"export a checkpoint of a training run")
        if not (base_model_dir or meta.get("model_dir")):
            raise ConfigError(f"{ckpt.step_dir(step)} records no base model directory: pass --base_model_dir=DIR "
                              f"of the model the run started from (tokenizer, preprocessor config)")
        base, base_local = _storage(base_model_dir or meta["model_dir"])
        if not base.is_dir():
            raise FileNotFoundError(f"the base model directory {base} (tokenizer, preprocessor config) is gone: "
                                    f"pass --base_model_dir=DIR of the model the run started from")
        same = (Path(out).resolve() == Path(base).resolve() if base_local and isinstance(out, Path)
                else str(out).rstrip("/") == str(base).rstrip("/"))
        if out.exists() and same:  # --overwrite would delete the base weights
            raise ConfigError(f"--out={out} is the base model directory the tokenizer is copied from: choose "
                              f"another directory")
        params = ckpt.restore_params(step)
    finally:
        ckpt.close()
    cfg = ModelConfig.from_hf_dict(meta["model_config"])
    dtype = dtype or checkpoint_dtype(params)

    out = cli.writable_dir(out, "--out")
    clear_weights(out)
    tensors = {k: _cast(v, dtype) for k, v in hf_io.to_hf_state_dict(params, cfg).items()}
    files = write_safetensors(out, tensors, shard_bytes)
    config = cfg.to_hf_dict()
    config.update(torch_dtype=dtype, dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (base / "generation_config.json").is_file():
        (out / "generation_config.json").write_bytes((base / "generation_config.json").read_bytes())
    else:
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    copied = [name for name in PROCESSOR_FILES if (base / name).is_file()]
    for name in PROCESSOR_FILES:
        if name in copied:
            (out / name).write_bytes((base / name).read_bytes())
        elif (out / name).is_file():  # another model's tokenizer file would shadow or mix with ours
            (out / name).unlink()
    if "preprocessor_config.json" not in copied or not {"tokenizer.json", "vocab.json"} & set(copied):
        log.warning("%s lacks tokenizer or preprocessor files (copied: %s)", base, copied)
    log.info("exported %s step %d (%s, %d tensors in %s) to %s", directory, step, dtype, len(tensors), files, out)
    return out


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(NAME, description=__doc__)
    p.add_argument("--checkpoint", required=True, help="WORKDIR/checkpoints, WORKDIR, or a step_<N> directory")
    p.add_argument("--step", type=int, default=None, help="GRPO step to export (default: the newest)")
    p.add_argument("--out", required=True, help="output directory (HF format): new or empty, or --overwrite")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: the checkpoint's")
    p.add_argument("--max_shard_size", default="5GB", help="shard the safetensors above this size")
    p.add_argument("--base_model_dir", default=None,
                   help="tokenizer/preprocessor source (default: the model_dir recorded in the checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="export into a non-empty --out, replacing its weight and tokenizer files")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # orbax (through absl) warns that a read-only manager saves nothing, on every restore.
    for noisy in ("absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
                 base_model_dir=args.base_model_dir, overwrite=args.overwrite)
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0, or 2 after one line on stderr for an expected mistake (pr1_jax/cli.py)."""
    return cli.run(NAME, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
