"""Perception-R1 training: GRPO (optionally after an SFT warm-up) on one perception task.

    python -m pr1_jax.train --config=configs/grounding.py --config.model_dir=DIR \
        --config.data.train=FILE [--config.x=y ...]
    python -m pr1_jax.train --config=configs/demo.py          # the CPU demo (README)

Reads top to bottom: model → data → programs → resume or (SFT) → loop of
[prompts → rollouts → rewards → advantages → update → metrics] → evaluation, plots,
checkpoint. Outputs in `workdir` (`pr1_jax/monitor.py`, docs/monitoring.md): metrics.jsonl,
eval.jsonl, TensorBoard event files (`tensorboard --logdir WORKDIR`, live from step 1: every
metric, the SFT loss, galleries, sample completions), PNG curves (redrawn at each evaluation
and checkpoint) and galleries, summary.json, checkpoints/step_<N> (orbax: params, optimizer,
RNG, data iterator; step 0 = after SFT). Third-party INFO logs (orbax, absl) stay off the
console unless `--config.verbose=True`.

Runs on a device mesh (`config.mesh`: data × fsdp × tensor, `pr1_jax/sharding.py`), on one
host or several: the same command on every host (`tpu/run.sh`) joins them with
`jax.distributed`. Each process loads only its slices of the weights and only its share of
the prompts (`local_batch_size`: batch sizes are multiples of data × fsdp); rewards are
computed where the completions were decoded; metrics are gathered, and process 0 writes
the files.

Rerunning the same command resumes from the newest good checkpoint in `workdir`,
bit-exactly on CPU. SIGTERM (preemption) and the first Ctrl-C (SIGINT) save a checkpoint at
the end of the current GRPO step and exit with status 0; a second Ctrl-C exits at once
(docs/checkpoints.md; `pr1_jax/checkpoint.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app
from ml_collections import config_flags
from tqdm import tqdm

from pr1_jax import checkpoint, grpo, monitor, multihost, rollouts, sharding, tasks, tiny, train_state, viz, workload
from pr1_jax import evaluator as evaluator_lib
from pr1_jax.accounting import StepAccount
from pr1_jax.data import pipeline, readers
from pr1_jax.data.schedule import Curriculum
from pr1_jax.pretrained import Pretrained
from pr1_jax.processing import chat
from pr1_jax.errors import ConfigError
from pr1_jax.evaluator import Evaluator, Example
from pr1_jax.programs import Programs, enable_compile_cache, resolve_kernels
from pr1_jax.structs import Rollouts, SamplingConfig, TrainState
from pr1_jax.shapes import ShapeMemo, StepShapes, attention_weight, packs_images
from pr1_jax.train_step import OptimConfig, make_optimizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
log = logging.getLogger("pr1_jax.train")


def train_and_evaluate(c: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """The whole run on a mesh of `devices` (default: all, shaped by `c.mesh`); every process
    of a multi-host run calls it, process 0 writes the logs. Returns the summary."""
    monitor.quiet_console(verbose=c.get("verbose", False))
    mesh = sharding.mesh_from_config(c.mesh, devices)
    sharding.check_batch_sizes({"batch.prompts_per_step": c.batch.prompts_per_step,
                                "batch.prompts_per_micro": c.batch.prompts_per_micro,
                                "data.eval_batch": eval_batch_size(c),
                                **({"sft.prompts_per_step": c.sft.prompts_per_step} if c.sft.steps > 0 else {})}, mesh)
    # Config values that cannot work fail here, before any model or data is read.
    resolve_kernels(c.attention, c.sampling.decode_attention, mesh)
    end_lengths = workload.EndLengths.parse(c.sampling.end_lengths, c.task)  # benchmarks only
    main = multihost.is_main_process()
    workdir = multihost.storage_path(c.workdir)  # local, or gs://… (docs/storage.md): every write goes through epath
    workdir.mkdir(parents=True, exist_ok=True)
    if main:
        (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
    mon = monitor.Monitor(workdir, c, enabled=main, score_name=score_name(c))  # logs, TensorBoard, plots
    rng = sharding.replicate(jax.random.PRNGKey(c.seed), mesh)
    dtype = jnp.dtype(c.dtype)

    # ---------------------------------------------------------------- model (each process reads its slices)
    model_dir = c.model_dir
    if model_dir.startswith("tiny"):  # a tiny random Qwen2-VL, written by transformers (demo/tests)
        model_dir = tiny.write_tiny_checkpoint(multihost.scratch_path(workdir, "base_model"), **dict(c.get("tiny", {})))
    pre = Pretrained.load(model_dir, mesh=mesh, dtype=dtype, min_pixels=c.data.min_pixels,
                          max_pixels=c.data.max_pixels)
    special = pre.special
    system_prompt = chat.SYSTEM_PROMPTS.get(c.prompt.system, c.prompt.system)

    # ---------------------------------------------------------------- data (each process reads its shard)
    train_path, eval_path, image_dir = c.data.train, c.data.eval, c.data.image_dir or None
    if c.data.synthetic:
        writer = tasks.get(c.task).write_synthetic
        kw = dict(c.data.get("synthetic_kwargs", {}))
        data_dir = multihost.scratch_path(workdir, "data")
        files = writer(data_dir, c.data.synthetic, seed=c.seed, name="train", **kw)
        train_path, image_dir = files.path, files.image_dir
        eval_path = (writer(data_dir, c.data.eval_examples, seed=c.seed + 1, name="eval", **kw).path
                     if c.data.eval_examples > 0 else None)
    size = c.data.train_sample_size if c.data.train_sample_size > 0 else None
    train_examples, report = readers.read(train_path, c.task, image_dir=image_dir, train_sample_size=size)
    eval_examples, _ = (readers.read(eval_path, c.task, image_dir=image_dir)
                        if eval_path and c.data.eval_examples > 0 else ([], None))
    eval_examples = list(eval_examples)[:c.data.eval_examples]
    log.info("train rows: %s", report.as_dict())
    prepare = functools.partial(pipeline.load_and_resize, cfg=pre.image_config)
    p_step = c.batch.prompts_per_step
    total_steps = c.total_steps if c.total_steps > 0 else max(1, c.num_epochs * len(train_examples) // p_step)
    # The curriculum's stages (data/schedule.py; one plain stage without data.curriculum): this process's shard.
    curriculum = Curriculum.from_config(c, len(train_examples))
    data = curriculum.iterator(train_examples, prepare=prepare, seed=c.seed)
    if curriculum.on and main:
        log.info("curriculum: %s", curriculum.describe())
        (workdir / "curriculum.json").write_text(json.dumps(curriculum.describe(), indent=1) + "\n")

    # ---------------------------------------------------------------- programs (pr1_jax/programs.py)
    programs = Programs.from_config(c, pre.config, mesh, special.eos_ids, special.pad_id, total_steps=total_steps)
    grpo_cfg = programs.grpo_cfg
    # Per-step ladders under the config's caps; a block's images packed into one row per batch shard.
    local_shards = sharding.batch_shards(mesh) // jax.process_count()  # a block of prompts per shard
    completion_blocks = bool(c.batch.get("completion_blocks", False))
    # ... and a block's prompts packed too (not with Qwen3-VL's DeepStack planes)
    pack_prompts = completion_blocks and bool(c.batch.get("pack_prompts", False)) and \
        pre.config.model_type != "qwen3_vl"
    image_rows = local_shards if packs_images(pre.config) else 0
    shapes = StepShapes.from_config(c, num_samples=curriculum.max_generations, image_rows=image_rows)
    # The shapes used so far (so compiled): a step reuses one that costs ≤ batch.shape_slack more.
    memo = ShapeMemo(slack=c.batch.get("shape_slack", 0.1))
    attn_weight = attention_weight(pre.config.text)  # how completions are packed (shapes.packing_cost)
    params = pre.params
    # ---------------------------------------------------------------- held-out evaluation (pr1_jax/evaluator.py)
    greedy = Evaluator(pre, c.task, sample=programs.rollout, mesh=mesh, batch_size=eval_batch_size(c),
                       max_new_tokens=c.sampling.max_new_tokens, prompt=c.data.get("eval_prompt", "training"),
                       system_prompt=system_prompt)
    evaluator = functools.partial(evaluate, greedy=greedy, examples=[Example(i, row) for i, row in
                                                                     enumerate(eval_examples)], c=c, mon=mon)
    lr_schedule = grpo_learning_rate(c, total_steps)  # for the logs
    history: dict[str, list] = {"step": [], "reward": [], "eval_step": [], "eval_score": []}

    # ---------------------------------------------------------------- resume (pr1_jax/checkpoint.py)
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", keep=c.get("keep_checkpoints", 3))
    preempt = checkpoint.Preemption()  # SIGTERM, 1st Ctrl-C: checkpoint at the end of the step, then exit 0
    run_meta = {"reference": "step_0" if c.sft.steps > 0 else "base_model",
                "model_dir": str(Path(model_dir).absolute()), "model_config": pre.config.to_hf_dict(),
                "config": json.loads(c.to_json_best_effort())}
    target = train_state.abstract_train_state(pre.config, programs.optimizer, mesh, dtype=dtype)
    resumed = ckpt.restore_latest(target, rng)
    start = resumed.step if resumed is not None else 0
    # The logs keep the steps done so far (a killed run may have logged past its last checkpoint).
    mon.resume_at(start if resumed is not None else None)
    if resumed is not None:  # GRPO goes on from `start`; the SFT warm-up, if any, is done
        state, rng, history = resumed.state, resumed.rng, resumed.meta["history"]
        memo.load(resumed.meta.get("shapes_used"), (rollouts.PromptShape, rollouts.CompletionShape))
        if resumed.data_state is not None:  # None: saved by another number of processes (a warning said so)
            data.set_state(resumed.data_state)
        # The frozen reference is read from its source: step 0 (after SFT) or the base model.
        ref_params = ckpt.restore_params(0, like=params) if resumed.meta["reference"] == "step_0" else params
    else:
        # ------------------------------------------------------------ SFT warm-up (optional)
        if c.sft.steps > 0:
            with preempt.exit_at_once():  # not checkpointed: SIGTERM or Ctrl-C exits now, a restart redoes it
                params = sft_warmup(c, pre, programs, params, mesh, data, shapes, system_prompt, evaluator, history,
                                    mon)
        ref_params = params  # frozen initial policy, never synced (PR1)
        # a copy: donated step by step
        state = train_state.init_train_state(params, programs.optimizer, mesh, cfg=pre.config)
        score0 = evaluator(state.params, step=0, tag="grpo")
        history["eval_step"].append(0)
        history["eval_score"].append(score0)
        mon.curves(history)  # eval.png from the first evaluation on (the SFT's, if any, and the GRPO start)
        if c.sft.steps > 0:  # a restart begins GRPO here, and reads the reference from here
            ckpt.save(0, state, rng=rng, data_state=data.get_state(), meta=dict(run_meta, history=history))

    # ---------------------------------------------------------------- GRPO
    p_local = multihost.local_batch_size(p_step)
    shards = sharding.batch_shards(mesh)

    def next_prompts(step: int):
        """The step's examples, encoded, laid out (the same shapes on every process) and sent to
        the mesh: (examples, prompts, sizes, shapes, host inputs, device inputs)."""
        curriculum.advance(data, step)  # the step's curriculum stage
        examples = [next(data) for _ in range(p_local)]
        prompts = rollouts.encode_examples(examples, c.task, special, pre.tokenizer, pre.image_config, system_prompt)
        size = global_prompt_size(prompts)
        pshape = size.padded(shapes, memo=memo)
        host = rollouts.prompt_inputs(prompts, special, pshape)
        return examples, prompts, size, pshape, host, sharding.shard_batch(host, mesh, process_local=True)

    def end_at_of(step: int, g: int):
        """Benchmarks (`sampling.end_lengths`): the step's answer lengths, [p_local, g] on the mesh."""
        if end_lengths is None:
            return None
        draw = end_lengths.draw((p_local, g), c.sampling.max_new_tokens,
                                seed=c.seed * 100_003 + step * 7919 + jax.process_index())
        return sharding.shard_batch(draw, mesh, process_local=True)

    upcoming = None
    stop = False
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="GRPO", dynamic_ncols=True,
               disable=not main)
    for step in bar:
        acct = StepAccount(programs)
        with acct.phase("data"):  # this process's prompts of the step (made during the last update)
            examples, prompts, size, pshape, host_inputs, inputs = upcoming or next_prompts(step)
            upcoming = None
        temperature = grpo.temperature_at(step, grpo_cfg, total_steps)
        g = curriculum.num_generations(step)  # G, grpo.num_generations unless a curriculum stage raises it
        rng, key = jax.random.split(rng)
        times: dict[str, float] = {}
        sampling = SamplingConfig(num_samples=g, max_new_tokens=c.sampling.max_new_tokens,
                                  temperature=temperature, top_p=c.sampling.top_p, top_k=c.sampling.top_k)
        out = programs.rollout(state.params, inputs, key, sampling, end_at=end_at_of(step, g), timings=times)
        acct.add_time("prefill", times["prefill_s"])
        acct.add_time("decode", times["decode_s"])
        # The next curriculum stage samples another G: its rollout compiles now, in the background
        # (for this step's prompt shapes), so that the switch itself compiles only the update.
        g_next = curriculum.next_generations(step)
        if g_next and (step == start or curriculum.stage_at(step - 1) != curriculum.stage_at(step)):
            programs.compile_rollout_ahead(state.params, inputs, key, dataclasses.replace(sampling, num_samples=g_next),
                                           end_at=end_at_of(step, g_next))
        with acct.phase("rewards"):
            tokens, lengths, logp = multihost.host_local((out.tokens, out.lengths, out.logp))  # [p_local, G, ...]
            texts = rollouts.decode_completions(pre.tokenizer, tokens, c.skip_special_tokens)
            total, per_fn = rollouts.score(texts, examples, c.rewards, g, c.reward_kwargs.to_dict())
            advantages, adv_stats = grpo.group_advantages(  # a group lives on one process
                jnp.asarray(total), dataclasses.replace(grpo_cfg, num_generations=g))
            mask = np.asarray(grpo.completion_mask(
                jnp.asarray(tokens.reshape(-1, tokens.shape[-1])), special.im_end, special.pad_id,
                lengths_b=jnp.asarray(lengths.reshape(-1)),
                pr1_mask_quirk=grpo_cfg.pr1_mask_quirk)).reshape(tokens.shape)
        with acct.phase("update"):
            # Each prompt's completions in rows of its own, or (batch.completion_blocks) a block of
            # prompts sharing its rows, one block per batch shard of a micro-batch.
            # Reusing a completion shape is judged against the whole program's cost: its patches
            # and prompt tokens too (packed prompts: part of the shape).
            patches = math.prod(host_inputs.pixels.shape[:2]) / p_local  # per prompt
            counts = multihost.gather(np.array([len(p.ids) for p in prompts])) if pack_prompts else None

            def cshape_of(bs: int) -> rollouts.CompletionShape:
                need = rollouts.block_tokens(counts, bs) if counts is not None else 0
                return global_completion_shape(mask, shapes, pshape.seq_len, attn_weight, bs, memo=memo,
                                               fixed=bs * (patches + (0 if need else pshape.seq_len)),
                                               block_prompt_tokens=need)
            cshape = cshape_of(p_local // local_shards if completion_blocks else 1)

            def make_batch(micro: int) -> Rollouts:
                b = multihost.local_batch_size(micro)
                psh = size.padded(shapes, b, memo=memo)
                # One micro-batch laid out as the rollout's: its prompts are on the mesh already.
                reuse = b == p_local and psh == pshape
                csh = cshape if b == p_local or not completion_blocks else cshape_of(b // local_shards)
                host = rollouts.assemble(prompts, special, psh, csh, tokens, mask, np.asarray(advantages), logp,
                                         np.asarray(adv_stats["loss_weight"]), b,
                                         prompt_batch=host_inputs if reuse else None)
                if not reuse:
                    return sharding.shard_batch(host, mesh, process_local=True)
                rest = sharding.shard_batch(host.replace(prompts=None), mesh, process_local=True)
                return rest.replace(prompts=sharding.as_one_micro_batch(inputs, mesh))
            batch = programs.update_batch(state, ref_params, make_batch, p_step, shards, step_key=(pshape, cshape, g))
            for _ in range(grpo_cfg.num_iterations):  # μ = 1 in PR1: one update per rollout batch
                state, m = programs.update(state, ref_params, batch)
            # While the device updates: the next step's prompts (images read, resized, tokenized).
            # A checkpoint stores the iterator as it was before them, so a restart reads them again.
            data_state = data.get_state()
            if step + 1 < total_steps:
                upcoming = next_prompts(step + 1)
            m = {k: float(v) for k, v in jax.device_get(m).items()}  # replicated: the same on every process
        m["update/prompts_per_micro"], m["update/remat"] = programs.update_choice(batch)
        total, per_fn, std_g, zero_std_g, lengths = multihost.gather(
            (total, per_fn, np.asarray(adv_stats["std_g"]), np.asarray(adv_stats["zero_std_g"], np.float32), lengths))
        acct.completions(lengths, lengths >= c.sampling.max_new_tokens, int(out.decode_steps))
        acct.count(prompt_real=sum(len(p.ids) for p in prompts), prompt_padded=pshape.seq_len * len(prompts),
                   patches_real=sum(p.image[0].shape[0] for p in prompts),
                   patches_padded=math.prod(batch.prompts.pixels.shape[:3]) // jax.process_count(),  # [M, R, N]
                   update_prompt_padded=(math.prod(batch.completions.prompt_pack.shape) if
                                         batch.completions.prompt_pack is not None else
                                         math.prod(batch.prompts.input_ids.shape)) // jax.process_count(),
                   completion_real=int(mask.sum()),
                   completion_padded=math.prod(batch.completions.tokens.shape) // jax.process_count())
        # TRL's names: frac_reward_zero_std = groups whose G rewards are all equal (advantages 0);
        # reward/<fn>/std = that reward's std over the step's completions (ddof=1, as TRL's).
        m.update(reward=float(total.mean()), reward_std=float(std_g.mean()),
                 frac_reward_zero_std=float(zero_std_g.mean()),
                 learning_rate=lr_schedule(state),  # of the step's (last) applied update
                 completion_length=float(lengths.mean()), temperature=float(temperature),
                 **{f"reward/{k}": float(v.mean()) for k, v in per_fn.items()},
                 **{f"reward/{k}/std": float(np.std(v, ddof=1)) for k, v in per_fn.items()},
                 **curriculum.metrics(step, float(total.mean())))
        history["step"].append(step + 1)
        history["reward"].append(m["reward"])
        bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m.get('kl', 0):.4f}", len=f"{m['completion_length']:.0f}")
        evaluated = (step + 1) % c.eval_every == 0 or step + 1 == total_steps
        if evaluated:
            with acct.phase("eval"):
                history["eval_step"].append(step + 1)
                history["eval_score"].append(evaluator(state.params, step=step + 1, tag="grpo"))
        stop = preempt.stop_requested()
        saved = stop or (step + 1) % c.checkpoint_every == 0 or step + 1 == total_steps
        if saved:
            with acct.phase("checkpoint"):
                ckpt.save(step + 1, state, rng=rng, data_state=data_state,
                          meta=dict(run_meta, history=history, shapes_used=memo.state()))
        m.update(acct.as_metrics())
        m["step_time"] = m["time/step_s"]
        m["tokens_per_s"] = float(lengths.sum()) / m["step_time"]
        mon.log_step(step + 1, m)  # metrics.jsonl, TensorBoard (W&B), the no-learning-signal warning
        if evaluated or saved:  # the PNG curves as far as the run got (a preempted run has them too)
            mon.curves(history)
        if stop:
            break
    ckpt.close()  # waits for the last asynchronous save
    preempt.close()
    mon.close()
    if stop:
        log.warning("preempted: stopped after GRPO step %d with a checkpoint; rerun the command to resume", step + 1)
        return {"preempted": True, "steps_done": step + 1, "checkpoint": str(ckpt.step_dir(step + 1))}
    # skipped_examples: this process's shard of the data.
    final = {"skipped_examples": data.report.as_dict() if hasattr(data.report, "as_dict") else str(data.report),
             "eval_at_grpo_start": _score_at(history, 0), "eval_last": history["eval_score"][-1],
             "steps": total_steps}
    mon.summary(final)  # strict JSON: no evaluation gives null, not NaN
    return final


def _score_at(history: dict, step: int) -> float | None:
    """The held-out score recorded at `step` (0 = the GRPO start, after any SFT)."""
    scores = [s for t, s in zip(history["eval_step"], history["eval_score"]) if t == step]
    return scores[-1] if scores else None


def global_prompt_size(prompts) -> rollouts.PromptSize:
    """The largest prompt and image of the step over every process (all must pick one shape)."""
    size = rollouts.PromptSize.of(prompts)
    tokens, counts = multihost.gather((np.array([size.tokens]), np.array([size.patch_counts[0]])))
    return rollouts.PromptSize(int(tokens.max()), int(counts.max()), tuple(tuple(int(n) for n in c) for c in counts))


def global_completion_shape(mask_ngt: np.ndarray, shapes: StepShapes, prompt_len: int, weight: float,
                            prompts_per_block: int = 1, memo: ShapeMemo | None = None,
                            fixed: float = 0.0, block_prompt_tokens: int = 0) -> rollouts.CompletionShape:
    """The update's completion shapes, chosen from every process's extents (all pick the same),
    for blocks of `prompts_per_block` prompts (`block_prompt_tokens` > 0: packed prompts)."""
    return rollouts.CompletionShape.choose(multihost.gather(rollouts.completion_extents(mask_ngt)), shapes,
                                           prompt_len, weight, prompts_per_block, memo=memo, fixed=fixed,
                                           block_prompt_tokens=block_prompt_tokens)


def sft_warmup(c, pre, programs, params, mesh, data, shapes, system_prompt, evaluator, history, mon):
    """Supervised warm-up on the task's ground-truth answers (same scoring path as GRPO)."""
    opt = make_optimizer(OptimConfig(learning_rate=c.sft.learning_rate, total_steps=c.sft.steps,
                                     schedule="constant", max_grad_norm=c.optim.max_grad_norm, eps=c.optim.eps))
    state = train_state.init_train_state(params, opt, mesh, cfg=pre.config)
    n = multihost.local_batch_size(c.sft.prompts_per_step)  # this process's prompts of a step
    bar = tqdm(range(c.sft.steps), desc="SFT", dynamic_ncols=True, disable=not multihost.is_main_process())
    for step in bar:
        examples = [next(data) for _ in range(n)]
        prompts = rollouts.encode_examples(examples, c.task, pre.special, pre.tokenizer, pre.image_config,
                                           system_prompt)
        targets = [tasks.get(c.task).target(ex) for ex in examples]
        ids, mask = rollouts.encode_targets(pre.tokenizer, targets, c.sampling.max_new_tokens, pre.special.pad_id)
        zeros = np.zeros(ids.shape, np.float32)
        pshape = global_prompt_size(prompts).padded(shapes)
        cshape = global_completion_shape(mask, shapes, pshape.seq_len, attention_weight(pre.config.text))
        batch = rollouts.assemble(prompts, pre.special, pshape, cshape, ids, mask, zeros[..., 0], zeros,
                                  np.ones(zeros.shape[:2], np.float32), n)
        state, m = programs.sft(state, sharding.shard_batch(batch, mesh, process_local=True), opt)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        mon.log_sft(step + 1, dict(m, learning_rate=c.sft.learning_rate))  # a constant schedule
        if (step + 1) % c.sft.eval_every == 0 and step + 1 < c.sft.steps:  # the GRPO start evaluates the last
            history["eval_step"].append(-(c.sft.steps - step - 1))
            history["eval_score"].append(evaluator(state.params, step=step + 1, tag="sft"))
            mon.curves(history)
    return state.params


def evaluate(params, *, greedy: Evaluator, examples: Sequence[Example], c, mon, step: int, tag: str) -> float:
    """Greedy answers to the held-out examples (`pr1_jax.evaluator`, the loop `python -m
    pr1_jax.evaluate` runs), scored by the task's paper metrics and the run's rewards; returns
    the paper's headline number (`score_name`). Logs to `mon`: an eval.jsonl row, the gallery
    and a few completions.
    """
    if not examples:
        return float("nan")
    result = greedy(params, examples)
    task = greedy.task
    if not result.answers:  # every held-out image failed to load
        return float("nan")
    rows = [a.row() for a in result.answers]
    total, _ = rollouts.score([a.text for a in result.answers], rows, c.rewards, 1, c.reward_kwargs.to_dict())
    metrics = {**result.scores.metrics, "reward": float(total.mean()), "skipped": len(result.skipped)}
    score = metrics[task.headline]
    if not multihost.is_main_process():
        return score
    gallery = None
    items = evaluator_lib.gallery_items(result, 16)
    if items:
        gallery = mon.workdir / f"gallery_{tag}_{step}.png"  # local or gs://… (docs/storage.md)
        viz.gallery(items, gallery)
    mon.log_eval(tag, step, metrics, samples=[(a.row(), a.text) for a in result.answers], gallery=gallery)
    tqdm.write(f"[eval {tag} step {step}] score={score:.3f}")
    return score


def score_name(c) -> str:
    """What `evaluate` returns as the held-out score (eval.png's title names it)."""
    return tasks.get(c.task).headline_label


def eval_batch_size(c) -> int:
    """Prompts per evaluation batch: `data.eval_batch`, or 0 → the GRPO batch."""
    return c.data.eval_batch or c.batch.prompts_per_step


def grpo_learning_rate(c, total_steps: int) -> Callable[[TrainState], float]:
    """For the logs: the learning rate of a GRPO train state's last applied optimizer update.

    The schedule is the one `Programs.from_config` gives AdamW through `make_optimizer` (linear
    to 0 over `total_steps`, no warm-up, or constant), indexed like optax's own count: updates
    applied, since `optax.apply_if_finite` skips a non-finite one without advancing it
    (tests/test_monitor.py checks the two agree)."""
    if c.optim.schedule == "linear":
        schedule = optax.linear_schedule(c.optim.learning_rate, 0.0, max(total_steps, 1))
    else:
        schedule = optax.constant_schedule(c.optim.learning_rate)

    def of(state: TrainState) -> float:
        applied = int(state.step) - int(state.opt_state.total_notfinite)
        return float(schedule(max(applied - 1, 0)))

    return of


def main(argv) -> None:
    """The command line; its expected mistakes end in one line and exit 2 (`__main__`, pr1_jax/cli.py)."""
    from pr1_jax import cli

    del argv
    c = _CONFIG.value
    if c is None:
        raise ConfigError("--config is required, e.g. --config=configs/grounding.py (configs/demo.py: the CPU demo)")
    multihost.initialize_distributed()  # joins the other processes of a multi-host run; no-op on one
    logging.basicConfig(level=logging.INFO)
    monitor.quiet_console(verbose=c.get("verbose", False))  # before jax's backend probe logs its INFO lines
    # Mistakes that would otherwise surface minutes in, or as tracebacks from deep inside.
    if not c.model_dir.startswith("tiny"):
        cli.model_dir(c.model_dir, "--config.model_dir")
    if not c.data.synthetic and not c.data.train:
        raise ConfigError("--config.data.train is not set: pass the training file (PR1 JSON/JSONL, a YAML "
                          "mixture, an HF or TFDS directory)")
    cli.writable_dir(c.workdir, "--config.workdir")
    cli.as_config_error("--config.mesh", sharding.mesh_from_config, c.mesh)
    cli.check_training_config(c)
    cache = enable_compile_cache(c.get("compile_cache", ""))
    log.debug("compile cache: %s", cache or "off")
    summary = train_and_evaluate(c)
    if multihost.is_main_process():
        print(json.dumps(monitor.finite_or_none(summary), indent=2, default=str))  # strict JSON, as summary.json


if __name__ == "__main__":
    from pr1_jax import cli

    sys.exit(cli.run("pr1_jax.train", app.run, main,
                     flags_parser=cli.absl_flags("pr1_jax.train", help_config="configs/grounding.py")))
