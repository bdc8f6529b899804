"""Attention memoization pass: hits, misses, batching, padding, eq. 3 plan, persistence, refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("faiss")

from lookupc.errors import LookupcError  # noqa: E402
from lookupc.memo import build as memo_build  # noqa: E402
from lookupc.memo.calib import SimilarityCalibration  # noqa: E402
from lookupc.memo.embed import EmbedConfig  # noqa: E402
from lookupc.memo.perf import LayerProfile, LayerTiming, format_plan  # noqa: E402
from lookupc.memo.store import MemoDatabaseError, MemoStore, StoreWriter  # noqa: E402
from lookupc.passes import attention_memo as am  # noqa: E402

L = 16
EMBED = EmbedConfig(token_dim=4, pca_dim=16, steps=150, batch_pairs=64)


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


def calib(ids: torch.Tensor, batch: int = 8, mask: torch.Tensor | None = None) -> list[dict]:
    items = [{"input_ids": ids[i:i + batch]} for i in range(0, len(ids), batch)]
    if mask is not None:
        for k, i in enumerate(range(0, len(ids), batch)):
            items[k]["attention_mask"] = mask[i:i + batch]
    return items


def out(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).last_hidden_state


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_bert()
    path = tmp_path_factory.mktemp("memo") / "db"
    store = am.build_memo_db(model, calib(token_ids(24, 1)), path, embed=EMBED, progress=False)
    return model, store, path


def padded_batch(ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


@pytest.fixture(scope="module")
def padded_db(tmp_path_factory):
    """A database from right-padded sequences of real lengths 10 and 16."""
    model = tiny_bert()
    ids = token_ids(24, 31)
    mask = padded_batch(ids, [10, 16] * 12)
    path = tmp_path_factory.mktemp("memo_pad") / "db"
    store = am.build_memo_db(model, calib(ids, mask=mask), path, embed=EMBED, progress=False)
    return model, store


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
        torch.testing.assert_close(seen["y"][row], expected, rtol=1e-6, atol=1e-6)
        live_apm = am.compute_apm(inner, seen["x"][row:row + 1])[0]
        assert not torch.allclose(stored, live_apm, atol=1e-3)  # it really is the stored one


def test_batched_hits_equal_the_per_row_path(built, padded_db):
    for model, store, ids, mask in [(built[0], built[1], token_ids(7, 41), None),
                                    (padded_db[0], padded_db[1], token_ids(6, 42),
                                     padded_batch(token_ids(6, 42), [10, 16, 10, 12, 16, 10]))]:
        kw = {} if mask is None else {"attention_mask": mask}
        batched = am.apply_memo(model, store, threshold=-1e9, layers="all")
        per_row = am.apply_memo(model, store, threshold=-1e9, layers="all")
        for m in per_row.modules():
            if isinstance(m, am.MemoSelfAttention):
                m.batched = False
        a, b = out(batched, ids, **kw), out(per_row, ids, **kw)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        sa, sb = am.memo_stats(batched), am.memo_stats(per_row)
        assert [(s.hits, s.last_records) for s in sa.values()] == [(s.hits, s.last_records) for s in sb.values()]
        assert sa[0].hits >= 5


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
    memo = am.apply_memo(model, store, threshold=0.999, layers="all")  # calibration keeps exact repeats exact
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


def test_padded_inputs_memoize_only_records_of_the_same_real_length(padded_db):
    model, store = padded_db
    bucket = store.bucket(0, L)
    assert sorted(bucket.groups) == [10, 16] and sorted(set(bucket.lengths.tolist())) == [10, 16]
    assert bucket.apm(int(np.flatnonzero(bucket.lengths == 10)[0])).shape == (4, 10, 10)
    ids = token_ids(5, 77)
    lengths = [10, 16, 12, 10, 16]  # no record has 12 real tokens
    mask = padded_batch(ids, lengths)
    mask[4] = 0
    mask[4, 3:] = 1  # left padding: not a right-padding mask, ineligible
    memo = am.apply_memo(model, store, threshold=-1e9, layers="all")
    seen = {}
    wrapper = memo.encoder.layer[0].attention.self
    wrapper.register_forward_hook(lambda m, args, res: seen.update(x=args[0], y=res[0]))
    got, ref = out(memo, ids, attention_mask=mask), out(model, ids, attention_mask=mask)
    stats = am.memo_stats(memo)[0]
    assert (stats.hits, stats.misses, stats.ineligible) == (3, 1, 1)
    rows = {r: rec for r, rec, _ in stats.last_records}
    assert sorted(rows) == [0, 1, 3]
    for r, rec in rows.items():
        assert bucket.lengths[rec] == lengths[r]  # only records of the row's real length
        n = lengths[r]
        v = wrapper.inner.value(seen["x"][r, :n]).view(n, 4, 8).transpose(0, 1)
        expected = torch.matmul(torch.from_numpy(np.array(bucket.apm(rec))), v).transpose(0, 1).reshape(n, -1)
        torch.testing.assert_close(seen["y"][r, :n], expected, rtol=1e-6, atol=1e-6)
    # the row without a same-length record and the left-padded one took the normal path everywhere
    for r in (2, 4):
        assert all(r not in [x[0] for x in s.last_records] for s in am.memo_stats(memo).values())
        torch.testing.assert_close(got[r], ref[r], rtol=1e-5, atol=1e-5)


def test_other_input_length_is_an_error_unless_asked_to_run_it_unmemoized(built):
    model, store, _ = built
    short = token_ids(2, 3)[:, :12]
    memo = am.apply_memo(model, store, threshold=-1e9, layers="all")
    with pytest.raises(MemoDatabaseError, match=r"built for sequence lengths \[16\], this input has length 12"):
        out(memo, short)
    assert all(s.hits == 0 for s in am.memo_stats(memo).values())
    lenient = am.apply_memo(model, store, threshold=-1e9, layers="all", other_lengths="original")
    assert torch.equal(out(lenient, short), out(model, short))
    assert am.memo_stats(lenient)[0].ineligible == 2
    with pytest.raises(ValueError, match="other_lengths"):
        am.apply_memo(model, store, other_lengths="pad")


def test_database_round_trip(built, tmp_path):
    model, store, path = built
    copy_path = tmp_path / "copied"
    shutil.copytree(path, copy_path)
    reopened = MemoStore.open(copy_path, expect=am.model_fingerprint(model), verify="full")
    assert reopened.fingerprint == store.fingerprint and sorted(reopened.buckets) == sorted(store.buckets)
    for key, b in store.buckets.items():
        r = reopened.buckets[key]
        assert np.array_equal(np.asarray(r.apms), np.asarray(b.apms))
        assert np.array_equal(r.alpha_predicted, b.alpha_predicted)
        assert np.array_equal(r.calibration.knots_x, b.calibration.knots_x)
    ids = token_ids(8, 21)
    a = am.apply_memo(model, store, threshold=-1e9, layers="all")
    b = am.apply_memo(model, copy_path, threshold=-1e9, layers="all")
    assert torch.equal(out(a, ids), out(b, ids))
    assert [(s.hits, s.last_records) for s in am.memo_stats(a).values()] == \
           [(s.hits, s.last_records) for s in am.memo_stats(b).values()]
    manifest = json.loads((copy_path / "manifest.json").read_text())
    assert manifest["fingerprint"]["num_layers"] == 2 and manifest["fingerprint"]["hidden_size"] == 32
    entry = manifest["buckets"][0]
    assert entry["seq_len"] == L and entry["train"]["seconds"] > 0 and entry["groups"] == [dict(n=L, count=24)]
    assert entry["calibration"]["held_out"]["n"] > 0 and entry["alpha_source"].startswith("held-out edited copies")


@pytest.mark.parametrize("other, word", [
    (dict(seed=3), "attention weights differ"),
    (dict(layers=3), "num_layers: database has 2, model has 3"),
    (dict(hidden=48), "hidden_size: database has 32, model has 48"),
])
def test_mismatched_database_is_refused(built, other, word):
    _, _, path = built
    with pytest.raises(MemoDatabaseError, match=word):
        am.apply_memo(tiny_bert(**other), path)


def _corrupt(kind: str, path):
    if kind == "truncated apm":
        apm = next(path.glob("apm_*.bin"))
        apm.write_bytes(apm.read_bytes()[:-4])
    elif kind == "flipped apm byte":
        apm = next(path.glob("apm_*.bin"))
        data = bytearray(apm.read_bytes())
        data[0] ^= 0xFF  # the first block is always in the sampled hash
        apm.write_bytes(bytes(data))
    elif kind == "garbage index":
        idx = next(path.glob("index_*.faiss"))
        idx.write_bytes(b"\0" * idx.stat().st_size)
    elif kind == "flipped embedder byte":
        emb = next(path.glob("embed_*.safetensors"))
        data = bytearray(emb.read_bytes())
        data[-3] ^= 0x01
        emb.write_bytes(bytes(data))
    elif kind == "missing meta":
        next(path.glob("meta_*.safetensors")).unlink()
    elif kind == "manifest not json":
        (path / "manifest.json").write_text("{not json")
    elif kind == "old format":
        mf = json.loads((path / "manifest.json").read_text())
        mf["format"] = "lookupc-attention-memo/1"
        (path / "manifest.json").write_text(json.dumps(mf))


@pytest.mark.parametrize("kind, word", [
    ("truncated apm", "bytes, expected"),
    ("flipped apm byte", "sampled SHA-256"),
    ("garbage index", "SHA-256 differs"),
    ("flipped embedder byte", "SHA-256 differs"),
    ("missing meta", "is missing"),
    ("manifest not json", "cannot read"),
    ("old format", "rebuild it"),
])
def test_corrupt_store_is_refused_and_serves_nothing(built, tmp_path, kind, word):
    model, _, path = built
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    _corrupt(kind, bad)
    with pytest.raises(MemoDatabaseError, match=word) as err:
        am.apply_memo(model, bad, threshold=-1e9, layers="all")
    assert isinstance(err.value, LookupcError) and isinstance(err.value, ValueError)
    if kind == "garbage index":  # without hash checks, faiss's own error is still a MemoDatabaseError
        with pytest.raises(MemoDatabaseError, match="corrupt"):
            MemoStore.open(bad, verify="none")


def test_existing_output_is_not_overwritten_by_default(built):
    model, _, path = built
    with pytest.raises(ValueError, match="exists"):
        am.build_memo_db(model, calib(token_ids(4, 2)), path, embed=EMBED, progress=False)


def test_interrupted_build_leaves_nothing_that_loads(built, tmp_path, monkeypatch):
    model, _, _ = built
    calls = []
    real = memo_build.train_embedder

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption mid-build")
        return real(*args, **kwargs)

    monkeypatch.setattr(memo_build, "train_embedder", failing)
    target = tmp_path / "db"
    with pytest.raises(KeyboardInterrupt):
        am.build_memo_db(model, calib(token_ids(8, 4)), target, embed=EMBED, progress=False)
    assert len(calls) == 2  # it was interrupted after writing one layer
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp dir is left
    with pytest.raises(MemoDatabaseError, match="does not exist"):
        MemoStore.open(target)
    # a killed process leaves a temp dir without manifest: refused too
    writer = StoreWriter(tmp_path / "killed")
    writer.apm_array(0, L, np.array([L, L]), 4)[0][:] = 0.5
    with pytest.raises(MemoDatabaseError, match="not a finished"):
        MemoStore.open(writer.tmp)
    shutil.rmtree(writer.tmp)


def _profile(pred, true, timing, calibration=None):
    return LayerProfile(0, L, timing, calibration or SimilarityCalibration.identity(), np.asarray(pred),
                        np.asarray(true), "test queries")


def test_performance_model_eq3_uses_calibrated_alpha_of_representative_queries(built):
    timing = LayerTiming(t_attention=10.0, t_hit=4.0, t_overhead=1.0)
    pred = np.array([0.5, 0.92, 0.96, 0.99, -np.inf])  # the last query had no record of its length
    prof = _profile(pred, pred, timing)
    assert prof.hit_rate(0.95) == pytest.approx(0.4) and prof.benefit(0.95) == pytest.approx(6.0 * 0.4 - 1.0)
    assert prof.hit_rate(0.999) == 0.0 and not prof.worth_it(0.999)
    # an embedder that overstates similarity: the calibration maps predicted 0.96 to a true 0.9
    cal = SimilarityCalibration(np.array([0.5, 0.96, 1.0]), np.array([0.4, 0.9, 1.0]))
    biased = _profile(pred, np.array([0.4, 0.85, 0.9, 0.97, np.nan]), timing, cal)
    assert biased.hit_rate(0.95) == pytest.approx(0.2) and biased.true_hit_rate(0.95) == pytest.approx(0.2)
    assert biased.precision(0.95) == 1.0
    d = biased.decision(0.95)
    assert d["alpha"] == pytest.approx(0.2) and d["saving"] == pytest.approx(6.0 * 0.2 - 1.0) and d["enabled"]
    text = format_plan([dict(d, forced=False, auto=True)], 0.95)
    assert "T_attn" in text and "alpha" in text and "test queries (5 queries)" in text
    model, store, _ = built
    lines = []
    memo = am.apply_memo(model, store, threshold=-1e9, log=lines.append)  # alpha = 1 everywhere
    profiles = am.layer_profiles(store)
    expect = sorted(l for (l, _), p in profiles.items() if p.benefit(-1e9) > 0)
    assert sorted(am.memo_stats(memo)) == expect
    assert "memo plan at similarity threshold" in lines[0] and lines[0].count("\n") >= 3


def test_alpha_is_measured_on_the_given_representative_queries(tmp_path):
    model = tiny_bert()
    ids = token_ids(16, 51)
    repeats = am.build_memo_db(model, calib(ids), tmp_path / "rep", embed=EMBED, alpha_inputs=calib(ids[:8]),
                               progress=False)
    disjoint = am.build_memo_db(model, calib(ids), tmp_path / "dis", embed=EMBED,
                                alpha_inputs=calib(token_ids(8, 52)), progress=False)
    for store, alpha_at_999 in ((repeats, 1.0), (disjoint, 0.0)):
        for (_, _), prof in am.layer_profiles(store).items():
            assert prof.alpha_source == "alpha_inputs" and len(prof.alpha_predicted) == 8
            assert prof.hit_rate(0.999) == alpha_at_999
    plan = am.memo_plan(repeats, threshold=0.999)
    assert [r["alpha"] for r in plan] == [1.0, 1.0] and all(r["enabled"] == (r["saving"] > 0) for r in plan)


def test_timings_are_interleaved_medians():
    from lookupc.memo.perf import measure_timing

    calls = []
    fns = [lambda k=k: calls.append(k) for k in "aho"]
    t = measure_timing(*fns, n_seqs=4, repeats=3)
    assert calls[:3] == list("aho") and calls[3:] == list("aho" "hoa" "oah")  # warm-up, then rotating order
    assert t.t_attention >= 0 and t.t_hit >= 0 and t.t_overhead >= 0
    with pytest.raises(ValueError, match="n_seqs"):
        measure_timing(*fns, n_seqs=0)


def test_backoff_skips_while_hits_cannot_pay_and_probes_back():
    from lookupc.memo.attention import BACKOFF_MAX, BACKOFF_WINDOW, Backoff

    b = Backoff(break_even=0.2)
    calls = []
    for _ in range(200):  # traffic unlike the database: no hits
        if b.should_skip():
            calls.append("skip")
        else:
            calls.append("look")
            b.record(8, 0)
    looks = [i for i, c in enumerate(calls) if c == "look"]
    assert looks[:BACKOFF_WINDOW // 8] == list(range(BACKOFF_WINDOW // 8))  # evidence first
    gaps = [j - i - 1 for i, j in zip(looks, looks[1:])]
    assert gaps[1:7] == [1, 2, 4, 8, 16, 32] and max(gaps) == BACKOFF_MAX  # doubling, capped
    assert calls.count("look") < 15
    while b.should_skip():
        pass
    b.record(8, 8)  # a probe of near duplicates: lookups pay again
    assert b.wait == 1 and not b.should_skip()
    b.record(8, 8)
    assert not b.should_skip()


def test_adaptive_layers_stop_looking_up_on_disjoint_traffic(built):
    model, store, _ = built
    memo = am.apply_memo(model, store, threshold=0.999, layers="all")
    wrappers = [m for m in memo.modules() if isinstance(m, am.MemoSelfAttention)]
    for w in wrappers:  # "auto" layers get a break-even from the plan; set one for the test
        w.break_even = {L: 0.5}
        w.reset_backoff()
    ids = token_ids(8, 777)  # unlike the database: no hits at 0.999
    for _ in range(12):
        got = out(memo, ids)
    torch.testing.assert_close(got, out(model, ids))  # skipped calls run the original
    for s in am.memo_stats(memo).values():
        assert s.hits == 0 and s.skipped > s.misses and s.misses + s.skipped == 96
    am.reset_memo_stats(memo)  # a new kind of traffic: look up again at once
    repeats = token_ids(24, 1)[:8]
    out(memo, repeats)
    assert all(s.hits == 8 and s.skipped == 0 for s in am.memo_stats(memo).values())


def test_forced_layers_always_look_up(built):
    model, store, _ = built
    memo = am.apply_memo(model, store, threshold=0.999, layers="all")
    assert all(m.break_even is None for m in memo.modules() if isinstance(m, am.MemoSelfAttention))
