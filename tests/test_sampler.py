"""The on-device sampler: equal to transformers' greedy generate, cache == full forward,
the right sampling distribution, reproducible, one compile per bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from pr1_jax import sampler as sampler_lib
from pr1_jax.model import hf_io
from pr1_jax.model.config import ModelConfig
from pr1_jax.model.qwen2_vl import Qwen2VL
from pr1_jax.processing import batch as pb
from tests.helpers import mixed_batch

EOS = (151645, 151643)
PAD = 151643


@pytest.fixture(scope="module")
def setup(sampler_dir):
    cfg = ModelConfig.from_pretrained(sampler_dir)
    params = jax.tree.map(jnp.asarray, hf_io.load_params(sampler_dir, cfg))
    rows, images, pv, thw = mixed_batch(sampler_dir, cfg)
    inputs = pb.build_inputs(rows, images, image_token_id=cfg.image_token_id, pad_id=PAD)
    model = Qwen2VL(cfg)
    return dict(dir=sampler_dir, cfg=cfg, params=params, rows=rows, images=images, pv=pv, thw=thw,
                inputs=jax.tree.map(jnp.asarray, inputs), np_inputs=inputs, model=model,
                sampler=sampler_lib.Sampler(model, EOS, PAD))


def test_greedy_equals_transformers_generate(setup):
    from transformers import Qwen2VLForConditionalGeneration

    s = setup
    out = s["sampler"](s["params"], s["inputs"], jax.random.PRNGKey(0),
                       sampler_lib.SamplingConfig(max_new_tokens=32, temperature=0))
    hf = Qwen2VLForConditionalGeneration.from_pretrained(s["dir"], dtype=torch.float32).eval()
    ids = torch.tensor(s["np_inputs"].input_ids, dtype=torch.long)
    ref = hf.generate(input_ids=ids, attention_mask=torch.tensor(s["np_inputs"].attention_mask, dtype=torch.long),
                      pixel_values=torch.tensor(s["pv"]), image_grid_thw=torch.tensor(s["thw"]),
                      mm_token_type_ids=(ids == s["cfg"].image_token_id).long(), max_new_tokens=32,
                      do_sample=False)[:, ids.shape[1]:].numpy()
    ours = np.asarray(out.tokens[:, 0])
    assert ref.shape[1] == 32 and len(np.unique(ref)) > 50  # diverse, not a degenerate repeat
    np.testing.assert_array_equal(ours, ref)


def test_cached_decoding_equals_full_forward(setup):
    """Every decode step's logits equal the full causal forward over prompt + completion."""
    s = setup
    g, tc = 2, 10
    out = s["sampler"](s["params"], s["inputs"], jax.random.PRNGKey(1),
                       sampler_lib.SamplingConfig(num_samples=g, max_new_tokens=tc, temperature=1.0),
                       return_logits=True)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    rows, images = [], []
    for b, prompt in enumerate(s["rows"]):
        for j in range(g):
            rows.append(np.concatenate([prompt, tokens[b, j, :lengths[b, j]]]))
    for b in range(len(s["rows"])):  # each prompt's image repeated for its G rows
        img = {0: 0, 1: 1, 3: 2}.get(b)
        if img is not None:
            images += [s["images"][img]] * g
    full = pb.build_inputs(rows, images, image_token_id=s["cfg"].image_token_id, pad_id=PAD)
    logits = np.asarray(s["model"].apply({"params": s["params"]}, jax.tree.map(jnp.asarray, full)))
    seq = full.input_ids.shape[1]
    worst = 0.0
    for r in range(len(rows)):
        b, j = divmod(r, g)
        n = lengths[b, j]
        # logits predicting completion token t sit at position seq - n - 1 + t (right-aligned rows).
        ref = logits[r, seq - n - 1: seq - 1]
        worst = max(worst, float(np.abs(np.asarray(out.logits[b, j, :n]) - ref).max()))
        lp = jax.nn.log_softmax(ref, -1)[np.arange(n), tokens[b, j, :n]]
        np.testing.assert_allclose(np.asarray(out.logp[b, j, :n]), lp, atol=1e-4)
    print(f"max |Δlogits| cached vs full = {worst:.2e}")
    assert worst <= 1e-4


def _analytic(logits, temperature, top_k, top_p):
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros_like(z, bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    sorted_p = p[order]
    before = np.cumsum(sorted_p) - sorted_p
    keep_p = np.zeros_like(keep)
    keep_p[order[before < top_p]] = True
    p = np.where(keep & keep_p, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,block", [
    (1.0, 0, 1.0, 128), (0.7, 0, 1.0, 4), (1.3, 0, 1.0, 6),  # blocked two-stage draws (6: padded vocab)
    (0.7, 5, 1.0, 128), (1.0, 0, 0.8, 128), (0.9, 8, 0.9, 128),
    (0.7, 5, 1.0, 2), (0.9, 8, 0.9, 3)])  # blocked top-k (k < V / block)
def test_sampling_distribution_chi_square(temperature, top_k, top_p, block):
    logits = np.random.default_rng(0).normal(size=20).astype(np.float32) * 1.5
    n = 40_000
    batch = jnp.broadcast_to(jnp.asarray(logits), (n, 20))
    token, logp, logp_sample = jax.jit(lambda k: sampler_lib._choose(
        batch, k, jnp.float32(temperature), jnp.float32(top_p), top_k=top_k, use_top_p=top_p < 1,
        greedy=False, block=block))(jax.random.PRNGKey(7))
    np.testing.assert_allclose(np.asarray(logp), np.asarray(jax.nn.log_softmax(batch))[np.arange(n), token],
                               atol=1e-5)
    p = _analytic(logits.astype(np.float64), temperature, top_k, top_p)
    counts = np.bincount(np.asarray(token), minlength=20)
    assert counts[p == 0].sum() == 0  # filtered tokens are never drawn
    support = p > 0
    chi2 = scipy.stats.chisquare(counts[support], n * p[support])
    assert chi2.pvalue > 1e-3, chi2
    np.testing.assert_allclose(np.exp(np.asarray(logp_sample)), p[np.asarray(token)], rtol=1e-4)


@pytest.mark.parametrize("k,block", [(1, 4), (5, 4), (50, 16), (50, 128), (7, 3), (300, 128)])
def test_blocked_top_k_equals_lax_top_k(k, block):
    """Values and indices of lax.top_k exactly, ties (to the lower index) included."""
    rng = np.random.default_rng(k + block)
    x = rng.normal(size=(4, 3, 1000)).astype(np.float32) * 2
    for logits in (x, np.round(x), np.round(x * 4) / 4):  # continuous, then many ties
        want = jax.lax.top_k(jnp.asarray(logits), k)
        got = sampler_lib._top_k_blocked(jnp.asarray(logits), k, block)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("block", [128, 4, 7])
def test_blocked_greedy_is_argmax(block):
    """Two-stage argmax = jnp.argmax (first maximum on ties), V not a multiple of the block."""
    logits = jnp.asarray(np.random.default_rng(1).integers(0, 6, size=(50, 30)).astype(np.float32))  # many ties
    token, logp, _ = sampler_lib._choose(logits, None, jnp.float32(1), jnp.float32(1), top_k=0, use_top_p=False,
                                         greedy=True, block=block)
    np.testing.assert_array_equal(np.asarray(token), np.argmax(np.asarray(logits), -1))
    np.testing.assert_allclose(np.asarray(logp), np.max(np.asarray(jax.nn.log_softmax(logits)), -1), atol=1e-6)


def test_seeded_reproducible_and_rows_independent(setup):
    s = setup
    cfg = sampler_lib.SamplingConfig(num_samples=4, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50)
    a = s["sampler"](s["params"], s["inputs"], jax.random.PRNGKey(3), cfg)
    b = s["sampler"](s["params"], s["inputs"], jax.random.PRNGKey(3), cfg)
    c = s["sampler"](s["params"], s["inputs"], jax.random.PRNGKey(4), cfg)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    toks = np.asarray(a.tokens)
    for row in range(toks.shape[0]):  # the G samples of a group differ from each other
        assert len({tuple(t) for t in toks[row]}) > 1


def test_eos_stops_rows_and_pads(setup):
    s = setup
    greedy = sampler_lib.SamplingConfig(max_new_tokens=12, temperature=0)
    ref = np.asarray(s["sampler"](s["params"], s["inputs"], jax.random.PRNGKey(0), greedy).tokens[:, 0])
    fake_eos = int(ref[0, 4])  # make row 0's 5th greedy token a stop token
    sam = sampler_lib.Sampler(s["model"], (fake_eos,), PAD)
    out = sam(s["params"], s["inputs"], jax.random.PRNGKey(0), greedy)
    toks, lengths = np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0])
    first = int(np.where(ref[0] == fake_eos)[0][0])
    assert lengths[0] == first + 1 and toks[0, first] == fake_eos
    assert (toks[0, first + 1:] == PAD).all() and (np.asarray(out.logp[0, 0, first + 1:]) == 0).all()
    np.testing.assert_array_equal(np.asarray(out.mask[0, 0]), np.arange(12) <= first)


def test_chunked_loop_equals_step_by_step(setup):
    """Checking "all rows done?" every 1, 5 or 16 steps gives the same rollouts: 12 tokens are
    11 decode steps (chunks of 5 run 4 padding steps), with rows that stop early (sampled) and
    a batch whose rows all stop early (greedy: the loop exits before max_new_tokens)."""
    s = setup
    run = lambda eos, c, cfg: sampler_lib.Sampler(s["model"], eos, PAD, steps_per_check=c)(  # noqa: E731
        s["params"], s["inputs"], jax.random.PRNGKey(2), cfg)
    sampled = sampler_lib.SamplingConfig(num_samples=2, max_new_tokens=12, temperature=1.0, top_k=50)
    greedy = sampler_lib.SamplingConfig(max_new_tokens=12, temperature=0)
    free_run = np.asarray(run(EOS, 1, sampled).tokens)
    greedy_run = np.asarray(run(EOS, 1, greedy).tokens)
    cases = [(sampled, (int(free_run[0, 0, 3]), int(free_run[2, 1, 6]))),  # some rows stop early
             (greedy, tuple(int(t) for t in greedy_run[:, 0, 4]))]  # every row stops by token 5
    for cfg, eos in cases:
        ref = run(eos, 1, cfg)
        lengths = np.asarray(ref.lengths)
        assert lengths.min() < 12 and (cfg is greedy) == (lengths.max() <= 5), lengths
        for c in (5, 16):
            out = run(eos, c, cfg)
            for name in ("tokens", "logp", "logp_sample", "lengths"):
                np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), name)


def test_windowed_decode_equals_full_cache(setup):
    """The XLA decode attention over growing cache windows (16, 32, then all 40 slots) gives the
    same tokens as attending over the whole cache at every step, and the same log-probs."""
    s = setup
    cfg = sampler_lib.SamplingConfig(num_samples=2, max_new_tokens=40, temperature=1.0, top_k=20)
    run = lambda first: sampler_lib.Sampler(s["model"], (), PAD, steps_per_check=8, first_window=first)(  # noqa: E731
        s["params"], s["inputs"], jax.random.PRNGKey(5), cfg)
    assert sampler_lib.decode_windows(40, 8, "xla", 16) == (16, 32, 40)
    full, windowed = run(0), run(16)
    assert int(windowed.decode_steps) == int(full.decode_steps) == 41  # 1 + 5 chunks of 8 (the last runs past 40)
    np.testing.assert_array_equal(np.asarray(windowed.tokens), np.asarray(full.tokens))
    np.testing.assert_allclose(np.asarray(windowed.logp), np.asarray(full.logp), atol=1e-5)


@pytest.mark.parametrize("decode_attention", ["xla", "pallas"])
def test_compacted_decode_equals_all_rows(setup, decode_attention):
    """Decoding only the live rows once few are left (16 rows → 4 → 1, `compact_sizes`) gives
    the same tokens, log-probs and lengths as decoding every row to the end: each row has its
    own random stream. Answers end at drawn lengths (`end_at`) from 2 to 30 tokens; the XLA
    attention also crosses its cache windows (16, 32, 40) after compacting."""
    s = setup
    b = s["inputs"].input_ids.shape[0]
    end_at = jnp.asarray(np.minimum(np.random.default_rng(0).geometric(0.15, (b, 4)) + 1, 30), jnp.int32)
    end_at = end_at.at[0, 0].set(30)  # one long answer: the last stage runs for one row
    cfg = sampler_lib.SamplingConfig(num_samples=4, max_new_tokens=40, temperature=1.0, top_p=0.9, top_k=50)
    assert sampler_lib.compact_sizes(b * 4) == (4, 1)

    def run(compact):
        sam = sampler_lib.Sampler(s["model"], EOS, PAD, steps_per_check=4, first_window=16, compact=compact,
                                  decode_attention=decode_attention)
        out = sam(s["params"], s["inputs"], jax.random.PRNGKey(7), cfg, end_at=end_at)
        return out, sam._decode.lower(s["params"], sam._prefill(s["params"], s["inputs"]), jax.random.PRNGKey(7),
                                      jnp.float32(1.0), jnp.float32(0.9), end_at,
                                      **sam.static_args(cfg)).as_text().count("stablehlo.while")

    (ref, loops_ref), (out, loops) = run(False), run(True)
    assert loops > loops_ref  # the compacted program has a loop per stage
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(end_at))
    assert int(out.decode_steps) == int(ref.decode_steps)
    for name in ("tokens", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), name)
    for name in ("logp", "logp_sample"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)), atol=1e-5,
                                   err_msg=name)


def test_end_at_hook_ends_completions(setup):
    """The benchmark hook: EOS forced as token end_at − 1; the loop stops once all are done."""
    s = setup
    b = s["inputs"].input_ids.shape[0]
    end_at = np.tile(np.array([[3, 7]], np.int32), (b, 1))
    out = sampler_lib.Sampler(s["model"], EOS, PAD)(s["params"], s["inputs"], jax.random.PRNGKey(3),
                                                    sampler_lib.SamplingConfig(num_samples=2, max_new_tokens=30,
                                                                               temperature=1.0),
                                                    end_at=jnp.asarray(end_at))
    np.testing.assert_array_equal(np.asarray(out.lengths), end_at)
    assert (np.asarray(out.tokens)[:, 0, 2] == EOS[0]).all() and (np.asarray(out.tokens)[:, 1, 6] == EOS[0]).all()
    assert int(out.decode_steps) < 30  # stopped at a chunk boundary after the longest


def test_one_compile_per_bucket(setup):
    s = setup
    sam = sampler_lib.Sampler(s["model"], EOS, PAD)
    cfg = sampler_lib.SamplingConfig(num_samples=2, max_new_tokens=4, temperature=1.0)
    sam(s["params"], s["inputs"], jax.random.PRNGKey(0), cfg)
    # A different batch of the same bucket: other prompts and images, other temperature.
    rows = [r[::-1].copy() for r in s["rows"]]
    other = pb.build_inputs(rows[:2] + rows[2:], s["images"], image_token_id=s["cfg"].image_token_id,
                            pad_id=PAD, seq_len=s["np_inputs"].input_ids.shape[1],
                            row_len=s["np_inputs"].pixels.shape[1], num_rows=s["np_inputs"].pixels.shape[0])
    sam(s["params"], jax.tree.map(jnp.asarray, other), jax.random.PRNGKey(1),
        sampler_lib.SamplingConfig(num_samples=2, max_new_tokens=4, temperature=0.5))
    assert sam.num_compiled() == 2  # one prefill, one decode program


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(num_samples=0),
                                    dict(top_p=0.0), dict(temperature=-1.0)])
def test_bad_sampling_config(kwargs):
    with pytest.raises(ValueError):
        sampler_lib.SamplingConfig(**kwargs)
