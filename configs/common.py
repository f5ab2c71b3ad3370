"""Shared defaults of every pr1_jax training config: PR1's recipe (docs/method.md §1).

A task config calls `base()` and changes what its PR1 script changes. Override anything on
the command line: `--config=configs/grounding.py --config.optim.learning_rate=2e-6`.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "grounding"  # grounding | counting | detection | ocr
    c.model_dir = ""  # HF checkpoint directory (Qwen/Qwen2-VL-2B-Instruct downloaded by the user)
    c.workdir = "runs/pr1"
    c.seed = 42  # HF TrainingArguments default
    c.dtype = "bfloat16"  # compute and parameter dtype (PR1: bf16 with fp32 master weights under ZeRO-3)
    c.remat = True  # PR1 trains with gradient checkpointing
    # Kernels: the same math, chosen for speed (benchmarks/RESULTS.md has the measurements).
    # attention (training, scoring, prefill): "xla" einsums, "cudnn" flash attention, "splash"
    # (Pallas TPU flash attention), or "auto" = cudnn on NVIDIA GPUs where the shapes allow,
    # splash on TPU, xla elsewhere (CPU).
    c.attention = "auto"
    # With remat, what each layer keeps (pr1_jax.model.qwen2_vl.REMAT_POLICIES): "full" keeps
    # nothing (least memory); "dots_flash" keeps the matmul and flash-attention outputs;
    # "auto" takes the fastest whose compiled update fits the device (pr1_jax/programs.py).
    c.remat_policy = "auto"
    c.scan_unroll = 1  # decoder layers unrolled per scan step (28 = straight-line program; compiles slower)
    c.vision_scan_unroll = 1  # the same for the vision blocks (32 at the 2B size)
    # The device mesh (pr1_jax/sharding.py): batch split over data × fsdp, weights over fsdp
    # (and tensor); -1 takes the remaining devices. Batch sizes must be multiples of data × fsdp.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # PR1-format file (JSON/JSONL/YAML mixture/HF dir/TFDS)
    c.data.eval = ""
    c.data.image_dir = ""
    c.data.train_sample_size = -1  # first N rows (PR1's train_sample_size); -1 = all
    c.data.eval_examples = 64
    c.data.eval_batch = 0  # prompts per greedy evaluation batch; 0 = batch.prompts_per_step
    # The held-out evaluation's prompt: "training" (the training prompt and system prompt) or "paper"
    # (PR1's evaluation scripts' prompt, as `python -m pr1_jax.evaluate` sends by default).
    c.data.eval_prompt = "training"
    # The detection curriculum (pr1_jax/data/schedule.py): stages of harder data and more rollouts,
    # from the difficulty order of `python -m pr1_jax.data.curriculum`. "" = off (PR1's released code).
    c.data.curriculum = ml_collections.ConfigDict(dict(difficulty="", stage_steps=(0,), num_generations=(), mix=()))
    c.data.min_pixels = 3136
    c.data.max_pixels = 1_000_000  # PR1 trains at max_pixels 1e6
    c.data.synthetic = 0  # > 0: generate this many synthetic training rows (demo/tests)

    c.prompt = ml_collections.ConfigDict()
    c.prompt.system = "default"  # "You are a helpful assistant. " (trailing space, as PR1 trains)
    c.skip_special_tokens = False  # how completions are decoded for the rewards (True for detection)
    c.rewards = ("pr1_grounding", "pr1_grounding_format")
    c.reward_kwargs = ml_collections.ConfigDict()  # per-reward keyword arguments, e.g. pr1_detection

    c.grpo = ml_collections.ConfigDict()  # fields of pr1_jax.grpo.GRPOConfig (PR1 defaults there)
    c.grpo.num_generations = 8
    c.grpo.beta = 0.04
    c.grpo.temperature = 0.9  # TRL default, what PR1's grounding script uses
    c.grpo.temperature_func = "constant"

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 768
    c.sampling.top_p = 0.9
    c.sampling.top_k = 50
    # Decode-step attention: "xla", "pallas" (one fused kernel per layer and step; GPU, any mesh:
    # under shard_map on several devices), "pallas_tpu" (a Pallas TPU kernel, any mesh), or
    # "auto": pallas on NVIDIA GPUs, pallas_tpu on TPU, xla elsewhere.
    c.sampling.decode_attention = "auto"
    # Benchmarks on random weights only (they never emit EOS): force EOS at lengths drawn from
    # this distribution, e.g. "geometric:40" or "task" (pr1_jax/workload.py). "" = off.
    c.sampling.end_lengths = ""

    # PR1: 7 ranks × 1 prompt (8 completions) per micro-step × grad-accum 2 = 14 prompts / step.
    c.batch = ml_collections.ConfigDict()
    # The update's micro-batches change nothing in PR1's math (a mean of equal micro-batch means),
    # only memory and speed: 0 = the most prompts per micro-batch whose program fits the device.
    c.batch.prompts_per_step = 14
    c.batch.prompts_per_micro = 0
    # Caps, not shapes: each step's prompts, images and completions are padded to the next rung
    # of a small ladder (pr1_jax/shapes.py); these bound what one row may hold.
    c.batch.seq_len = 2048
    # ≥ patches of the largest image data.max_pixels allows: 1e6 px / 14² → ≤ 5,102 patches.
    c.batch.patch_row_len = 5120
    # The update's completions packed per block of prompts (one block per batch shard), each prompt
    # taking the rows its answers need (fewer padded positions for long-tailed answers, the same
    # math), instead of the rows the step's longest group needs for every prompt. Grounding on an
    # H200: 6,144 completion positions instead of 8,960, 1.41 s per step instead of 1.54
    # (benchmarks/RESULTS.md, eleventh session). False: each prompt's completions in rows of their own.
    c.batch.completion_blocks = True
    # With completion blocks: a block's prompts packed back to back in the update too, instead of
    # each left-padded to the step's longest (grounding: ≈ 6,000 real prompt tokens computed as
    # 8,000–9,000). The same math (tests/test_train_step.py, tests/test_train.py). Off: on an H200
    # the grounding update is 5.5% faster, the step no faster, and it compiles more programs
    # (benchmarks/RESULTS.md, twelfth session).
    c.batch.pack_prompts = False
    # A step reuses a shape (so a program) the run has compiled already when it costs at most this
    # fraction more than the step's own rungs (pr1_jax.shapes.ShapeMemo): fewer programs, a little
    # more padding; 0 = always the step's own rungs. Never changes the math.
    c.batch.shape_slack = 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "linear"
    c.optim.max_grad_norm = 1.0
    c.optim.weight_decay = 0.0
    c.optim.eps = 1e-8  # AdamW epsilon (HF adam_epsilon); the SFT warm-up uses it too
    c.num_epochs = 1
    c.total_steps = -1  # -1 = num_epochs · examples / prompts_per_step

    c.sft = ml_collections.ConfigDict()  # optional supervised warm-up on the same data path
    c.sft.steps = 0
    c.sft.learning_rate = 1e-5
    c.sft.prompts_per_step = 16
    c.sft.eval_every = 50  # held-out evaluation every N SFT steps (the policy after SFT: at GRPO step 0)

    c.eval_every = 50
    c.checkpoint_every = 100  # PR1 saves every 100 steps
    c.keep_checkpoints = 3  # newest N (step 0, the policy after SFT, is always kept)
    c.chunk_size = 128  # completion tokens per LM-head chunk when scoring

    # Where the run's numbers and pictures go (pr1_jax/monitor.py, docs/monitoring.md).
    c.monitor = ml_collections.ConfigDict()
    c.monitor.tensorboard = True  # event files in the workdir: tensorboard --logdir WORKDIR
    c.monitor.wandb = False  # also Weights & Biases, when `wandb` is installed
    c.monitor.wandb_project = "pr1_jax"
    c.monitor.eval_texts = 4  # greedy completions per evaluation shown as text
    c.monitor.no_signal_steps = 10  # warn after N GRPO steps in a row with all group rewards equal; 0 = never
    # JAX's persistent compile cache for `python -m pr1_jax.train` (pr1_jax/programs.py
    # enable_compile_cache): reruns and resumes load their programs instead of compiling; "" = off.
    c.compile_cache = "~/.cache/pr1_jax/xla"
    c.verbose = False  # True: third-party INFO logs (orbax, absl, jax) on the console too
    return c
