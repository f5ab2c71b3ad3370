"""Model configuration for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense), read from / written to
HF `config.json`.

Named presets give the real architectures (random weights for benchmarks):
`qwen2_vl_2b()` = Qwen/Qwen2-VL-2B-Instruct, `qwen2_5_vl_3b()` = Qwen/Qwen2.5-VL-3B-Instruct,
`qwen3_vl_2b()` / `qwen3_vl_4b()` = Qwen/Qwen3-VL-2B- / 4B-Instruct (docs/qwen3_vl.md).

Two `config.json` layouts exist and both are read: real Qwen checkpoints keep the text
fields at the top level with `rope_scaling: {type: mrope, mrope_section}`, transformers
5 nests them under `text_config` with `rope_parameters`. Qwen2-VL's vision config names
the ViT width `embed_dim` (its `hidden_size` is the LLM width); Qwen2.5-VL names the ViT
width `hidden_size` and the LLM width `out_hidden_size`. Qwen3-VL (`model_type` "qwen3_vl")
always nests: `text_config` (Qwen3: `head_dim` of its own, `attention_bias`, q/k RMSNorm,
`rope_parameters` or the older `rope_scaling` + `rope_theta`) and `vision_config` (as
Qwen2.5-VL's names, plus `num_position_embeddings` and `deepstack_visual_indexes`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT and patch merger. Qwen2-VL: LayerNorm + QuickGELU MLP, full attention.
    Qwen3-VL: LayerNorm + GELU(tanh) MLP, patch size 16 with a bias, learned position
    embeddings and DeepStack mergers."""

    depth: int = 32
    width: int = 1280  # ViT hidden size (HF Qwen2-VL `embed_dim`).
    num_heads: int = 16
    mlp_dim: int = 5120
    out_width: int = 1536  # LLM width the merger projects to.
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    in_channels: int = 3
    norm: str = "layernorm"  # "layernorm" (Qwen2-VL) | "rmsnorm" (Qwen2.5-VL)
    mlp: str = "quick_gelu"  # "quick_gelu" (Qwen2-VL) | "swiglu" (Qwen2.5-VL, with biases) | "gelu_tanh" (Qwen3-VL)
    rope_theta: float = 10000.0
    # Qwen2.5-VL window attention: window side in pixels and the blocks that attend fully.
    window_size: int | None = None
    fullatt_block_indexes: tuple[int, ...] = ()
    eps: float = 1e-6
    # Qwen3-VL: a bias on the patch embedding, a learned (side × side) position table
    # resampled to each image's grid (0: none), and the blocks whose outputs feed the
    # DeepStack mergers (their features are added after the first decoder layers).
    patch_bias: bool = False
    num_position_embeddings: int = 0
    deepstack_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:  # C·T·14·14 = 1176 (Qwen3-VL: C·T·16·16 = 1536)
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder: GQA, SwiGLU, RMSNorm, M-RoPE. Qwen3: no q/k/v biases, RMSNorm of
    each query and key head (q_norm / k_norm), interleaved M-RoPE."""

    vocab_size: int = 151936
    width: int = 1536
    mlp_dim: int = 8960
    num_layers: int = 28
    num_heads: int = 12
    num_kv_heads: int = 2
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # biases on q/k/v (Qwen2); Qwen3: False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of every q and k head, before RoPE
    mrope_interleaved: bool = False  # Qwen3-VL: frequencies assigned t,h,w,t,h,w,... (decoder.mrope)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Qwen2-VL = vision tower + decoder + the special ids that tie them together."""

    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    model_type: str = "qwen2_vl"  # or "qwen2_5_vl", "qwen3_vl"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type", "qwen2_vl")
        if model_type == "qwen3_vl":
            return _qwen3_vl_from_hf_dict(cls, d)
        if model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"unsupported model_type {model_type!r} (expected qwen2_vl, qwen2_5_vl or qwen3_vl)")
        t = dict(d.get("text_config") or {})
        for k, v in d.items():  # real checkpoints: text fields at the top level
            if k not in ("text_config", "vision_config"):
                t.setdefault(k, v)
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        section = rope.get("mrope_section")
        if section is None:
            raise ValueError("config.json has no mrope_section (rope_scaling/rope_parameters)")
        num_heads = t["num_attention_heads"]
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", True))
        text = TextConfig(
                vocab_size=t["vocab_size"], width=t["hidden_size"], mlp_dim=t["intermediate_size"],
                num_layers=t["num_hidden_layers"], num_heads=num_heads,
                num_kv_heads=t.get("num_key_value_heads", num_heads),
                head_dim=t.get("head_dim") or t["hidden_size"] // num_heads,
                rms_norm_eps=t.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
                mrope_section=tuple(section), tie_word_embeddings=bool(tie))
        v = d.get("vision_config") or {}
        if model_type == "qwen2_vl":
            width = v.get("embed_dim", 1280)
            vision = VisionConfig(
                    depth=v.get("depth", 32), width=width, num_heads=v.get("num_heads", 16),
                    mlp_dim=int(width * v.get("mlp_ratio", 4)), out_width=v.get("hidden_size", text.width),
                    patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
                    temporal_patch_size=v.get("temporal_patch_size", 2),
                    merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", v.get("in_chans", 3)),
                    norm="layernorm", mlp=_check_act(v.get("hidden_act", "quick_gelu"), "quick_gelu"))
        else:
            _check_act(v.get("hidden_act", "silu"), "silu")
            vision = VisionConfig(
                    depth=v.get("depth", 32), width=v.get("hidden_size", 1280), num_heads=v.get("num_heads", 16),
                    mlp_dim=v.get("intermediate_size", 3420), out_width=v.get("out_hidden_size", text.width),
                    patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
                    merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", v.get("in_chans", 3)),
                    norm="rmsnorm", mlp="swiglu",
                    rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0),
                    window_size=v.get("window_size", 112),
                    fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))))
        if text.head_dim * text.num_heads != text.width and "head_dim" not in t:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if sum(text.mrope_section) * 2 != text.head_dim:
            raise ValueError(f"mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}")
        return cls(text=text, vision=vision, model_type=model_type,
                              image_token_id=d.get("image_token_id", 151655),
                              video_token_id=d.get("video_token_id", 151656),
                              vision_start_token_id=d.get("vision_start_token_id", 151652),
                              vision_end_token_id=d.get("vision_end_token_id", 151653))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir!s}: not a Hugging Face checkpoint directory")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        try:
            return cls.from_hf_dict(d)
        except KeyError as e:
            raise ValueError(f"{path} lacks the field {e.args[0]!r}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the layout of the original Qwen checkpoints (read by transformers 4.45+ and vLLM)."""
        if self.model_type == "qwen3_vl":
            return _qwen3_vl_to_hf_dict(self)
        t, v = self.text, self.vision
        d: dict[str, Any] = {
                "architectures": ["Qwen2VLForConditionalGeneration" if self.model_type == "qwen2_vl"
                                                    else "Qwen2_5_VLForConditionalGeneration"],
                "model_type": self.model_type,
                "vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_dim,
                "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps,
                "rope_theta": t.rope_theta, "max_position_embeddings": 32768 if self.model_type == "qwen2_vl" else 128000,
                "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
                "hidden_act": "silu", "tie_word_embeddings": t.tie_word_embeddings,
                "bos_token_id": 151643, "eos_token_id": 151645,
                "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id,
                "use_sliding_window": False, "sliding_window": None,
        }
        if self.model_type == "qwen2_vl":
            d["vision_config"] = {
                    "depth": v.depth, "embed_dim": v.width, "hidden_size": v.out_width, "num_heads": v.num_heads,
                    "mlp_ratio": v.mlp_dim // v.width if v.mlp_dim % v.width == 0 else v.mlp_dim / v.width, "in_chans": v.in_channels, "in_channels": v.in_channels,
                    "patch_size": v.patch_size, "spatial_patch_size": v.patch_size,
                    "spatial_merge_size": v.merge_size, "temporal_patch_size": v.temporal_patch_size,
                    "hidden_act": "quick_gelu", "model_type": "qwen2_vl"}
        else:
            d["vision_config"] = {
                    "depth": v.depth, "hidden_size": v.width, "out_hidden_size": v.out_width,
                    "intermediate_size": v.mlp_dim, "num_heads": v.num_heads, "in_chans": v.in_channels,
                    "in_channels": v.in_channels, "patch_size": v.patch_size,
                    "spatial_merge_size": v.merge_size, "temporal_patch_size": v.temporal_patch_size,
                    "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                    "hidden_act": "silu", "tokens_per_second": 2, "model_type": "qwen2_5_vl"}
        return d


def _check_act(act: str, expected: str) -> str:
    if act != expected:
        raise ValueError(f"vision hidden_act {act!r} is not supported (expected {expected!r})")
    return act


# ------------------------------------------------------------------ Qwen3-VL config.json
# Defaults are transformers' (`Qwen3VLTextConfig` / `Qwen3VLVisionConfig` / `Qwen3VLConfig`),
# so that a config.json lacking a field reads as transformers reads it.
def _qwen3_vl_from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
    t, v = dict(d.get("text_config") or {}), dict(d.get("vision_config") or {})
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    num_heads = t.get("num_attention_heads", 32)
    _check_act(t.get("hidden_act", "silu"), "silu")
    # transformers ties the LM head to the embedding by the TOP-level flag (default False).
    text = TextConfig(
            vocab_size=t.get("vocab_size", 151936), width=t.get("hidden_size", 4096),
            mlp_dim=t.get("intermediate_size", 22016), num_layers=t.get("num_hidden_layers", 32),
            num_heads=num_heads, num_kv_heads=t.get("num_key_value_heads") or num_heads,
            head_dim=t.get("head_dim") or 128, rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 500000.0))),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(t.get("attention_bias", False)), qk_norm=True,
            # transformers' Qwen3-VL always interleaves (its `mrope_interleaved` flag is not read).
            mrope_interleaved=True)
    if sum(text.mrope_section) * 2 != text.head_dim:
        raise ValueError(f"mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}")
    vrope = v.get("rope_parameters") or {}
    vision = VisionConfig(
            depth=v.get("depth", 27), width=v.get("hidden_size", 1152), num_heads=v.get("num_heads", 16),
            mlp_dim=v.get("intermediate_size", 4304), out_width=v.get("out_hidden_size", 3584),
            patch_size=v.get("patch_size", 16), temporal_patch_size=v.get("temporal_patch_size", 2),
            merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3),
            norm="layernorm", mlp={"gelu_pytorch_tanh": "gelu_tanh"}[_check_act(
                v.get("hidden_act", "gelu_pytorch_tanh"), "gelu_pytorch_tanh")],
            rope_theta=float(vrope.get("rope_theta", 10000.0)), patch_bias=True,
            num_position_embeddings=v.get("num_position_embeddings", 2304),
            deepstack_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))))
    side = int(vision.num_position_embeddings ** 0.5)
    if side * side != vision.num_position_embeddings:
        raise ValueError(f"num_position_embeddings {vision.num_position_embeddings} is not a square")
    if any(not 0 <= i < vision.depth for i in vision.deepstack_indexes):
        raise ValueError(f"deepstack_visual_indexes {vision.deepstack_indexes} outside the {vision.depth} blocks")
    return cls(text=text, vision=vision, model_type="qwen3_vl",
               image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
               vision_start_token_id=d.get("vision_start_token_id", 151652),
               vision_end_token_id=d.get("vision_end_token_id", 151653))


def _qwen3_vl_to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's nested layout (what `save_pretrained` writes), with the rope also in
    the older `rope_scaling` + `rope_theta` form of the Qwen3-VL release (transformers 4.57)."""
    t, v = cfg.text, cfg.vision
    section = list(t.mrope_section)
    return {
            "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "text_config": {
                    "model_type": "qwen3_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.width,
                    "intermediate_size": t.mlp_dim, "num_hidden_layers": t.num_layers,
                    "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
                    "head_dim": t.head_dim, "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
                    "attention_bias": t.attention_bias, "attention_dropout": 0.0,
                    "max_position_embeddings": 262144, "tie_word_embeddings": t.tie_word_embeddings,
                    "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                        "mrope_section": section, "mrope_interleaved": True},
                    "rope_scaling": {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True},
                    "rope_theta": t.rope_theta, "bos_token_id": 151643, "eos_token_id": 151645},
            "vision_config": {
                    "model_type": "qwen3_vl_vision", "depth": v.depth, "hidden_size": v.width,
                    "intermediate_size": v.mlp_dim, "num_heads": v.num_heads, "out_hidden_size": v.out_width,
                    "in_channels": v.in_channels, "patch_size": v.patch_size,
                    "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.merge_size,
                    "hidden_act": "gelu_pytorch_tanh", "num_position_embeddings": v.num_position_embeddings,
                    "deepstack_visual_indexes": list(v.deepstack_indexes),
                    "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}},
            "tie_word_embeddings": t.tie_word_embeddings,
            "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
            "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
    }


# ------------------------------------------------------------------ named presets
def qwen2_vl_2b() -> ModelConfig:
    """Qwen/Qwen2-VL-2B-Instruct (2.21B parameters)."""
    return ModelConfig()


def qwen2_5_vl_3b() -> ModelConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct."""
    return ModelConfig(
            text=TextConfig(width=2048, mlp_dim=11008, num_layers=36, num_heads=16, num_kv_heads=2),
            vision=VisionConfig(width=1280, num_heads=16, mlp_dim=3420, out_width=2048, norm="rmsnorm",
                                                    mlp="swiglu", window_size=112, fullatt_block_indexes=(7, 15, 23, 31)),
            model_type="qwen2_5_vl")


# Qwen3-VL 2B and 4B share their vision tower (SigLIP-2-sized: 24 blocks of 1024, 16 heads,
# MLP 4096, DeepStack taps after blocks 5, 11, 17, a 48×48 position table) and differ in the
# Qwen3 decoder (Qwen3-1.7B- / Qwen3-4B-sized). Numbers: the `config.json` of
# Qwen/Qwen3-VL-2B-Instruct and Qwen/Qwen3-VL-4B-Instruct (transformers 4.57 layout: text
# rope_theta 5e6, rope_scaling {mrope_section [24, 20, 20], mrope_interleaved}, tied
# embeddings, max_position_embeddings 262144), as read in copies of those files quoted by
# public repositories (docs/qwen3_vl.md); not checked against the Hub itself.
_QWEN3_VL_VISION = VisionConfig(
        depth=24, width=1024, num_heads=16, mlp_dim=4096, patch_size=16, temporal_patch_size=2, merge_size=2,
        norm="layernorm", mlp="gelu_tanh", rope_theta=10000.0, patch_bias=True, num_position_embeddings=2304,
        deepstack_indexes=(5, 11, 17))


def qwen3_vl_2b() -> ModelConfig:
    """Qwen/Qwen3-VL-2B-Instruct: 28 layers of 2048, 16 q / 8 kv heads of 128, MLP 6144, tied."""
    return ModelConfig(
            text=TextConfig(width=2048, mlp_dim=6144, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                            rope_theta=5_000_000.0, mrope_section=(24, 20, 20), tie_word_embeddings=True,
                            attention_bias=False, qk_norm=True, mrope_interleaved=True),
            vision=dataclasses.replace(_QWEN3_VL_VISION, out_width=2048), model_type="qwen3_vl")


def qwen3_vl_4b() -> ModelConfig:
    """Qwen/Qwen3-VL-4B-Instruct: 36 layers of 2560, 32 q / 8 kv heads of 128, MLP 9728, tied."""
    return ModelConfig(
            text=TextConfig(width=2560, mlp_dim=9728, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                            rope_theta=5_000_000.0, mrope_section=(24, 20, 20), tie_word_embeddings=True,
                            attention_bias=False, qk_norm=True, mrope_interleaved=True),
            vision=dataclasses.replace(_QWEN3_VL_VISION, out_width=2560), model_type="qwen3_vl")


PRESETS = {"qwen2_vl_2b": qwen2_vl_2b, "qwen2_5_vl_3b": qwen2_5_vl_3b, "qwen3_vl_2b": qwen3_vl_2b,
           "qwen3_vl_4b": qwen3_vl_4b}
