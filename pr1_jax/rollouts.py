"""Host side of a GRPO step (NumPy): examples → prompts; samples → texts → rewards → `Rollouts`.

    prompts = encode_examples(examples, task, special, tokenizer, image_config, system_prompt)
    pshape = PromptSize.of(prompts).padded(shapes)        # rungs for the step's real sizes (one block)
    inputs = prompt_inputs(prompts, special, pshape)
    texts = decode_completions(pre.tokenizer, out.tokens, skip_special_tokens)
    rewards_n, per_fn = score(texts, examples, reward_names, G)
    cshape = CompletionShape.choose(completion_extents(mask), shapes, pshape.seq_len, weight)
    batch = assemble(prompts, special, pshape, cshape, completions, mask, advantages, logp, weights, micro)

Rows of a step are in PR1's order: the G completions of a prompt are consecutive. Shapes
come from the step's real sizes on the ladders of `pr1_jax.shapes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from pr1_jax import rewards as rewards_lib
from pr1_jax import tasks
from pr1_jax.structs import Completions, ModelInputs, Rollouts
from pr1_jax.processing import batch as batch_lib
from pr1_jax.processing import chat
from pr1_jax.processing import image as image_lib
from pr1_jax.shapes import ShapeMemo, StepShapes, packing_cost


@dataclasses.dataclass
class EncodedPrompt:
    ids: np.ndarray  # [T] int32, image pads expanded
    image: tuple[np.ndarray, tuple[int, int, int]]  # (pixels [P, 1176], grid_thw)
    example: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class PromptShape:
    """Static prompt-side shapes of a program for blocks of prompts: prompt tokens; images one
    per row of `row_len` patches, or (`image_rows` > 0) a block's images packed into
    `image_rows` rows of `row_len`, at most `images_per_row` each, none over `image_len`."""

    seq_len: int
    row_len: int
    image_rows: int = 0
    image_len: int = 0
    images_per_row: int = 1


@dataclasses.dataclass(frozen=True)
class PromptSize:
    """The real sizes of a set of prompts: the longest prompt, the largest image, and every
    image's patches (one tuple per process, in its prompts' order: packing needs them all)."""

    tokens: int
    patches: int
    patch_counts: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, prompts: Sequence["EncodedPrompt"]) -> "PromptSize":
        counts = tuple(int(p.image[0].shape[0]) for p in prompts)
        return cls(tokens=max(len(p.ids) for p in prompts), patches=max(counts), patch_counts=(counts,))

    def padded(self, shapes: StepShapes, block: int | None = None, memo: ShapeMemo | None = None) -> PromptShape:
        """The ladder's rungs for these sizes (a clear error when one is over its cap), for
        blocks of `block` prompts of each process (default: all of them, one block); with a
        `memo`, a shape used before that holds them when it costs little more (`ShapeMemo`)."""
        fresh = self._rungs(shapes, block)
        if memo is None:
            return fresh
        counts = self.patch_counts or ((0,),)
        n = sum(len(c) for c in counts)  # prompts; their image rows: one each, or `image_rows` per block
        blocks = sum(-(-len(c) // (block or len(counts[0]))) for c in counts)
        image_rows = lambda s: blocks * s.image_rows if s.image_rows else n  # noqa: E731
        return memo.pick(fresh, fits=lambda s: (s.image_rows, s.images_per_row) == (fresh.image_rows,
                                                                                    fresh.images_per_row)
                         and s.seq_len >= fresh.seq_len and s.row_len >= fresh.row_len
                         and s.image_len >= fresh.image_len,
                         cost=lambda s: n * s.seq_len + image_rows(s) * s.row_len)  # tokens, patches alike

    def _rungs(self, shapes: StepShapes, block: int | None) -> PromptShape:
        try:
            seq_len, image_len = shapes.prompt(self.tokens), shapes.patches(self.patches)
        except ValueError as e:
            raise ValueError(f"a prompt of {self.tokens} tokens / an image of {self.patches} patches does not fit "
                             f"batch.seq_len={shapes.prompt.cap} / batch.patch_row_len={shapes.patches.cap} "
                             f"({e}): raise them or lower data.max_pixels") from None
        if not shapes.image_rows or not self.patch_counts:
            return PromptShape(seq_len=seq_len, row_len=image_len)
        block = block or len(self.patch_counts[0])
        rows = min(shapes.image_rows, block)
        per_row = -(-block // rows)
        fill = 0
        for counts in self.patch_counts:  # every block of every process: the same shapes everywhere
            for start in range(0, len(counts), block):
                sums = np.zeros(rows, np.int64)
                np.add.at(sums, image_rows_of(min(block, len(counts) - start), rows), counts[start:start + block])
                fill = max(fill, int(sums.max()))
        return PromptShape(seq_len=seq_len, row_len=shapes.packed_row(per_row)(fill), image_rows=rows,
                           image_len=image_len, images_per_row=per_row)


def image_rows_of(block: int, rows: int) -> np.ndarray:
    """The packed row of each of a block's images: consecutive prompts share a row, so each
    batch shard's row holds its own prompts' images (`pack_images` row_of)."""
    return (np.arange(block) * rows) // block


def encode_examples(examples: Sequence[Mapping[str, Any]], task: str, special: chat.SpecialTokens, tokenizer,
                    image_config: image_lib.ImageProcessorConfig, system_prompt: str | None) -> list[EncodedPrompt]:
    """PR1's training prompt for each example (system + user[image, question]); images already resized."""
    out = []
    t = tasks.get(task)
    for ex in examples:
        pixels, grid = image_lib.patchify(ex["image_hwc"], image_config)
        question = t.question(ex)
        messages = chat.pr1_messages(question, system_prompt)
        ids = chat.encode_prompt(tokenizer, messages, [grid], special)
        out.append(EncodedPrompt(ids, (pixels, tuple(int(g) for g in grid)), ex))
    return out


def prompt_inputs(prompts: Sequence[EncodedPrompt], special: chat.SpecialTokens, shape: PromptShape,
                  merge: int = 2) -> ModelInputs:
    """Left-padded ids to `shape.seq_len`; the images one per row of `shape.row_len` patches, or
    packed into `shape.image_rows` rows (`image_rows_of`)."""
    ids, images = [p.ids for p in prompts], [p.image for p in prompts]
    kw = dict(image_token_id=special.image_pad, pad_id=special.pad_id, seq_len=shape.seq_len,
              row_len=shape.row_len, merge=merge)
    if not shape.image_rows:  # one per row: the same table shape [B, 1, row_len] for every micro-batch
        return batch_lib.build_inputs(ids, images, num_rows=len(prompts), row_of=range(len(prompts)), **kw)
    return batch_lib.build_inputs(ids, images, num_rows=shape.image_rows, row_of=image_rows_of(len(prompts),
                                  shape.image_rows), image_len=shape.image_len,
                                  images_per_row=shape.images_per_row, **kw)


def decode_completions(tokenizer, tokens_ngt: np.ndarray, skip_special_tokens: bool) -> list[str]:
    """Decodes [N, G, Tc] ids row by row in PR1's order (pads kept unless skipping specials)."""
    rows = tokens_ngt.reshape(-1, tokens_ngt.shape[-1])
    return chat.decode_batch(tokenizer, [r.tolist() for r in rows], skip_special_tokens=skip_special_tokens)


def reward_columns(examples: Sequence[Mapping[str, Any]], repeat: int) -> dict[str, list]:
    """Every dataset column except images, one entry per completion (as PR1 passes them)."""
    skip = {"image", "image_hwc", "image_bytes"}
    keys = [k for k in examples[0] if k not in skip]
    return {k: [ex.get(k) for ex in examples for _ in range(repeat)] for k in keys}


def score(texts: Sequence[str], examples: Sequence[Mapping[str, Any]], names: Sequence[str], repeat: int,
          reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """PR1's total reward: the unweighted sum of the reward functions, [N·G] float32."""
    columns = reward_columns(examples, repeat)
    per_fn = {}
    for name in names:
        kwargs = dict((reward_kwargs or {}).get(name, {}))
        per_fn[name] = np.asarray(rewards_lib.get(name)(list(texts), **columns, **kwargs), np.float32)
    total = np.sum(list(per_fn.values()), axis=0).astype(np.float32)
    return total, per_fn


def completion_extents(mask_ngt: np.ndarray) -> np.ndarray:
    """[N, G]: positions a completion needs in the update: up to its last loss token.
    Later positions never reach the loss and, the model being causal, never change it."""
    t = mask_ngt.shape[-1]
    last = t - np.argmax(mask_ngt[..., ::-1], axis=-1)
    return np.where(mask_ngt.any(-1), last, 0).astype(np.int32)


def pack_rows(extents_g: np.ndarray, row_len: int) -> list[list[int]]:
    """First-fit decreasing: which completions share each row of `row_len` tokens (each whole)."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for g in sorted(range(len(extents_g)), key=lambda i: -int(extents_g[i])):
        n = int(extents_g[g])
        r = next((i for i, used in enumerate(fill) if used + n <= row_len), None)
        if r is None:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(g)
        fill[r] += n
    return rows


def pack_completions(tokens_ngt: np.ndarray, extents_ng: np.ndarray, length: int, rows: int, row_len: int,
                     pad_id: int, prompts_per_block: int = 1) -> Completions:
    """The completions of each block of `prompts_per_block` consecutive prompts packed whole,
    back to back, into the block's `rows` rows of `row_len` tokens; a row holds completions of
    one prompt (`group`), a prompt takes as many rows as its completions need (`pack_rows`).
    tokens/sample/offset [N/Bs, R, T], group [N/Bs, R]; unpack [N, G, L] (L = `length` loss
    positions) into its block's flattened R·T. Bs = 1: R rows for each prompt."""
    n, g, _ = tokens_ngt.shape
    bs = prompts_per_block
    if n % bs:
        raise ValueError(f"{n} prompts do not split into blocks of {bs}")
    if extents_ng.max(initial=0) > min(length, row_len):
        raise ValueError(f"a completion of {extents_ng.max()} tokens does not fit L={length} / T={row_len}")
    tokens = np.full((n // bs, rows, row_len), pad_id, np.int32)
    sample = np.full((n // bs, rows, row_len), -1, np.int32)
    offset = np.zeros((n // bs, rows, row_len), np.int32)
    group = np.zeros((n // bs, rows), np.int32)
    unpack = np.zeros((n, g, length), np.int32)
    for blk in range(n // bs):
        r = 0
        for i in range(blk * bs, (blk + 1) * bs):
            placement = pack_rows(extents_ng[i], row_len)
            if r + len(placement) > rows:
                raise ValueError(f"the completions of prompts {blk * bs}–{(blk + 1) * bs - 1} need more than {rows} "
                                 f"rows of {row_len} (prompt {i}: extents {extents_ng[i].tolist()})")
            for members in placement:
                at = 0
                group[blk, r] = i - blk * bs
                for j in members:
                    e = int(extents_ng[i, j])
                    tokens[blk, r, at:at + e] = tokens_ngt[i, j, :e]
                    sample[blk, r, at:at + e] = j
                    offset[blk, r, at:at + e] = np.arange(e)
                    unpack[i, j, :e] = r * row_len + at + np.arange(e)
                    at += e
                r += 1
    return Completions(tokens=tokens, sample=sample, offset=offset, group=group, unpack=unpack)


def prompt_pack(attention_mask_bp: np.ndarray, prompts_per_block: int, length: int) -> np.ndarray:
    """[B/Bs, Pq]: each block's real prompt tokens, in order, as places in its flattened Bs·P
    left-padded prompts (`Completions.prompt_pack`); 0 past the block's last token."""
    b, p = attention_mask_bp.shape
    flat = np.asarray(attention_mask_bp, bool).reshape(b // prompts_per_block, prompts_per_block * p)
    out = np.zeros((flat.shape[0], length), np.int32)
    for k, valid in enumerate(flat):
        at = np.flatnonzero(valid)
        if len(at) > length:
            raise ValueError(f"a block of {prompts_per_block} prompts holds {len(at)} tokens, over the packed "
                             f"length {length}")
        out[k, :len(at)] = at
    return out


def block_tokens(token_counts: Sequence[int], prompts_per_block: int) -> int:
    """The most prompt tokens any block of `prompts_per_block` consecutive prompts holds."""
    n = np.asarray(token_counts)
    return int(max(n[i:i + prompts_per_block].sum() for i in range(0, len(n), prompts_per_block)))


def rows_needed(extents_ng: np.ndarray, row_len: int, prompts_per_block: int = 1) -> int:
    """The most rows of `row_len` any block of `prompts_per_block` prompts needs (`pack_completions`)."""
    per_prompt = [len(pack_rows(e, row_len)) for e in extents_ng]
    return max(sum(per_prompt[i:i + prompts_per_block]) for i in range(0, len(per_prompt), prompts_per_block))


@dataclasses.dataclass(frozen=True)
class CompletionShape:
    """Static shapes of an update program's rows: L loss positions, R rows of T tokens for the
    completions of each block of `prompts_per_block` prompts (`pack_completions`), and the
    block's prompts packed into `prompt_tokens` (0: left-padded rows, `prompt_pack`)."""

    length: int
    rows: int
    row_len: int
    prompts_per_block: int = 1
    prompt_tokens: int = 0

    @classmethod
    def choose(cls, extents_ng: np.ndarray, shapes: StepShapes, prompt_len: int, weight: float,
               prompts_per_block: int = 1, memo: ShapeMemo | None = None, fixed: float = 0.0,
               block_prompt_tokens: int = 0) -> "CompletionShape":
        """The cheapest packing (`shapes.packing_cost`) over the row-length rungs from the longest
        completion to the largest group total; `extents_ng` are the whole step's (every process's,
        in order: blocks never span two processes when they hold whole blocks). With a `memo`, a
        shape used before that holds them when the update costs little more: `fixed` is the rest
        of the update's cost per block in the same units (its patches, and its prompt tokens
        unless they are packed). `block_prompt_tokens` > 0: a block's prompts are packed, and
        this is the most tokens a block holds (`block_tokens`)."""
        fresh = cls._cheapest(extents_ng, shapes, prompt_len, weight, prompts_per_block)
        if block_prompt_tokens:
            fresh = dataclasses.replace(fresh, prompt_tokens=shapes.packed_prompts(prompts_per_block)(
                block_prompt_tokens))
        if memo is None:
            return fresh
        longest = int(extents_ng.max(initial=0))
        return memo.pick(fresh, fits=lambda s: s.prompts_per_block == prompts_per_block and s.length >= fresh.length
                         and s.row_len >= longest and s.rows >= rows_needed(extents_ng, s.row_len, prompts_per_block)
                         and bool(s.prompt_tokens) == bool(fresh.prompt_tokens)
                         and s.prompt_tokens >= block_prompt_tokens,
                         cost=lambda s: fixed + s.prompt_tokens + packing_cost(s.rows, s.row_len, prompt_len, weight))

    @classmethod
    def _cheapest(cls, extents_ng: np.ndarray, shapes: StepShapes, prompt_len: int, weight: float,
                  prompts_per_block: int) -> "CompletionShape":
        longest = max(1, int(extents_ng.max(initial=1)))
        group = max(1, int(extents_ng.sum(-1).max(initial=1)))
        rows_ladder = shapes.block_rows(prompts_per_block)
        best = None
        t = shapes.row(longest)
        while True:
            r = rows_ladder(rows_needed(extents_ng, t, prompts_per_block))
            cost = packing_cost(r, t, prompt_len, weight)
            if best is None or cost < best[0]:
                best = (cost, r, t)
            if t >= group or t >= shapes.row.cap:
                break
            t = shapes.row(t + 1)
        return cls(length=shapes.completion(longest), rows=best[1], row_len=best[2],
                   prompts_per_block=prompts_per_block)


def assemble(prompts: Sequence[EncodedPrompt], special: chat.SpecialTokens, prompt_shape: PromptShape,
             completion_shape: CompletionShape, completions: np.ndarray, mask: np.ndarray, advantages: np.ndarray,
             old_logp: np.ndarray, group_weight: np.ndarray, prompts_per_micro: int,
             prompt_batch: ModelInputs | None = None) -> Rollouts:
    """Splits a step's P prompts × G completions into M = P / prompts_per_micro micro-batches,
    the completions packed into rows (`pack_completions`) and the loss tensors cut to L.
    `prompt_batch`: `prompt_inputs(prompts, …, prompt_shape)` already built (one micro-batch
    only), used as it is (a view, no copy)."""
    p = len(prompts)
    if p % prompts_per_micro:
        raise ValueError(f"{p} prompts per step is not a multiple of prompts_per_micro={prompts_per_micro}")
    m, b = p // prompts_per_micro, prompts_per_micro
    if prompt_batch is not None and m == 1:
        stacked = jax.tree.map(lambda a: a[None], prompt_batch)
    else:
        micro = [prompt_inputs(prompts[i * b:(i + 1) * b], special, prompt_shape) for i in range(m)]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *micro)
    g, t = completions.shape[1], completion_shape.length
    if b % completion_shape.prompts_per_block:
        raise ValueError(f"{b} prompts per micro-batch do not split into blocks of "
                         f"{completion_shape.prompts_per_block}")
    mask = mask[..., :t]
    packed = pack_completions(completions, completion_extents(mask), t, completion_shape.rows,
                              completion_shape.row_len, special.pad_id, completion_shape.prompts_per_block)
    split = lambda a: a.reshape(m, -1, *a.shape[1:])  # noqa: E731  [M, B, ...] or [M, blocks, ...]
    if completion_shape.prompt_tokens:  # each block's prompts packed too
        packed = packed.replace(prompt_pack=np.concatenate([
            prompt_pack(np.asarray(stacked.attention_mask[i]), completion_shape.prompts_per_block,
                        completion_shape.prompt_tokens) for i in range(m)]))
    return Rollouts(prompts=stacked, completions=jax.tree.map(split, packed), mask=split(mask),
                    advantages=advantages.reshape(m, b, g).astype(np.float32),
                    old_logp=split(old_logp[..., :t]).astype(np.float32), group_weight=group_weight.reshape(m, b, g))


def rollouts_from_padded(prompts: ModelInputs, completions: np.ndarray, mask: np.ndarray, advantages: np.ndarray,
                         old_logp: np.ndarray, group_weight: np.ndarray, pad_id: int, *, trim: bool = True,
                         shape: CompletionShape | None = None) -> Rollouts:
    """`Rollouts` from padded [M, B, G, Tc] arrays (tests, benchmarks). `shape` packs as training
    does (`CompletionShape.choose`); without it, trim=True packs each prompt's completions by
    their mask's extent into one row (T = the largest group total, L = the longest; no ladder)
    and trim=False gives every completion a row of all Tc positions (R = G): the padded
    computation."""
    m, b, g, tc = completions.shape
    flat = lambda a: np.asarray(a).reshape(m * b, *np.shape(a)[2:])  # noqa: E731
    ext = completion_extents(flat(mask)) if trim else np.full((m * b, g), tc, np.int32)
    bs = 1 if shape is None else shape.prompts_per_block
    if shape is not None:
        length, rows, row_len = shape.length, shape.rows, shape.row_len
    elif trim:
        length, rows, row_len = max(1, int(ext.max())), 1, max(1, int(ext.sum(-1).max()))
    else:
        length, rows, row_len = tc, g, tc
    packed = pack_completions(flat(completions), ext, length, rows, row_len, pad_id, bs)
    if shape is not None and shape.prompt_tokens:
        attn = np.asarray(prompts.attention_mask)
        packed = packed.replace(prompt_pack=np.concatenate([prompt_pack(attn[i], bs, shape.prompt_tokens)
                                                            for i in range(m)]))
    split = lambda a: a.reshape(m, -1, *a.shape[1:])  # noqa: E731
    return Rollouts(prompts=prompts, completions=jax.tree.map(split, packed), mask=np.asarray(mask)[..., :length],
                    advantages=np.asarray(advantages, np.float32),
                    old_logp=np.asarray(old_logp, np.float32)[..., :length], group_weight=np.asarray(group_weight,
                                                                                                  np.float32))


# ------------------------------------------------------------------ SFT targets (`tasks.get(t).sft_target`)
def encode_targets(tokenizer, texts: Sequence[str], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Target ids right-padded to `length`: [N, 1, length] ids and mask."""
    ids = np.full((len(texts), 1, length), pad_id, np.int32)
    mask = np.zeros((len(texts), 1, length), bool)
    for i, t in enumerate(texts):
        row = chat.encode_text(tokenizer, t)[:length]
        ids[i, 0, :len(row)] = row
        mask[i, 0, :len(row)] = True
    return ids, mask
