"""Embedding model of attention memoization: eq. 1 distance, pair sampling, siamese training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lookupc.memo_embed import (
    EmbedConfig,
    HiddenStateEmbedder,
    apm_distance,
    pair_distances,
    sample_pairs,
    train_embedder,
)


def test_apm_distance_is_mean_row_total_variation():
    a = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # 1 head, L = 2
    b = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    # row 0: TV = 1, row 1: TV = 0 -> mean 0.5; SC = 0.5
    assert apm_distance(a, b).item() == pytest.approx(0.5)
    assert apm_distance(a, a).item() == 0.0


def test_pair_distances_reads_in_chunks():
    rng = np.random.default_rng(0)
    apms = torch.softmax(torch.tensor(rng.standard_normal((10, 2, 4, 4)), dtype=torch.float32), -1).numpy()
    pairs = np.array([[0, 1], [2, 9], [3, 4]])
    got = pair_distances(apms, pairs, chunk=2)
    want = [apm_distance(torch.tensor(apms[i]), torch.tensor(apms[j])).item() for i, j in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sample_pairs_are_distinct_and_unordered():
    hidden = np.random.default_rng(1).standard_normal((12, 3, 5)).astype(np.float32)
    pairs = sample_pairs(hidden, 40, seed=0)
    assert pairs.shape == (40, 2) and (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == 40
    assert len(sample_pairs(hidden, 10_000, seed=0)) == 12 * 11 // 2  # capped at all pairs
    with pytest.raises(ValueError, match="at least 2"):
        sample_pairs(hidden[:1], 4, seed=0)


def test_embedder_shape_check_and_cost():
    emb = HiddenStateEmbedder(8, 16, EmbedConfig(dim=4, token_dim=2, width=8))
    with pytest.raises(ValueError, match=r"\[B, 8, 16\]"):
        emb(torch.zeros(1, 7, 16))
    assert emb.flops_per_sequence() == 2 * (8 * 16 * 2 + 16 * 8 + 8 * 4)


def test_siamese_training_lowers_loss_and_tracks_apm_distance():
    # hidden states whose APMs are a known function of them: APM = softmax(h W h^T)
    rng = np.random.default_rng(2)
    n, seq, hid = 48, 8, 12
    base = rng.standard_normal((4, seq, hid))
    hidden = (base[rng.integers(0, 4, n)] + 0.3 * rng.standard_normal((n, seq, hid))).astype(np.float32)
    w = rng.standard_normal((hid, hid)).astype(np.float32)
    h = torch.tensor(hidden)
    apms = torch.softmax(h @ torch.tensor(w) @ h.transpose(1, 2), -1)[:, None].numpy()
    cfg = EmbedConfig(dim=8, token_dim=4, width=32, steps=150, pairs=600, batch_pairs=128)
    emb, rep = train_embedder(hidden, apms, cfg)
    assert rep.final_loss < 0.3 * rep.initial_loss
    assert rep.final_val_loss < 0.8 * rep.initial_val_loss and rep.best_step > 0  # it generalises
    assert rep.seconds > 0 and rep.steps == 150 and len(rep.losses) == 150
    # embedding distance now correlates with APM distance on held-out pairs
    pairs = sample_pairs(hidden, 300, seed=9)
    with torch.no_grad():
        e = emb(h)
    ed = (e[pairs[:, 0]] - e[pairs[:, 1]]).norm(dim=-1).numpy()
    ad = pair_distances(apms, pairs)
    assert np.corrcoef(ed, ad)[0, 1] > 0.8
