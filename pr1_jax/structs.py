"""The data that crosses module boundaries, in one leaf module (it imports no pr1_jax module).

    ModelInputs      a batch of prompts and their packed images (`processing.batch.build_inputs`)
    SamplingConfig   how to sample; SampleOutput: what the sampler returns
    Completions      a block's completions packed into R rows of T tokens (`rollouts`)
    Rollouts         one optimizer step's data in M micro-batches (`rollouts.assemble`)
    TrainState       step, parameters, optimizer state (`train_step`, `checkpoint`)

Shape letters, the same in every module: B prompts (of a batch or micro-batch), G samples per
prompt, M micro-batches, T tokens of a row (Tp prompt, Tc completion positions), P prompt
tokens, R packed rows (of patches in ModelInputs, of completions in Completions), N patches
per packed image row, F features per patch, L loss positions, V vocabulary, D width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class ModelInputs:
    """One batch of prompts (+ completions) with their images, built on the host.

    See `pr1_jax.processing.batch.build_inputs`.
    """

    input_ids: Array  # [B, T] int32 (left-padded)
    attention_mask: Array  # [B, T] bool
    positions: Array  # [3, B, T] int32 M-RoPE (t, h, w) positions
    pixels: Array  # [R, N, F] float32 packed patch rows
    segment_ids: Array  # [R, N] int32 image id of each patch, -1 = padding
    pos_hw: Array  # [R, N, 2] int32 patch (row, column) inside its image
    vision_index: Array  # [B, T] int32 row of the merged features each image token takes
    image_patches: Array  # [R, J, L] int32 index in its row of each patch of the row's j-th image, -1 after


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """PR1 samples with temperature 0.9–1.0, top_p 0.9, top_k 50 (configs/common.py)."""

    num_samples: int = 1  # G, completions per prompt
    max_new_tokens: int = 768
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0  # 1 → off
    top_k: int = 0  # 0 → off
    ignore_eos: bool = False  # benchmarks: fixed lengths

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: temperature={self.temperature}, "
                             f"top_p={self.top_p}, top_k={self.top_k}")


@flax.struct.dataclass
class SampleOutput:
    tokens: Array  # [B, G, Tc] int32; pad_id after the first EOS (which is kept)
    logp: Array  # [B, G, Tc] float32 log π(token) at temperature 1, full vocabulary; 0 on padding
    logp_sample: Array  # [B, G, Tc] float32 log-prob under the sampling distribution; 0 greedy/padding
    lengths: Array  # [B, G] int32 generated tokens, EOS included
    decode_steps: Array | None = None  # [] int32: tokens decoded per row (the loop's steps, chunks whole)
    logits: Array | None = None  # [B, G, Tc, V] float32, only with return_logits (tests)

    @property
    def mask(self) -> Array:
        """[B, G, Tc] bool: generated tokens up to and including the first EOS."""
        return jnp.arange(self.tokens.shape[-1]) < self.lengths[..., None]


@flax.struct.dataclass
class TrainState:
    step: Array  # [] int32, optimizer steps taken
    params: Any
    opt_state: Any


@flax.struct.dataclass
class Completions:
    """The completions of blocks of Bs prompts, each block's packed whole into its R rows of T
    tokens; a row holds completions of one prompt of its block (`rollouts.pack_completions`).
    Bs = 1: a prompt's G completions in R ≤ G rows of its own. K = B / Bs blocks."""

    tokens: Array  # [..., K, R, T] int32: completions back to back in each row; pad after
    sample: Array  # [..., K, R, T] int32: which of the G completions a token belongs to; -1 = padding
    offset: Array  # [..., K, R, T] int32: the token's index inside its completion
    group: Array  # [..., K, R] int32: the row's prompt, counted inside its block (0 for Bs = 1)
    unpack: Array  # [..., B, G, L] int32: where token t of completion g sits in its block's flat R·T
    # With the block's prompts packed too (`rollouts.prompt_pack`): [..., K, Pq] int32, the place of
    # each of the block's real prompt tokens, in order, in its flattened Bs·P left-padded prompts
    # (0 past the last); None: the prompts stay left-padded rows of P.
    prompt_pack: Array | None = None


@flax.struct.dataclass
class Rollouts:
    """One optimizer step's data, split into M micro-batches of B prompts × G completions."""

    prompts: ModelInputs  # every field with a leading [M] axis
    completions: Completions  # [M, K, R, T] packed, unpack [M, B, G, L]
    mask: Array  # [M, B, G, L] bool: tokens that count in the loss
    advantages: Array  # [M, B, G] float32
    old_logp: Array  # [M, B, G, L] float32 (sampler's log-probs; used when μ > 1)
    group_weight: Array  # [M, B, G] float32 (0 drops a group: skip_zero_std_groups)
