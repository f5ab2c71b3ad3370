"""Qwen2-VL for conditional generation (HF `Qwen2VLForConditionalGeneration`; also
`Qwen2_5_VLForConditionalGeneration` and `Qwen3VLForConditionalGeneration`, by `cfg.model_type`).

    model = Qwen2VL(cfg)                        # cfg: pr1_jax.model.config.ModelConfig
    logits_btv = model.apply({"params": params}, inputs)   # inputs: ModelInputs

The pieces are separate methods so that the sampler and the GRPO step can run each
once where it is needed (vision once per prompt, the prompt once per group, logits in
chunks): `encode_images`, `embed`, `decode`, `logits`.

Qwen3-VL's DeepStack rides along without new arguments: `encode_images` returns each
visual token's S DeepStack features next to its embedding ([M, 1 + S, D]), `embed` then
returns planes [..., 1 + S, D] (plane 0 the embeddings, planes 1..S the features at the
image positions, zero elsewhere), and `decode` / `decode_group` split them off and add
plane s after decoder layer s − 1 (`DecoderContext.deepstack`). So every caller that runs
encode_images → embed → decode (the sampler's prefill, the GRPO step) gets DeepStack;
token-only embeddings (completions, decode steps) stay [..., D].

Shape letters: B rows, G samples per row, T tokens, D width, V vocab, R packed image
rows, N patches per packed row, F patch features (1176; Qwen3-VL 1536), M = R·N/4 merged
visual tokens, S DeepStack planes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pr1_jax.model import layers
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.decoder import (KV, Decoder, DecoderContext, decode_layer_by_layer, fuse_layer_params, mrope,
                                   unstack_layers)
from pr1_jax.model.qwen3_vision import Qwen3VisionTower
from pr1_jax.model.vision import VisionTower
from pr1_jax.structs import ModelInputs  # noqa: F401  (the model's input; defined with the shared types)

Array = jax.Array


def _dots_and_flash_saveable(prim, *avals, **params) -> bool:
    """Weight-matmul outputs and the cuDNN flash-attention forward's outputs (its output and
    softmax statistics: the backward kernel's residuals) are saved; the rest is recomputed."""
    return (prim.name.startswith("dot_product_attention_fwd")
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


# What `remat=True` keeps for the backward pass of each decoder layer / ViT block (the rest
# is recomputed). "full" keeps nothing (PR1 trains with gradient checkpointing; the
# default); "dots" keeps the outputs of the weight matmuls (attention scores and
# elementwise ops are recomputed); "dots_flash" also the cuDNN attention's outputs
# (with attention="cudnn": no second attention forward); "dots_all" also the attention
# einsums; "offload_dots" moves the weight matmul outputs to host memory; "none" turns
# remat off.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_flash": _dots_and_flash_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    "none": None,
}


def _remat(remat: bool, policy: str) -> dict[str, Any]:
    """`remat` / `remat_policy` fields of a Decoder or VisionTower for a named policy."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r} (one of {sorted(REMAT_POLICIES)})")
    return dict(remat=remat and policy != "none", remat_policy=REMAT_POLICIES[policy])


class Qwen2VL(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_unroll: int = 1  # decoder layers unrolled per scan step (the sampler may unroll fully)
    vision_scan_unroll: int = 1  # vision blocks unrolled per scan step
    remat_policy: str = "full"  # with remat: a key of REMAT_POLICIES (decoder, and vision unless set below)
    vision_remat_policy: str | None = None  # with remat: the vision tower's policy (None: remat_policy)
    # Attention of the full forward (training, scoring, prefill; decoding has its own):
    # "xla" einsums (default, every backend), "cudnn" flash attention (NVIDIA GPUs) or "auto".
    attention: str = "xla"

    def setup(self):
        t, kw = self.cfg.text, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # HF model.embed_tokens (tied with lm_head when tie_word_embeddings).
        self.embed_tokens = nn.Embed(t.vocab_size, t.width, name="embed_tokens", **kw,
                                     embedding_init=layers.dense_init(("vocab", "embed")))
        vision_policy = self.remat_policy if self.vision_remat_policy is None else self.vision_remat_policy
        if self.attention not in layers.ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attention!r} (one of {layers.ATTENTION_IMPLS})")
        tower = Qwen3VisionTower if self.cfg.model_type == "qwen3_vl" else VisionTower
        self.visual = tower(self.cfg.vision, **_remat(self.remat, vision_policy), attention=self.attention,
                            scan_unroll=self.vision_scan_unroll, name="visual", **kw)
        self.decoder = Decoder(t, **_remat(self.remat, self.remat_policy), scan_unroll=self.scan_unroll,
                               attention=self.attention, name="decoder", **kw)
        if not t.tie_word_embeddings:
            self.lm_head = nn.Dense(t.vocab_size, use_bias=False, name="lm_head", **kw,
                                    kernel_init=layers.dense_init(("embed", "vocab")))

    def encode_images(self, pixels_rnf: Array, segment_rn: Array, pos_hw_rn2: Array,
                      image_patches_rjl: Array | None = None) -> Array:
        """Packed patches → merged visual tokens, flattened in packing order: [M, D]
        (Qwen3-VL: [M, 1 + S, D], each token's embedding then its S DeepStack features).
        `image_patches_rjl`: the image table of `ModelInputs` (`vision.image_attention`)."""
        feats = self.visual(pixels_rnf, segment_rn, pos_hw_rn2, image_patches_rjl)
        return feats.reshape(-1, *feats.shape[2:])

    def embed(self, ids: Array, vision_md: Array | None = None, vision_index: Array | None = None) -> Array:
        """Token embeddings with image-pad positions replaced by visual tokens (HF masked_scatter).

        ids and vision_index share any shape [...]; vision_md [M, D]. Returns [..., D].
        Qwen3-VL: vision_md [M, 1 + S, D] → planes [..., 1 + S, D]: the embeddings, then the
        S DeepStack features at the image positions (zero elsewhere; `split_deepstack`).
        """
        x = self.embed_tokens(ids)
        if vision_md is None:
            return x
        is_image = (ids == self.cfg.image_token_id)[..., None]
        if vision_md.ndim == 2:
            return jnp.where(is_image, jnp.take(vision_md, vision_index, axis=0).astype(x.dtype), x)
        feats = jnp.take(vision_md, vision_index, axis=0).astype(x.dtype)  # [..., 1 + S, D]
        return jnp.where(is_image[..., None], feats, jnp.concatenate(
            [x[..., None, :], jnp.zeros(feats.shape[:-2] + (feats.shape[-2] - 1, x.shape[-1]), x.dtype)], axis=-2))

    @staticmethod
    def split_deepstack(x: Array) -> tuple[Array, Array | None]:
        """`embed`'s output [B, G, T, D] or planes [B, G, T, 1 + S, D] → (embeddings [B, G, T, D],
        DeepStack features [S, B, G, T, D] or None)."""
        if x.ndim == 4:
            return x, None
        return x[..., 0, :], jnp.moveaxis(x[..., 1:, :], -2, 0)

    def decode(self, x_bgtd: Array, positions_3bgt: Array, mask_bgts: Array, *,
               return_kv: bool = False) -> tuple[Array, KV | None]:
        """Runs the decoder without a cache (`Decoder`); with return_kv also each layer's K/V.
        x: [B, G, T, D], or Qwen3-VL planes [B, G, T, 1 + S, D] (`embed`)."""
        x_bgtd, deepstack = self.split_deepstack(x_bgtd)
        cos, sin = mrope(positions_3bgt, self.cfg.text)
        return self.decoder(x_bgtd, DecoderContext(cos=cos, sin=sin, mask=mask_bgts, deepstack=deepstack), return_kv)

    def decode_group(self, x_prompt: Array, x_comp: Array, pos_prompt: Array, pos_comp: Array,
                     prompt_mask_bp: Array, comp_mask_krtt: Array, group_kr: Array | None = None,
                     prompt_pack_kq: Array | None = None) -> tuple[Array, Array]:
        """Prompts and their completions in one decoder pass over packed rows (`Decoder`).

        The B prompts form K blocks of Bs = B / K consecutive prompts; a block is one decoder row:
        its prompts, then its completion rows. x_prompt [B, 1, P, D] (Qwen3-VL: planes
        [B, 1, P, 1 + S, D], `embed`); x_comp [K, R, T, D]: each block's completions in R rows
        (`train_step.Completions`), row r of block k holding completions of prompt group_kr[k, r]
        of the block (None: Bs = 1); pos_prompt [3, B, 1, P], pos_comp [3, K, R, T];
        prompt_mask_bp [B, P] bool (left padding); comp_mask_krtt [K, R, T, T] bool: which
        tokens of its row each completion token sees (its own completion's earlier ones).
        Every completion token also sees its prompt's valid tokens.
        prompt_pack_kq [K, Pq] (`train_step.Completions.prompt_pack`): each block's prompts are
        packed, their real tokens back to back in its first Pq positions (padding costs no
        matmul; the prompts' hidden states come back in the padded layout).
        → hidden [B, 1, P, D], [K, R, T, D].
        """
        k, r, t, d = x_comp.shape
        b, p = x_prompt.shape[0], x_prompt.shape[2]
        bs = b // k
        x_prompt, deepstack = self.split_deepstack(x_prompt)
        x_prompt, pos_prompt = x_prompt.reshape(k, bs * p, d), pos_prompt.reshape(3, k, bs * p)
        moves = None
        if prompt_pack_kq is not None:
            if deepstack is not None:
                raise ValueError("packed prompts: not with DeepStack (Qwen3-VL)")
            valid = prompt_mask_bp.reshape(k, bs * p)
            pq = prompt_pack_kq.shape[-1]
            unpack = jnp.where(valid, jnp.cumsum(valid, axis=-1) - 1, 0)
            moves = (prompt_pack_kq, jnp.arange(pq) < jnp.sum(valid, axis=-1, keepdims=True), unpack, valid)
            x_prompt = layers.move_rows(x_prompt, *moves)
            pos_prompt = jnp.take_along_axis(pos_prompt, prompt_pack_kq[None], axis=-1)
        head = x_prompt.shape[1]  # the row's prompt positions: Bs·P, or Pq packed
        x = jnp.concatenate([x_prompt[:, None], x_comp.reshape(k, 1, r * t, d)], axis=2)
        if deepstack is not None:  # the completions get none: zeros after the prompts
            deepstack = deepstack.reshape(deepstack.shape[0], k, 1, bs * p, d)
            deepstack = jnp.pad(deepstack, [(0, 0)] * 3 + [(0, r * t), (0, 0)])
        pos = jnp.concatenate([pos_prompt[:, :, None], pos_comp.reshape(3, k, 1, r * t)], axis=-1)
        cos, sin = mrope(pos, self.cfg.text)
        prompt_causal = jnp.tril(jnp.ones((p, p), bool))[None, None] & prompt_mask_bp[:, None, None, :]
        ctx = DecoderContext(cos=cos, sin=sin, mask=comp_mask_krtt, prefix_mask=prompt_mask_bp,
                             prompt_mask=prompt_causal, prompt_len=p, num_samples=r, prompts_per_block=bs,
                             row_group=group_kr if bs > 1 else None, deepstack=deepstack,
                             packed_prompt_len=head if moves is not None else 0, prompt_moves=moves)
        hidden, _ = self.decoder(x, ctx)
        hidden_p = hidden[:, 0, :head]
        if moves is not None:  # back to the padded layout (padding: 0)
            pack, pack_valid, unpack, valid = moves
            hidden_p = layers.move_rows(hidden_p, unpack, valid, pack, pack_valid)
        return hidden_p.reshape(b, 1, p, d), hidden[:, :, head:].reshape(k, r, t, d)

    def logits(self, hidden: Array) -> Array:
        """hidden [..., D] → logits [..., V] in the compute dtype."""
        if self.cfg.text.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def hidden_states(self, inputs: ModelInputs) -> Array:
        """Full causal forward to the final hidden states [B, T, D]."""
        vision = self.encode_images(inputs.pixels, inputs.segment_ids, inputs.pos_hw, inputs.image_patches)
        x = self.embed(inputs.input_ids, vision, inputs.vision_index)[:, None]
        t = inputs.input_ids.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None, None] & inputs.attention_mask[:, None, None, :]
        hidden, _ = self.decode(x, inputs.positions[:, :, None], mask)
        return hidden[:, 0]

    def __call__(self, inputs: ModelInputs) -> Array:
        """Logits [B, T, V] of the full forward pass (parity tests, evaluation)."""
        return self.logits(self.hidden_states(inputs))

    # ------------------------------------------------------------------ sampling (`pr1_jax/sampler.py`)
    def prefill(self, inputs: ModelInputs) -> tuple[Array, KV]:
        """Vision once per prompt, then the prompt: (float32 next-token logits [B, V] after its last
        column — left padding, so the last column is real —, the prompt's K/V [L, B, 1, K, P, Dh])."""
        p = inputs.input_ids.shape[1]
        vision = self.encode_images(inputs.pixels, inputs.segment_ids, inputs.pos_hw, inputs.image_patches)
        x = self.embed(inputs.input_ids, vision, inputs.vision_index)[:, None]
        causal = jnp.tril(jnp.ones((p, p), bool))[None, None] & inputs.attention_mask[:, None, None, :]
        hidden, kv = self.decode(x, inputs.positions[:, :, None], causal, return_kv=True)
        return self.logits(hidden[:, 0, -1]).astype(jnp.float32), kv

    @nn.nowrap  # plain Python on `params`, called outside `apply`
    def decoding_weights(self, params) -> tuple[list[Any], Any]:
        """The decoder's weights as `decode_step` reads them, made once before a decode loop:
        per layer (not stacked: a loop would copy each layer out of the stack at every step),
        q/k/v and gate/up fused (`decoder.fuse_layer_params`); and the final norm's. A plain
        method on `params` (no `apply`): the one place outside Flax that knows their tree."""
        stacked = params["decoder"]["layers"]
        layers = [fuse_layer_params(lp) for lp in unstack_layers(stacked, self.cfg.text.num_layers)]
        return layers, params["decoder"]["norm"]

    @nn.nowrap  # applies the model itself; builds the decoder layer outside any module
    def decode_step(self, params, weights: tuple[list[Any], Any], tokens: Array, ctx: DecoderContext,
                    caches: list[KV], prefixes: list[KV], decode_attention: str = "xla",
                    decode_splits: int = 0) -> tuple[Array, list[KV]]:
        """One token per row [B, G] → (float32 logits [B, G, V], the caches with its K/V written
        at `ctx.cache_index`). `weights`: `decoding_weights(params)`; `prefixes`: the prompt's
        K/V per layer in the decode layout; a plain method (it applies the embedding and head
        itself), called inside the sampler's jitted loop."""
        x = self.apply({"params": params}, tokens, method=Qwen2VL.embed)[:, :, None]
        layer_weights, norm = weights
        hidden, caches = decode_layer_by_layer(self.cfg.text, layer_weights, norm, x, ctx, caches, prefixes,
                                               self.dtype, decode_attention, decode_splits)
        logits = self.apply({"params": params}, hidden[:, :, 0], method=Qwen2VL.logits).astype(jnp.float32)
        return logits, caches


def init_params(cfg: ModelConfig, rng: Array | None = None, dtype: Any = jnp.float32):
    """Random parameters (boxed with logical axis names) from tiny dummy inputs."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    v = cfg.vision
    inputs = ModelInputs(
        input_ids=jnp.zeros((1, 4), jnp.int32), attention_mask=jnp.ones((1, 4), bool),
        positions=jnp.zeros((3, 1, 4), jnp.int32), pixels=jnp.zeros((1, 4, v.patch_dim), jnp.float32),
        segment_ids=jnp.zeros((1, 4), jnp.int32), pos_hw=jnp.zeros((1, 4, 2), jnp.int32),
        image_patches=jnp.arange(4, dtype=jnp.int32).reshape(1, 1, 4),
        vision_index=jnp.zeros((1, 4), jnp.int32))
    return Qwen2VL(cfg, dtype=dtype, param_dtype=dtype).init(rng, inputs)["params"]
