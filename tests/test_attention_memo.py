"""Attention memoization pass: hits, misses, strictest threshold, persistence, refusal, interruption."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("faiss")

from lookupc.memo_embed import EmbedConfig  # noqa: E402
from lookupc.memo_perf import LayerProfile, LayerTiming  # noqa: E402
from lookupc.memo_store import MemoDatabaseError, MemoStore, StoreWriter  # noqa: E402
from lookupc.passes import attention_memo as am  # noqa: E402

L = 16
EMBED = EmbedConfig(dim=16, token_dim=4, width=32, steps=60, pairs=200, batch_pairs=64)


def tiny_bert(seed: int = 0, layers: int = 2, hidden: int = 32, attn: str = "sdpa"):
    # initializer_range 0.3 makes attention peaked (random BERT at 0.02 is near uniform)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=2 * hidden,
                                  max_position_embeddings=64, initializer_range=0.3,
                                  attn_implementation=attn)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def token_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(5, 100, (n, L), generator=torch.Generator().manual_seed(seed))


def calib(ids: torch.Tensor, batch: int = 8) -> list[dict]:
    return [{"input_ids": ids[i:i + batch]} for i in range(0, len(ids), batch)]


def out(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).last_hidden_state


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_bert()
    path = tmp_path_factory.mktemp("memo") / "db"
    store = am.build_memo_db(model, calib(token_ids(24, 1)), path, embed=EMBED)
    return model, store, path


def test_finds_bert_self_attention_in_order():
    found = am.find_self_attention(tiny_bert(layers=3))
    assert [n for n, _ in found] == [f"encoder.layer.{i}.attention.self" for i in range(3)]
    assert am.find_self_attention(torch.nn.Sequential(torch.nn.Linear(4, 4))) == []


def test_compute_apm_matches_eager_attention_weights():
    model = tiny_bert(attn="eager")
    ids = token_ids(3, 7)
    with torch.no_grad():
        ref = model(input_ids=ids, output_attentions=True).attentions[0]
        hidden = model.embeddings(input_ids=ids)
        apm = am.compute_apm(model.encoder.layer[0].attention.self, hidden)
    torch.testing.assert_close(apm, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hit_returns_stored_apm_times_live_value(built, attn):
    model, store, _ = built
    model = tiny_bert(attn=attn)  # same weights as the built model, other attention interface
    live = token_ids(6, 99)  # not in the database: the live APM differs from the stored one
    memo = am.apply_memo(model, store, threshold=-1e9, layers=[0])
    seen = {}
    wrapper = memo.encoder.layer[0].attention.self
    wrapper.register_forward_hook(lambda m, args, res: seen.update(x=args[0], y=res[0]))
    out(memo, live)
    assert wrapper.stats.hits == 6 and wrapper.stats.misses == 0
    inner, bucket = wrapper.inner, store.bucket(0, L)
    for row, rec, _ in wrapper.stats.last_records:
        stored = torch.tensor(np.array(bucket.apms[rec]))
        v = inner.value(seen["x"][row]).view(L, 4, 8).transpose(0, 1)
        expected = torch.matmul(stored, v).transpose(0, 1).reshape(L, -1)
        assert torch.equal(seen["y"][row], expected)
        live_apm = am.compute_apm(inner, seen["x"][row:row + 1])[0]
        assert not torch.allclose(stored, live_apm, atol=1e-3)  # it really is the stored one


def test_strictest_threshold_memoizes_nothing_and_is_exact(built):
    model, store, _ = built
    ids = token_ids(10, 5)
    memo = am.apply_memo(model, store, threshold=1.0, layers="all")
    assert torch.equal(out(memo, ids), out(model, ids))
    stats = am.memo_stats(memo)
    assert sorted(stats) == [0, 1] and all(s.hits == 0 and s.misses == 10 for s in stats.values())
    auto = am.apply_memo(model, store, threshold=1.0)  # eq. 3 with alpha = 0: no layer is wrapped
    assert am.memo_stats(auto) == {}


def test_calibration_inputs_hit_themselves_and_reproduce_the_model(built):
    model, store, _ = built
    ids = token_ids(24, 1)[:8]
    memo = am.apply_memo(model, store, threshold=0.999, layers="all")  # error correction keeps exact repeats
    torch.testing.assert_close(out(memo, ids), out(model, ids), rtol=1e-4, atol=1e-4)
    assert [r for _, r, _ in am.memo_stats(memo)[0].last_records] == list(range(8))


def test_apply_does_not_modify_the_input_model(built):
    model, store, _ = built
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memo = am.apply_memo(model, store, threshold=-1e9, layers="all")
    assert not any(isinstance(m, am.MemoSelfAttention) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = am.apply_memo(memo, store, threshold=1.0, layers=[1])  # re-applying replaces wrappers
    assert sorted(am.memo_stats(again)) == [1]


def test_padded_sequences_take_the_normal_path(built):
    model, store, _ = built
    ids = token_ids(4, 11)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    memo = am.apply_memo(model, store, threshold=-1e9, layers="all")
    got, ref = out(memo, ids, attention_mask=mask), out(model, ids, attention_mask=mask)
    stats = am.memo_stats(memo)[0]
    assert stats.ineligible == 1 and stats.hits == 3
    # layer 0 is exact for the padded row (normal path); layer 1 saw its normal input too
    assert 1 not in [r for r, _, _ in stats.last_records]
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
    # other lengths have no bucket: ineligible, exact
    memo2 = am.apply_memo(model, store, threshold=-1e9, layers="all")
    short = token_ids(2, 3)[:, :12]
    assert torch.equal(out(memo2, short), out(model, short))
    assert am.memo_stats(memo2)[0].ineligible == 2


def test_database_round_trip(built, tmp_path):
    model, store, path = built
    copy_path = tmp_path / "copied"
    shutil.copytree(path, copy_path)
    reopened = MemoStore.open(copy_path, expect=am.model_fingerprint(model))
    assert reopened.fingerprint == store.fingerprint and sorted(reopened.buckets) == sorted(store.buckets)
    for key, b in store.buckets.items():
        r = reopened.buckets[key]
        assert np.array_equal(np.asarray(r.apms), np.asarray(b.apms))
        assert np.array_equal(r.loo, b.loo)
    ids = token_ids(8, 21)
    a = am.apply_memo(model, store, threshold=-1e9, layers="all")
    b = am.apply_memo(model, copy_path, threshold=-1e9, layers="all")
    assert torch.equal(out(a, ids), out(b, ids))
    assert [(s.hits, s.last_records) for s in am.memo_stats(a).values()] == \
           [(s.hits, s.last_records) for s in am.memo_stats(b).values()]
    manifest = json.loads((copy_path / "manifest.json").read_text())
    assert manifest["fingerprint"]["num_layers"] == 2 and manifest["fingerprint"]["hidden_size"] == 32
    assert manifest["buckets"][0]["seq_len"] == L and manifest["buckets"][0]["train"]["seconds"] > 0


@pytest.mark.parametrize("other, word", [
    (dict(seed=3), "attention weights differ"),
    (dict(layers=3), "num_layers: database has 2, model has 3"),
    (dict(hidden=48), "hidden_size: database has 32, model has 48"),
])
def test_mismatched_database_is_refused(built, other, word):
    _, _, path = built
    with pytest.raises(MemoDatabaseError, match=word):
        am.apply_memo(tiny_bert(**other), path)


def test_existing_output_is_not_overwritten_by_default(built):
    model, _, path = built
    with pytest.raises(ValueError, match="exists"):
        am.build_memo_db(model, calib(token_ids(4, 2)), path, embed=EMBED)


def test_interrupted_build_leaves_nothing_that_loads(built, tmp_path, monkeypatch):
    model, _, _ = built
    calls = []
    real = am.train_embedder

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption mid-build")
        return real(*args, **kwargs)

    monkeypatch.setattr(am, "train_embedder", failing)
    target = tmp_path / "db"
    with pytest.raises(KeyboardInterrupt):
        am.build_memo_db(model, calib(token_ids(8, 4)), target, embed=EMBED)
    assert len(calls) == 2  # it was interrupted after writing one layer
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp dir is left
    with pytest.raises(MemoDatabaseError, match="does not exist"):
        MemoStore.open(target)
    # a killed process leaves a temp dir without manifest: refused too
    writer = StoreWriter(tmp_path / "killed")
    writer.apm_array(0, L, 2, 4)[:] = 0.5
    with pytest.raises(MemoDatabaseError, match="not a finished"):
        MemoStore.open(writer.tmp)
    shutil.rmtree(writer.tmp)


def test_truncated_apm_file_is_refused(built, tmp_path):
    _, _, path = built
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    apm = next(bad.glob("apm_*.bin"))
    apm.write_bytes(apm.read_bytes()[:-4])
    with pytest.raises(MemoDatabaseError, match="bytes, expected"):
        MemoStore.open(bad)


def test_performance_model_eq3_selects_layers(built):
    pred = np.array([0.5, 0.92, 0.96, 0.99], dtype=np.float32)
    prof = LayerProfile(0, L, LayerTiming(t_attention=10.0, t_hit=4.0, t_overhead=1.0), pred, pred,
                        margin_quantile=None)
    assert prof.inflation == 1.0
    assert prof.hit_rate(0.95) == 0.5 and prof.benefit(0.95) == pytest.approx(6.0 * 0.5 - 1.0)
    assert prof.hit_rate(0.999) == 0.0 and not prof.worth_it(0.999)
    # an embedder whose leave-one-out neighbours are really 1.5x further than predicted
    biased = LayerProfile(0, L, prof.timing, pred, 1.0 - 1.5 * (1.0 - pred), margin_quantile=0.9)
    assert biased.inflation == pytest.approx(1.5, rel=1e-5)
    assert biased.corrected(1.0) == 1.0  # an exact repeat still hits
    assert biased.hit_rate(0.95) == 0.25 and biased.hit_rate(0.9) == 0.5 and biased.hit_rate(0.85) == 0.75
    _, store, _ = built
    profiles = am.layer_profiles(store)
    assert sorted(profiles) == [(0, L), (1, L)]
    for p in profiles.values():
        assert p.timing.t_attention > 0 and p.timing.t_overhead > 0 and len(p.loo_predicted) == 24
    memo = am.apply_memo(built[0], store, threshold=-1e9)  # alpha = 1 everywhere
    expect = sorted(l for (l, _), p in profiles.items() if p.benefit(-1e9) > 0)
    assert sorted(am.memo_stats(memo)) == expect


def test_padded_calibration_sequences_are_skipped(tmp_path):
    model = tiny_bert()
    ids = token_ids(6, 13)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    store = am.build_memo_db(model, [{"input_ids": ids, "attention_mask": mask}], tmp_path / "db", embed=EMBED)
    reopened = MemoStore.open(tmp_path / "db")
    assert all(b.count == 5 for b in reopened.buckets.values()) and store.bucket(0, L).count == 5
    with torch.no_grad():
        hidden = model.embeddings(input_ids=ids[[0, 1, 3]])
        want = am.compute_apm(model.encoder.layer[0].attention.self, hidden)
    np.testing.assert_allclose(np.asarray(reopened.bucket(0, L).apms[:3]), want.numpy(), rtol=1e-5, atol=1e-6)
