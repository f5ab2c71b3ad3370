"""Export a pr1_jax checkpoint as a Hugging Face Qwen2-VL directory (transformers, vLLM).

    python -m pr1_jax.export --checkpoint=runs/demo/checkpoints --out=/tmp/pr1_hf \
        [--step=N] [--dtype=bfloat16|float32] [--max_shard_size=5GB] [--base_model_dir=DIR]

`--checkpoint` is the checkpoints directory (`WORKDIR/checkpoints`), the run's workdir, or
one `step_<N>` directory; the newest step by default. The output directory gets:
  model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
      when the weights exceed --max_shard_size (key names: the original Qwen release
      layout, through the same table as the import, `pr1_jax.model.hf_io`);
  config.json            `ModelConfig.to_hf_dict()` plus the exported dtype;
  generation_config.json the base model's (or one with its bos/eos ids);
  tokenizer files and preprocessor_config.json, copied from the base model directory
      recorded in the checkpoint (`--base_model_dir` when it has moved).

    from transformers import Qwen2VLForConditionalGeneration
    model = Qwen2VLForConditionalGeneration.from_pretrained("/tmp/pr1_hf")

Safetensors files are written here (8-byte header length, JSON header, raw little-endian
data) so that bfloat16 needs neither torch nor a framework-specific writer.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)
assert sys.byteorder == "little", "safetensors data is little-endian"

# Files of an HF checkpoint directory that describe the tokenizer and processors.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json")
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """"5GB" → 5·10⁹ bytes (HF's convention; "5GiB" → 5·2³⁰)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"size {text!r}: expected a number with an optional unit such as 5GB, 500MB, 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# ------------------------------------------------------------------ safetensors
def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(x).astype(ml_dtypes.bfloat16)  # round to nearest even, as torch does
    return np.asarray(x).astype(dtype)


def write_safetensors_file(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """One safetensors file: the tensors in the given order, contiguous, no padding between."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for key, x in tensors.items():
        name = _ST_DTYPES.get(str(x.dtype))
        if name is None:
            raise ValueError(f"{key}: dtype {x.dtype} cannot be exported (use float32 or bfloat16)")
        header[key] = {"dtype": name, "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())  # little-endian hosts only (checked at import)


def write_safetensors(out_dir: Path, tensors: Mapping[str, np.ndarray], max_shard_size: int) -> list[str]:
    """model.safetensors, or shards of at most `max_shard_size` bytes (a bigger tensor gets
    a shard of its own) with model.safetensors.index.json. Returns the file names."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = x
        size += x.nbytes
    meta = {"format": "pt"}  # what transformers checks before loading
    if len(shards) == 1:
        write_safetensors_file(out_dir / "model.safetensors", shards[0], meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors_file(out_dir / name, shard, meta)
    index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]


# ------------------------------------------------------------------ the export
def resolve_checkpoint(path: str | Path, step: int | None) -> tuple[Path, int | None]:
    """(checkpoints directory, step) from a checkpoints dir, a workdir or a step_<N> dir."""
    path = Path(path).expanduser().absolute()
    m = re.fullmatch(r"step_(\d+)", path.name)
    if m:
        if step is not None and step != int(m.group(1)):
            raise ValueError(f"--step={step} contradicts {path}")
        return path.parent, int(m.group(1))
    if (path / "checkpoints").is_dir() and not any(path.glob("step_*")):
        return path / "checkpoints", step
    return path, step


def export(checkpoint: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "bfloat16",
           max_shard_size: str | int = "5GB", base_model_dir: str | Path | None = None) -> Path:
    """Writes the HF directory `out` from a pr1_jax checkpoint; returns `out`."""
    from pr1_jax.checkpoint import Checkpoints
    from pr1_jax.model import hf_io
    from pr1_jax.model.config import ModelConfig

    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype {dtype!r}: expected bfloat16 or float32")
    directory, step = resolve_checkpoint(checkpoint, step)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    ckpt = Checkpoints(directory, read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint (step_<N> directories)")
        step = steps[-1] if step is None else step
        meta = ckpt.read_meta(step)
        params = ckpt.restore_params(step)
    finally:
        ckpt.close()
    cfg = ModelConfig.from_hf_dict(meta["model_config"])
    base = Path(base_model_dir or meta["model_dir"])
    if not base.is_dir():
        raise FileNotFoundError(f"the base model directory {base} (tokenizer, preprocessor config) is gone: "
                                f"pass --base_model_dir")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()  # a previous export's shards must not mix with these
    tensors = {k: _cast(v, dtype) for k, v in hf_io.to_hf_state_dict(params, cfg).items()}
    files = write_safetensors(out, tensors, parse_size(max_shard_size))
    config = cfg.to_hf_dict()
    config.update(torch_dtype=dtype, dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", out / "generation_config.json")
    else:
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    copied = [name for name in PROCESSOR_FILES if (base / name).is_file()]
    for name in copied:
        shutil.copyfile(base / name, out / name)
    if "preprocessor_config.json" not in copied or not {"tokenizer.json", "vocab.json"} & set(copied):
        log.warning("%s lacks tokenizer or preprocessor files (copied: %s)", base, copied)
    log.info("exported %s step %d (%s, %d tensors in %s) to %s", directory, step, dtype, len(tensors), files, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pr1_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="WORKDIR/checkpoints, WORKDIR, or a step_<N> directory")
    p.add_argument("--step", type=int, default=None, help="GRPO step to export (default: the newest)")
    p.add_argument("--out", required=True, help="output directory (HF format)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--max_shard_size", default="5GB", help="shard the safetensors above this size")
    p.add_argument("--base_model_dir", default=None,
                   help="tokenizer/preprocessor source (default: the model_dir recorded in the checkpoint)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                 max_shard_size=args.max_shard_size, base_model_dir=args.base_model_dir)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
