"""Hugging Face checkpoint ↔ pr1_jax parameters, through ONE declarative table.

`PARAM_TABLE` maps each pr1_jax parameter path to its safetensors key and a layout
rule; `load_params` reads it one way and `to_hf_state_dict` (the export) the other, so
the two directions cannot drift apart.

Layout rules (HF stores torch `Linear.weight` as [out, in]):
  "copy"    same array (embeddings);
  "vector"  1-D HF vector ↔ our per-head shape (biases, norm scales);
  "kernelN" HF [out, in] ↔ ours [*in (N axes), *out] (a transpose plus head reshapes);
  "patch"   HF Conv3d weight [W, C, T, 14, 14] ↔ ours [C·T·14·14, W].
Keys with `{i}` are per layer; ours are stacked on a leading layer axis (`nn.scan`).

Checkpoints are read in both key layouts that exist: the original one of the Qwen2-VL /
Qwen2.5-VL releases (`model.layers.*`, `visual.*`; what transformers' `save_pretrained`
writes for them) and transformers' in-memory one (`model.language_model.*`,
`model.visual.*`; the Qwen3-VL releases and `save_pretrained` use it). The table names
keys in the first layout; `release_key` writes each model's own layout on export.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from pr1_jax.model.config import ModelConfig

# (our path, HF key, rule). Text decoder (HF Qwen2VLTextModel / lm_head):
_TEXT = [
    ("embed_tokens/embedding", "model.embed_tokens.weight", "copy"),
    ("decoder/norm/scale", "model.norm.weight", "vector"),
    ("decoder/layers/input_norm/scale", "model.layers.{i}.input_layernorm.weight", "vector"),
    ("decoder/layers/post_attention_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", "vector"),
    ("decoder/layers/q_proj/kernel", "model.layers.{i}.self_attn.q_proj.weight", "kernel1"),
    ("decoder/layers/q_proj/bias", "model.layers.{i}.self_attn.q_proj.bias", "vector"),
    ("decoder/layers/k_proj/kernel", "model.layers.{i}.self_attn.k_proj.weight", "kernel1"),
    ("decoder/layers/k_proj/bias", "model.layers.{i}.self_attn.k_proj.bias", "vector"),
    ("decoder/layers/v_proj/kernel", "model.layers.{i}.self_attn.v_proj.weight", "kernel1"),
    ("decoder/layers/v_proj/bias", "model.layers.{i}.self_attn.v_proj.bias", "vector"),
    ("decoder/layers/o_proj/kernel", "model.layers.{i}.self_attn.o_proj.weight", "kernel2"),
    ("decoder/layers/gate_proj/kernel", "model.layers.{i}.mlp.gate_proj.weight", "kernel1"),
    ("decoder/layers/up_proj/kernel", "model.layers.{i}.mlp.up_proj.weight", "kernel1"),
    ("decoder/layers/down_proj/kernel", "model.layers.{i}.mlp.down_proj.weight", "kernel1"),
]
_LM_HEAD = [("lm_head/kernel", "lm_head.weight", "kernel1")]
# Qwen3 (HF Qwen3VLTextAttention): RMSNorm of each q / k head; no q/k/v biases unless attention_bias.
_QK_NORM = [
    ("decoder/layers/q_norm/scale", "model.layers.{i}.self_attn.q_norm.weight", "vector"),
    ("decoder/layers/k_norm/scale", "model.layers.{i}.self_attn.k_norm.weight", "vector"),
]
# Vision tower (HF Qwen2VisionTransformerPretrainedModel / Qwen2_5_VisionTransformer...).
_VISION = [
    ("visual/patch_embed/kernel", "visual.patch_embed.proj.weight", "patch"),
    ("visual/blocks/qkv/kernel", "visual.blocks.{i}.attn.qkv.weight", "kernel1"),
    ("visual/blocks/qkv/bias", "visual.blocks.{i}.attn.qkv.bias", "vector"),
    ("visual/blocks/proj/kernel", "visual.blocks.{i}.attn.proj.weight", "kernel2"),
    ("visual/blocks/proj/bias", "visual.blocks.{i}.attn.proj.bias", "vector"),
    ("visual/merger/mlp_0/kernel", "visual.merger.mlp.0.weight", "kernel1"),
    ("visual/merger/mlp_0/bias", "visual.merger.mlp.0.bias", "vector"),
    ("visual/merger/mlp_2/kernel", "visual.merger.mlp.2.weight", "kernel1"),
    ("visual/merger/mlp_2/bias", "visual.merger.mlp.2.bias", "vector"),
]
_VISION_LAYERNORM = [
    ("visual/blocks/norm1/scale", "visual.blocks.{i}.norm1.weight", "vector"),
    ("visual/blocks/norm1/bias", "visual.blocks.{i}.norm1.bias", "vector"),
    ("visual/blocks/norm2/scale", "visual.blocks.{i}.norm2.weight", "vector"),
    ("visual/blocks/norm2/bias", "visual.blocks.{i}.norm2.bias", "vector"),
    ("visual/merger/ln_q/scale", "visual.merger.ln_q.weight", "vector"),
    ("visual/merger/ln_q/bias", "visual.merger.ln_q.bias", "vector"),
    ("visual/blocks/fc1/kernel", "visual.blocks.{i}.mlp.fc1.weight", "kernel1"),
    ("visual/blocks/fc1/bias", "visual.blocks.{i}.mlp.fc1.bias", "vector"),
    ("visual/blocks/fc2/kernel", "visual.blocks.{i}.mlp.fc2.weight", "kernel1"),
    ("visual/blocks/fc2/bias", "visual.blocks.{i}.mlp.fc2.bias", "vector"),
]
_VISION_RMSNORM_SWIGLU = [
    ("visual/blocks/norm1/scale", "visual.blocks.{i}.norm1.weight", "vector"),
    ("visual/blocks/norm2/scale", "visual.blocks.{i}.norm2.weight", "vector"),
    ("visual/merger/ln_q/scale", "visual.merger.ln_q.weight", "vector"),
] + [(f"visual/blocks/{n}/{p}", f"visual.blocks.{{i}}.mlp.{n}.{w}", rule)
     for n in ("gate_proj", "up_proj", "down_proj")
     for p, w, rule in (("kernel", "weight", "kernel1"), ("bias", "bias", "vector"))]


# Qwen3-VL vision (HF Qwen3VLVisionModel): Qwen2-VL's blocks with `mlp.linear_fc1/2`, a
# patch-embedding bias, the position table, and mergers named norm / linear_fc1 / linear_fc2.
_QWEN3_VISION = [
    ("visual/patch_embed/bias", "visual.patch_embed.proj.bias", "vector"),
    ("visual/pos_embed/embedding", "visual.pos_embed.weight", "copy"),
] + [(ours, hf.replace(".mlp.fc", ".mlp.linear_fc"), rule) for ours, hf, rule in _VISION_LAYERNORM
     if not ours.startswith("visual/merger")]


def _merger_rows(ours: str, hf: str) -> list[tuple[str, str, str]]:
    """A Qwen3-VL merger (`visual.merger` or `visual.deepstack_merger_list.{j}`)."""
    return [(f"{ours}/ln_q/scale", f"{hf}.norm.weight", "vector"), (f"{ours}/ln_q/bias", f"{hf}.norm.bias", "vector"),
            (f"{ours}/mlp_0/kernel", f"{hf}.linear_fc1.weight", "kernel1"),
            (f"{ours}/mlp_0/bias", f"{hf}.linear_fc1.bias", "vector"),
            (f"{ours}/mlp_2/kernel", f"{hf}.linear_fc2.weight", "kernel1"),
            (f"{ours}/mlp_2/bias", f"{hf}.linear_fc2.bias", "vector")]


def param_table(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """The (our path, HF key, rule) rows for this architecture."""
    if cfg.model_type == "qwen3_vl":
        return _qwen3_vl_table(cfg)
    rows = list(_TEXT) + list(_VISION)
    rows += _VISION_LAYERNORM if cfg.vision.norm == "layernorm" else _VISION_RMSNORM_SWIGLU
    if not cfg.text.tie_word_embeddings:
        rows += _LM_HEAD
    return rows


def _qwen3_vl_table(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    rows = [r for r in _TEXT if cfg.text.attention_bias or not r[0].endswith("_proj/bias")] + _QK_NORM
    rows += [r for r in _VISION if not r[0].startswith("visual/merger")] + _QWEN3_VISION
    rows += _merger_rows("visual/merger", "visual.merger")
    for j in range(len(cfg.vision.deepstack_indexes)):
        rows += _merger_rows(f"visual/deepstack_merger_{j}", f"visual.deepstack_merger_list.{j}")
    if not cfg.text.tie_word_embeddings:
        rows += _LM_HEAD
    return rows


def _num_layers(cfg: ModelConfig, path: str) -> int:
    return cfg.text.num_layers if path.startswith("decoder/layers") else cfg.vision.depth


def hf_to_ours(x: np.ndarray, rule: str, shape: tuple[int, ...]) -> np.ndarray:
    if rule == "copy" or rule == "vector":
        return x.reshape(shape)
    if rule.startswith("kernel") or rule == "patch":
        return x.reshape(x.shape[0], -1).T.reshape(shape)
    raise ValueError(rule)


def ours_to_hf(x: np.ndarray, rule: str, cfg: ModelConfig) -> np.ndarray:
    if rule == "copy":
        return x
    if rule == "vector":
        return x.reshape(-1)
    if rule.startswith("kernel"):
        n_in = int(rule[len("kernel"):])
        return x.reshape(int(np.prod(x.shape[:n_in])), -1).T
    if rule == "patch":
        v = cfg.vision
        return x.T.reshape(v.width, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    raise ValueError(rule)


# ------------------------------------------------------------------ reading files
_ALIASES = [(re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual.")]


def canonical_key(key: str) -> str:
    for pattern, repl in _ALIASES:
        key = pattern.sub(repl, key)
    return key


def release_key(key: str, cfg: ModelConfig) -> str:
    """A table key in the layout of the model's own release: Qwen3-VL's checkpoints (and
    transformers' `save_pretrained`) nest the decoder under `model.language_model.` and the
    tower under `model.visual.`; Qwen2-VL / Qwen2.5-VL keep the table's layout."""
    if cfg.model_type != "qwen3_vl" or key.startswith("lm_head."):
        return key
    return "model." + key if key.startswith("visual.") else "model.language_model." + key.removeprefix("model.")


class SafetensorsDir:
    """All tensors of a checkpoint directory (one file or sharded with an index), lazily."""

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors import safe_open

        d = Path(model_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"checkpoint directory {d} does not exist")
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (d / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{d} has neither model.safetensors nor model.safetensors.index.json")
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d}: shard files named in the index are missing: {missing}")
        self.key_to_file: dict[str, Any] = {}
        for f in files:
            try:
                handle = safe_open(str(d / f), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for a corrupt header
                raise ValueError(f"{d / f} is not a readable safetensors file: {e}") from e
            for k in handle.keys():
                self.key_to_file[canonical_key(k)] = (handle, k)

    def keys(self) -> set[str]:
        return set(self.key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        handle, k = self.key_to_file[key]
        return tuple(handle.get_slice(k).get_shape())

    def get(self, key: str) -> np.ndarray:
        handle, k = self.key_to_file[key]
        return handle.get_slice(k)[:]  # get_slice also reads bfloat16 into numpy


def _expected(cfg: ModelConfig, path: str, hf_key: str, rule: str, shape: tuple[int, ...]) -> Iterator[tuple[str, tuple]]:
    """(HF key, expected HF shape) for every tensor a table row reads."""
    per_layer = shape[1:] if "{i}" in hf_key else shape
    hf_shape = ours_to_hf(np.empty(per_layer, np.int8), rule, cfg).shape
    if "{i}" in hf_key:
        for i in range(_num_layers(cfg, path)):
            yield hf_key.format(i=i), hf_shape
    else:
        yield hf_key, hf_shape


def load_params(model_dir: str | os.PathLike, cfg: ModelConfig | None = None, dtype: Any = np.float32,
                target_shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Reads an HF checkpoint into pr1_jax's (unboxed) parameter tree of NumPy arrays.

    Every missing, unexpected or mis-shaped tensor is collected and reported in ONE error.
    """
    cfg = cfg or ModelConfig.from_pretrained(model_dir)
    shapes = target_shapes or param_shapes(cfg)
    files = SafetensorsDir(model_dir)
    table = param_table(cfg)
    expected: dict[str, tuple] = {}
    for path, hf_key, rule in table:
        expected.update(_expected(cfg, path, hf_key, rule, shapes[path]))
    present = files.keys()
    ignorable = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - ignorable)
    wrong = [f"{k}: {files.shape(k)} (expected {s})" for k, s in expected.items()
             if k in present and files.shape(k) != tuple(s)]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {model_dir} does not match the {cfg.model_type} config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" … and {len(items) - 20} more" if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise ValueError("\n".join(lines))
    flat = {}
    for path, hf_key, rule in table:
        shape = shapes[path]
        if "{i}" in hf_key:
            per = [hf_to_ours(files.get(hf_key.format(i=i)), rule, shape[1:]) for i in range(shape[0])]
            flat[path] = np.stack(per).astype(dtype)
        else:
            flat[path] = hf_to_ours(files.get(hf_key), rule, shape).astype(dtype)
    return unflatten(flat)


def to_hf_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `load_params`: {HF key: array} in the model's release key layout
    (`release_key`)."""
    flat = flatten(params)
    out = {}
    for path, hf_key, rule in param_table(cfg):
        x = np.asarray(flat[path])
        if "{i}" in hf_key:
            for i in range(x.shape[0]):
                out[release_key(hf_key.format(i=i), cfg)] = np.ascontiguousarray(ours_to_hf(x[i], rule, cfg))
        else:
            out[release_key(hf_key, cfg)] = np.ascontiguousarray(ours_to_hf(x, rule, cfg))
    return out


# ------------------------------------------------------------------ tree helpers
def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of the model's parameters, without allocating them."""
    from flax.core import meta

    from pr1_jax.model.qwen2_vl import init_params

    tree = jax.eval_shape(lambda: meta.unbox(init_params(cfg)))
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


# ------------------------------------------------------------------ sharded loading
def load_params_sharded(model_dir: str | os.PathLike, cfg: ModelConfig, shardings: dict[str, Any],
                        dtype: Any = np.float32) -> dict:
    """`load_params` with every parameter created in its shards (`shardings`: flat path →
    jax.sharding.Sharding, e.g. `sharding.load_params`'): each device's block is read straight
    from the safetensors files (`get_slice`), so a process reads only the rows/columns its
    devices hold and the full model never exists in one place. Same checks and errors as
    `load_params`."""
    shapes = param_shapes(cfg)
    files = _open_checked(model_dir, cfg, shapes)
    flat = {}
    for path, hf_key, rule in param_table(cfg):
        shape = tuple(shapes[path])
        flat[path] = jax.make_array_from_callback(shape, shardings[path], _block_reader(files, hf_key, rule, shape,
                                                                                        dtype))
    return unflatten(flat)


def _open_checked(model_dir, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> SafetensorsDir:
    """`SafetensorsDir` after `load_params`' checks: every missing, unexpected or
    mis-shaped tensor reported in ONE error."""
    files = SafetensorsDir(model_dir)
    expected: dict[str, tuple] = {}
    for path, hf_key, rule in param_table(cfg):
        expected.update(_expected(cfg, path, hf_key, rule, shapes[path]))
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


def _block_reader(files: SafetensorsDir, hf_key: str, rule: str, shape: tuple[int, ...], dtype) -> Callable:
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


def read_hf_block(files: SafetensorsDir, hf_key: str, rule: str, shape: tuple[int, ...],
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
