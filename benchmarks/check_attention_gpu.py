"""GPU checks of the attention kernels that CPU tests cannot run: values, gradients and time.

    python3 benchmarks/check_attention_gpu.py [--out results.jsonl]

1. `layers.attention(impl="cudnn")` (cuDNN flash attention) against the einsum path, forward
   and gradients, at the shapes of a GRPO update: completions over a left-padded shared
   prompt prefix, the prompt's causal self-attention, ViT blocks over packed images. Then
   forward+backward time per call of each at the 2B model's shapes.
2. `fused_cached_attention` with key splits against `layers.cached_attention` at decode
   steps t = 1, 128, 255 of an 8 × 8 rollout, and time per call (a loop of 50 calls);
   `fused_decode_step` (RoPE + cache write + attention) against the three XLA steps.
Prints one JSON line per check; exits 1 if a difference is over its tolerance.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pr1_jax.model import layers  # noqa: E402
from pr1_jax.model.decode_attention import (fused_cached_attention, fused_decode_step,  # noqa: E402
                                             reference_decode_step)

BF16 = jnp.bfloat16


def _time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def training_cases(key):
    """(name, q, k, v, mask, prefix) at the 2B update's shapes (8 prompts × G=8, 318 + 256 tokens)."""
    ks = jax.random.split(key, 8)
    n = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(BF16)  # noqa: E731
    b, g, t, p, h, kv, dh = 8, 8, 256, 318, 12, 2, 128
    pad = jnp.arange(b) * 7  # left padding of each prompt
    mask_p = jnp.arange(p)[None] >= pad[:, None]
    causal_c = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, g, t, t))
    yield ("completions", n(ks[0], (b, g, t, h, dh)), n(ks[1], (b, g, t, kv, dh)), n(ks[2], (b, g, t, kv, dh)),
           causal_c, (n(ks[3], (b, p, kv, dh)), n(ks[4], (b, p, kv, dh)), mask_p))
    causal_p = jnp.tril(jnp.ones((p, p), bool))[None, None] & mask_p[:, None, None, :]
    yield ("prompt", n(ks[5], (b, 1, p, h, dh)), n(ks[6], (b, 1, p, kv, dh)), n(ks[7], (b, 1, p, kv, dh)),
           causal_p, None)
    r, m, vh, vdh = 8, 1024, 16, 80  # ViT: 8 packed rows of 1,024 patches; row 0 holds two images
    seg = jnp.zeros((r, m), jnp.int32).at[0, 600:].set(1)
    ks = jax.random.split(ks[0], 3)
    yield ("vision", n(ks[0], (r, 1, m, vh, vdh)), n(ks[1], (r, 1, m, vh, vdh)), n(ks[2], (r, 1, m, vh, vdh)),
           (seg[:, :, None] == seg[:, None, :])[:, None], None)


def check_training(emit) -> bool:
    ok = True
    for name, q, k, v, mask, prefix in training_cases(jax.random.PRNGKey(0)):
        mask_p = None if prefix is None else prefix[2]
        prefix = None if prefix is None else prefix[:2]  # differentiable part

        def loss(impl, q, k, v, prefix, mask=mask, mask_p=mask_p):
            pre = None if prefix is None else (*prefix, mask_p)
            out = layers.attention(q, k, v, mask, pre, impl=impl)
            w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))  # a fixed random-ish cotangent
            # Queries with no valid key (left-pad positions) feed nothing a loss reads (their K/V
            # are masked for every valid query), so their cotangent is 0 in training: here too.
            w = w * jnp.any(mask, axis=-1)[..., None, None]
            return jnp.sum(out.astype(jnp.float32) * w), out

        grads = {}
        for impl in ("xla", "cudnn"):
            fn = jax.jit(jax.value_and_grad(lambda q, k, v, pre, impl=impl: loss(impl, q, k, v, pre),
                                            argnums=(0, 1, 2, 3), has_aux=True))
            (_, out), g = fn(q, k, v, prefix)
            grads[impl] = (out, g, _time(fn, q, k, v, prefix))
        (o_x, g_x, t_x), (o_c, g_c, t_c) = grads["xla"], grads["cudnn"]
        valid = np.asarray(jnp.any(mask, axis=-1))  # fully masked (left-pad) queries: unused outputs
        out_err = _rel(np.asarray(o_c, np.float32)[valid], np.asarray(o_x, np.float32)[valid])
        grad_err = max(_rel(a, b) for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_x)))
        finite = bool(jnp.all(jnp.isfinite(o_c))) and all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g_c))
        rec = {"check": "flash_attention", "case": name, "finite": finite, "out_rel_err": round(out_err, 5),
               "grad_rel_err": round(grad_err, 5), "xla_fwd_bwd_ms": round(1e3 * t_x, 3),
               "cudnn_fwd_bwd_ms": round(1e3 * t_c, 3), "ok": finite and out_err < 2e-2 and grad_err < 5e-2}
        ok &= rec["ok"]
        emit(rec)
    return ok


def check_decode(emit) -> bool:
    ok = True
    b, g, kv, r, dh, p, s = 8, 8, 2, 6, 128, 318, 256
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    n = lambda k, sh: jax.random.normal(k, sh, jnp.float32).astype(BF16)  # noqa: E731
    q, k, v = n(ks[0], (b, g, 1, kv * r, dh)), n(ks[1], (b, g, kv, s, dh)), n(ks[2], (b, g, kv, s, dh))
    mask_p = jnp.arange(p)[None] >= (jnp.arange(b) * 7)[:, None]
    prefix = (n(ks[3], (b, kv, p, dh)), n(ks[4], (b, kv, p, dh)), mask_p)
    for t in (1, 128, 255):
        mask = jnp.broadcast_to(jnp.arange(s) <= t, (b, g, 1, s))
        ref = layers.cached_attention(q, k, v, mask, prefix)
        for splits in (1, 0):
            call = lambda q, splits=splits: fused_cached_attention(q, k, v, mask, prefix, num_splits=splits)  # noqa: E731
            err = _rel(call(q), ref)
            loop = jax.jit(lambda q, call=call: jax.lax.fori_loop(0, 50, lambda _, x: call(x), q))
            per_call = _time(loop, q) / 50
            rec = {"check": "decode_attention", "t": t, "splits": splits, "rel_err": round(err, 5),
                   "us_per_call": round(1e6 * per_call, 1), "ok": err < 2e-2}
            ok &= rec["ok"]
            emit(rec)
        # The one-kernel step (RoPE + cache write + attention) against the three XLA steps.
        qkv = n(jax.random.fold_in(ks[0], t), (b, g, 1, kv * r + 2 * kv, dh))
        angles = jax.random.uniform(jax.random.fold_in(ks[1], t), (b, g, 1, dh // 2), jnp.float32, 0, 300)
        cos, sin = jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1))
        step = jax.jit(lambda qkv, kc, vc, t=t, mask=mask: fused_decode_step(
            qkv, cos, sin, kc, vc, jnp.int32(t), mask, prefix, num_heads=kv * r))
        ref_step = jax.jit(lambda qkv, kc, vc, t=t, mask=mask: reference_decode_step(
            qkv, cos, sin, kc, vc, t, mask, prefix, num_heads=kv * r))
        errs = [_rel(a, b_) for a, b_ in zip(step(qkv, k, v), ref_step(qkv, k, v))]
        rec = {"check": "decode_step", "t": t, "rel_err_out_k_v": [round(e, 5) for e in errs], "ok": max(errs) < 2e-2}
        ok &= rec["ok"]
        emit(rec)
        xla = jax.jit(lambda q: jax.lax.fori_loop(0, 50, lambda _, x: layers.cached_attention(x, k, v, mask, prefix), q))
        emit({"check": "decode_attention", "t": t, "splits": "xla", "us_per_call": round(1e6 * _time(xla, q) / 50, 1)})
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--only", default="training,decode")
    args = p.parse_args()
    device = jax.devices()[0].device_kind

    def emit(rec):
        rec.update(device=device, jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    ok = True
    if "training" in args.only:
        ok &= check_training(emit)
    if "decode" in args.only:
        ok &= check_decode(emit)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
