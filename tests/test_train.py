"""Training: the blocked grouped GEMM against ragged_dot, the data split and sampler, the balance update, loss going
down, determinism by seed, resumption to the same parameters; and the shipped model: below the unigram baseline,
non-uniform routing, and the same perplexity under the reference, DEP and DWDP."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import train as train_configs
from dwdp_jax import checkpoint, evaluate, train
from dwdp_jax.kernels.grouped_gemm import xla_grouped_ffn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "tiny_stdlib")


@pytest.fixture(scope="module")
def corpus():
    return train.load_corpus()


def micro_config(**train_changes):
    """A model small enough to compile and train in seconds; every DeepSeek-V3 feature kept."""
    c = train_configs.get_config("cpu")
    c.progress = False
    c.model.update(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    c.train.update(steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_every=4, eval_windows=4,
                   checkpoint_every=2, **train_changes)
    return c


def leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves((nnx.state(params.model), params.experts))]


# --- pieces ---------------------------------------------------------------------------------------------------

def test_blocked_grouped_ffn_equals_ragged_dot():
    """Empty groups, groups longer than a block, rows past the routed total (padding): values and gradients."""
    keys = jax.random.split(jax.random.key(0), 4)
    m, d, f = 300, 16, 8
    sizes_G = jnp.array([0, 140, 3, 0, 90, 37], jnp.int32)  # 270 of 300 rows routed
    x_MD = jax.random.normal(keys[0], (m, d))
    w = [0.3 * jax.random.normal(k, s) for k, s in zip(keys[1:], [(6, d, f), (6, d, f), (6, f, d)])]

    def total(fn, x, *weights):
        return (fn(x, sizes_G, *weights) ** 2).sum()

    ours = train.blocked_grouped_ffn(x_MD, sizes_G, *w, block=32)
    theirs = xla_grouped_ffn(x_MD, sizes_G, *w)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not np.asarray(ours[270:]).any()
    g_ours = jax.grad(lambda *a: total(train.blocked_grouped_ffn, *a), argnums=(0, 1, 2, 3))(x_MD, *w)
    g_theirs = jax.grad(lambda *a: total(xla_grouped_ffn, *a), argnums=(0, 1, 2, 3))(x_MD, *w)
    for a, b in zip(g_ours, g_theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_corpus_is_split_by_file_deterministically(corpus):
    assert corpus.heldout_files and corpus.train_files
    assert not set(corpus.heldout_files) & set(corpus.train_files)
    assert list(corpus.train_files) == sorted(corpus.train_files)
    assert not any(f.startswith("site-packages") for f in corpus.train_files + corpus.heldout_files)
    assert all(train.is_heldout(f, 50) for f in corpus.heldout_files)
    assert 0.02 < corpus.heldout_bytes.size / corpus.train_bytes.size < 0.12
    assert (corpus.train_bytes == train.FILE_SEPARATOR).sum() == len(corpus.train_files)


def test_window_sampler_is_a_function_of_seed_and_position():
    data = np.arange(1001, dtype=np.int64).astype(np.uint8)
    sampler = train.WindowSampler(data, seq_len=10, seed=3)
    assert sampler.num_windows == 100
    whole = sampler.batch(95, 10)  # crosses into epoch 1
    np.testing.assert_array_equal(whole, np.concatenate([sampler.batch(95, 4), sampler.batch(99, 6)]))
    np.testing.assert_array_equal(whole, train.WindowSampler(data, 10, 3).batch(95, 10))
    starts = {int(w[0]) for w in sampler.batch(0, 100)}
    assert len(starts) == 100  # one epoch visits every window once
    assert not np.array_equal(sampler.batch(0, 100), train.WindowSampler(data, 10, 4).batch(0, 100))


def test_bias_update_moves_toward_balance():
    cfg = train.model_config_from(micro_config())
    model, _ = train.init_model(cfg, seed=0)
    _, biases, _ = nnx.split(model, train.BIAS_FILTER, nnx.Param)
    loads = jnp.array([[40, 0, 10, 10, 10, 10, 0, 0]])  # mean 10
    updated = nnx.to_pure_dict(train.update_biases(biases, loads, 0.01, cfg))
    bias = np.asarray(updated["layers"][1]["mlp"]["gate"]["e_score_correction_bias"])
    np.testing.assert_allclose(bias, [-0.01, 0.01, 0, 0, 0, 0, 0.01, 0.01])


# --- runs -----------------------------------------------------------------------------------------------------

def test_training_reduces_loss_is_deterministic_and_resumes_exactly(corpus, tmp_path):
    c = micro_config()
    straight = train.run(c, str(tmp_path / "straight"), corpus=corpus)
    first, last = straight.history[0], straight.history[-1]
    assert [r["step"] for r in straight.history] == [4, 8]
    assert last["train_loss"] < first["train_loss"] < np.log(256)
    assert last["heldout_loss"] < first["heldout_loss"]

    interrupted = train.run(c, str(tmp_path / "resumed"), stop_after=5, corpus=corpus)
    assert interrupted.steps_run == 5
    resumed = train.run(c, str(tmp_path / "resumed"), corpus=corpus)
    assert resumed.resumed_from == 4 and resumed.steps_run == 4  # the step-4 checkpoint; step 5 is redone
    for a, b in zip(leaves(straight.params), leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history[-1] == last

    other_seed = micro_config()
    other_seed.seed = 1
    other = train.run(other_seed, str(tmp_path / "seed1"), stop_after=1, corpus=corpus)
    assert not np.array_equal(leaves(other.params)[0], leaves(straight.params)[0])


def test_resume_refuses_a_workdir_of_another_config(corpus, tmp_path):
    train.run(micro_config(), str(tmp_path), stop_after=2, corpus=corpus)
    with pytest.raises(ValueError, match="another config"):
        train.run(micro_config(learning_rate=1e-3), str(tmp_path), corpus=corpus)


# --- the shipped model --------------------------------------------------------------------------------------

def test_shipped_model_is_small_and_restores():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert size <= 20 * 2 ** 20
    config = checkpoint.load_config(SHIPPED)
    assert config.vocab_size == 256 and config.n_routed_experts == 16 and config.first_k_dense_replace == 1


def test_shipped_model_beats_unigram_routes_unevenly_and_runtimes_agree(corpus):
    windows = train.evenly_spaced_windows(corpus.heldout_bytes, 128, 8)
    doc = evaluate.evaluate_checkpoint(SHIPPED, windows, corpus.train_bytes, num_ranks=4, windows_per_batch=2)
    ppl = {name: s["perplexity"] for name, s in doc["scores"].items()}
    assert ppl["reference"] < 0.5 * doc["unigram"]["perplexity"]
    for name in ("dep", "dwdp"):
        assert evaluate.same_to_digits(ppl[name], ppl["reference"], 4), ppl
        assert doc["verification"][name]["passed"]
    for layer in doc["expert_load"]:  # balanced overall by the bias update, skewed per batch by content
        assert layer["batch_max_over_mean"] > 1.1 * layer["uniform_batch_max_over_mean"], layer
