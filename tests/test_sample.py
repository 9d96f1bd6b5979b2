"""Samplers against transformers' logits warpers and processors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from edgert.sample import (apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty,
                           make_sampler)

V = 1000


def logprobs_batch(seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(1, V)).astype(np.float32) * 3
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def kept(ours: mx.array) -> np.ndarray:
    return np.isfinite(np.array(ours))


def hf_kept(warper, lp: np.ndarray) -> np.ndarray:
    return np.isfinite(warper(None, torch.tensor(lp)).numpy())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, 50, 999])
def test_top_k_matches_transformers(seed, k):
    lp = logprobs_batch(seed)
    assert (kept(apply_top_k(mx.array(lp), k)) == hf_kept(hf.TopKLogitsWarper(k), lp)).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(seed, p):
    lp = logprobs_batch(seed)
    assert (kept(apply_top_p(mx.array(lp), p)) == hf_kept(hf.TopPLogitsWarper(p), lp)).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(seed, min_p):
    lp = logprobs_batch(seed)
    ours = kept(apply_min_p(mx.array(lp), min_p))
    assert (ours == hf_kept(hf.MinPLogitsWarper(min_p), lp)).all()


@pytest.mark.parametrize("penalty", [0.8, 1.3])
def test_repetition_penalty_matches_transformers(penalty):
    logits = np.random.default_rng(0).normal(size=(1, V)).astype(np.float32)
    tokens = np.array([3, 17, 17, 999, 500])
    ours = make_repetition_penalty(penalty)(mx.array(tokens), mx.array(logits))
    ref = hf.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(tokens[None]),
                                                       torch.tensor(logits))
    np.testing.assert_allclose(np.array(ours), ref.numpy(), rtol=1e-6)


def test_greedy_is_argmax():
    lp = mx.array(logprobs_batch(3))
    assert make_sampler()(lp).item() == int(np.argmax(np.array(lp)))


def test_same_seed_same_samples_and_filters_respected():
    lp = mx.array(logprobs_batch(4))
    a = make_sampler(1.0, top_k=20, seed=7)
    b = make_sampler(1.0, top_k=20, seed=7)
    xs = [a(lp).item() for _ in range(200)]
    ys = [b(lp).item() for _ in range(200)]
    assert xs == ys
    assert len(set(xs)) > 5  # it really samples
    top20 = set(np.argsort(-np.array(lp)[0])[:20].tolist())
    assert set(xs) <= top20
    c = make_sampler(1.0, top_k=20, seed=8)
    assert [c(lp).item() for _ in range(200)] != xs


def test_temperature_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    s = make_sampler(1.0, seed=0)
    counts = np.bincount([s(mx.array(logits)).item() for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)
