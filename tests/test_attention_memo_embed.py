"""Embedding model of attention memoization: eq. 1 distance, sketches, pairs, siamese training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lookupc.errors import LookupcInputError
from lookupc.memo.embed import EmbedConfig, HiddenStateEmbedder, train_embedder
from lookupc.memo.pairs import (
    ROLE_RECORD,
    ROLE_TRAIN,
    ROLE_VAL,
    apm_distance,
    apm_sketch,
    build_pairs,
    pair_distances,
    sketch_rows,
)


def test_apm_distance_is_mean_row_total_variation():
    a = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # 1 head, L = 2
    b = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    # row 0: TV = 1, row 1: TV = 0 -> mean 0.5; SC = 0.5
    assert apm_distance(a, b).item() == pytest.approx(0.5)
    assert apm_distance(a, a).item() == 0.0


def test_sketch_distances_equal_full_distances_for_short_sequences():
    rng = np.random.default_rng(0)
    apms = torch.softmax(torch.tensor(rng.standard_normal((6, 2, 5, 5)), dtype=torch.float32), -1)
    sk = apm_sketch(apms, [5] * 6, rows=8, width=7).numpy()  # 5 <= 8 rows: all of them
    assert sk.shape == (6, 2, 8, 7) and (sk[:, :, 5:] == 0).all() and (sk[..., 5:] == 0).all()
    pairs = np.array([[0, 1], [2, 5], [3, 4]])
    want = [apm_distance(apms[i], apms[j]).item() for i, j in pairs]
    np.testing.assert_allclose(pair_distances(sk, pairs, np.full(6, 5), chunk=2), want, rtol=1e-5)
    np.testing.assert_allclose(pair_distances(apms.numpy(), pairs), want, rtol=1e-5)  # full APMs, no lengths
    rows = sketch_rows(100, 8)
    assert len(rows) == 8 and (np.diff(rows) > 0).all() and np.array_equal(rows, sketch_rows(100, 8))


def test_build_pairs_join_equal_lengths_and_hold_out_copies():
    rng = np.random.default_rng(1)
    n_rec = 10
    hidden = rng.standard_normal((n_rec + 10, 6, 4)).astype(np.float32)
    roles = np.array([ROLE_RECORD] * n_rec + [ROLE_TRAIN] * 6 + [ROLE_VAL] * 4)
    origin = np.concatenate([np.arange(n_rec), [0, 0, 1, 1, 2, 3], [7, 7, 8, 9]])
    lengths = np.array([6, 4] * 5 + [6, 6, 4, 4, 6, 4] + [4, 4, 6, 4])
    p = build_pairs(hidden, roles, origin, lengths, seed=0)
    for pairs in (p.train, p.val):
        assert (lengths[pairs[:, 0]] == lengths[pairs[:, 1]]).all()
        assert (pairs[:, 0] != pairs[:, 1]).all()
    assert not np.isin(np.flatnonzero(roles == ROLE_VAL), p.train).any()  # validation copies never train
    assert {(10, 0), (16, 7)} <= {tuple(x) for x in np.concatenate([p.train, p.val]).tolist()}
    with pytest.raises(LookupcInputError, match="at least 2"):
        build_pairs(hidden[:1], roles[:1], origin[:1], lengths[:1])


def test_embedder_shape_check_cost_and_saturating_similarity():
    emb = HiddenStateEmbedder(8, 16, EmbedConfig(token_dim=2))
    assert emb(torch.zeros(3, 5, 16)).shape == (3, 10)  # 5 real tokens -> 5 * 2 values
    with pytest.raises(LookupcInputError, match=r"\[B, n <= 8, 16\]"):
        emb(torch.zeros(1, 9, 16))
    assert emb.flops_per_sequence() == 2 * 8 * 16 * 2
    q = np.array([0.0, 0.01, 1.0, 100.0])
    sim = emb.similarity(q)  # c = 1
    assert sim[0] == 1.0 and (np.diff(sim) < 0).all() and sim[-1] >= 0.0
    torch.testing.assert_close(emb.similarity(torch.tensor(q)), torch.tensor(sim))


def _synthetic(seed: int = 2, n_rec: int = 40, seq: int = 12, hid: int = 16):
    """Records whose APM is softmax(h W h^T); near copies replace a few token states."""
    rng = np.random.default_rng(seed)
    rec = rng.standard_normal((n_rec, seq, hid)).astype(np.float32)
    copies, origin = [], []
    for i in range(n_rec):
        for k in (1, 2, 4):
            c = rec[i].copy()
            pos = rng.choice(seq, k, replace=False)
            c[pos] = rng.standard_normal((k, hid))
            copies.append(c)
            origin.append(i)
    hidden = np.concatenate([rec, np.stack(copies)])
    w = torch.tensor(rng.standard_normal((hid, hid)).astype(np.float32)) * 0.4
    h = torch.tensor(hidden)
    apms = torch.softmax(h @ w @ h.transpose(1, 2), -1)[:, None]
    roles = np.array([ROLE_RECORD] * n_rec + [ROLE_VAL if o % 4 == 0 else ROLE_TRAIN for o in origin])
    origin = np.concatenate([np.arange(n_rec), origin])
    return hidden, apms, roles, origin, np.full(len(hidden), seq)


def test_siamese_training_lowers_held_out_loss_and_tracks_apm_distance():
    hidden, apms, roles, origin, lengths = _synthetic()
    sk = apm_sketch(apms, lengths, rows=16, width=12).numpy()
    pairs = build_pairs(hidden, roles, origin, lengths, seed=0)
    cfg = EmbedConfig(token_dim=4, pca_dim=16, steps=400, batch_pairs=128, check_every=20)
    emb, rep = train_embedder(hidden, sk, lengths, pairs, cfg, desc="synthetic")
    assert rep.final_loss < 0.5 * rep.initial_loss
    assert rep.val_reduction >= 0.5 and rep.best_step > 0, rep.as_dict()  # it generalises to held-out copies
    assert rep.stopped in ("converged", "steps") and rep.steps <= 400 and rep.seconds > 0
    assert rep.as_dict()["val_curve"][0][0] == 0
    # predicted similarity now tracks the true one on held-out pairs
    with torch.no_grad():
        e = emb(torch.tensor(hidden))
    q = ((e[pairs.val[:, 0]] - e[pairs.val[:, 1]]) ** 2).sum(-1).numpy()
    true = 1 - pair_distances(sk, pairs.val, lengths)
    assert np.corrcoef(emb.similarity(q), true)[0, 1] > 0.8


def test_training_budget_stops_early():
    hidden, apms, roles, origin, lengths = _synthetic(n_rec=12)
    sk = apm_sketch(apms, lengths, rows=16, width=12).numpy()
    pairs = build_pairs(hidden, roles, origin, lengths, seed=0)
    threads = torch.get_num_threads()
    _, rep = train_embedder(hidden, sk, lengths, pairs,
                            EmbedConfig(token_dim=2, pca_dim=8, steps=100_000, max_seconds=0.2, patience=10**6,
                                        threads=1), show_progress=False)
    assert rep.stopped == "time budget" and rep.steps < 100_000
    assert torch.get_num_threads() == threads  # the training thread count is restored


@pytest.mark.parametrize("bad", [dict(token_dim=0), dict(lr=0.0), dict(edit_rates=(0.0,)), dict(max_seconds=-1),
                                 dict(val_fraction=0.6, calib_fraction=0.5), dict(threads=0)])
def test_bad_embed_config_is_refused(bad):
    with pytest.raises(LookupcInputError):
        EmbedConfig(**bad)
