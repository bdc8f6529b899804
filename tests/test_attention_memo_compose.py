"""Attention memoization composed with the LookupFFN pass, and the ``lookupc memo`` CLI."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("faiss")

import lookupc  # noqa: E402
from lookupc.module import LookupFFN  # noqa: E402
from lookupc.passes import attention_memo as am  # noqa: E402
from tests.test_attention_memo import EMBED, calib, out, tiny_bert, token_ids  # noqa: E402


@pytest.fixture(scope="module")
def model_and_db(tmp_path_factory):
    model = tiny_bert()
    store = am.build_memo_db(model, calib(token_ids(24, 1)), tmp_path_factory.mktemp("c") / "db", embed=EMBED)
    return model, store


def _kinds(model):
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize("order", ["lookup_then_memo", "memo_then_lookup"])
def test_memo_composes_with_lookupffn(model_and_db, order):
    model, store = model_and_db
    example = {"input_ids": token_ids(2, 3)}
    ids = token_ids(6, 8)
    converted = lookupc.convert(model, example).module
    if order == "lookup_then_memo":
        both = am.apply_memo(converted, store, threshold=-1e9, layers="all")
        strict = am.apply_memo(converted, store, threshold=1.0, layers="all")
    else:  # the FFN pass exports the model: memo wrappers trace as the original attention
        both = lookupc.convert(am.apply_memo(model, store, threshold=-1e9, layers="all"), example).module
        strict = lookupc.convert(am.apply_memo(model, store, threshold=1.0, layers="all"), example).module
        # convert builds fresh LookupFFNs (random init): give them the same weights as `converted`
        for dst in (both, strict):
            dst.load_state_dict(converted.state_dict(), strict=False)
    assert {"LookupFFN", "MemoSelfAttention"} <= _kinds(both)
    assert sum(isinstance(m, LookupFFN) for m in both.modules()) == 2
    # strictest threshold: exactly the LookupFFN model
    assert torch.equal(out(strict, ids), out(converted, ids))
    # forced hits: layer 0 of the composed model is the stored APM times its live V
    am.reset_memo_stats(both)
    seen = {}
    wrapper = both.encoder.layer[0].attention.self
    h = wrapper.register_forward_hook(lambda m, a, r: seen.update(x=a[0], y=r[0]))
    got = out(both, ids)
    h.remove()
    assert am.memo_stats(both)[0].hits == 6 and am.memo_stats(both)[1].hits == 6
    for row, rec, _ in wrapper.stats.last_records:
        apm = torch.from_numpy(store.bucket(0, 16).apm(rec))
        assert torch.equal(seen["y"][row], am.apm_times_value(wrapper.inner, seen["x"][row], apm))
    assert not torch.allclose(got, out(converted, ids), atol=1e-4)  # memo changed something


def _write_vocab_model(path, seed=0):
    from transformers import BertTokenizer

    path.mkdir()
    tiny_bert(seed=seed).save_pretrained(path, safe_serialization=True)
    words = [f"w{i}" for i in range(95)]
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return words


def test_cli_build_info_run_and_refusal(tmp_path):
    from click.testing import CliRunner

    from lookupc.cli.main import cli

    words = _write_vocab_model(tmp_path / "bert")
    _write_vocab_model(tmp_path / "other", seed=5)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, 95, (9,), generator=g).tolist()) + " ."
             for _ in range(60)]
    (tmp_path / "calib.txt").write_text("\n".join(lines[:40]))
    (tmp_path / "eval.txt").write_text("\n".join(lines[40:]))
    runner = CliRunner()
    db = str(tmp_path / "db")
    r = runner.invoke(cli, ["memo", "build", str(tmp_path / "bert"), "--calibration", str(tmp_path / "calib.txt"),
                            "-o", db, "--seq-len", "16", "--max-sequences", "24", "--steps", "60",
                            "--token-dim", "2", "--alpha-text", str(tmp_path / "eval.txt")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and (tmp_path / "db" / "manifest.json").is_file()
    assert "held-out loss" in r.output and "calibration held_out" in r.output
    r = runner.invoke(cli, ["memo", "info", db])
    assert r.exit_code == 0 and "layers=2 hidden=32 heads=4" in r.output, r.output
    assert r.output.count("memo plan at similarity threshold") == 3 and "alpha_inputs" in r.output
    r = runner.invoke(cli, ["memo", "run", str(tmp_path / "bert"), "--db", db, "--text", str(tmp_path / "eval.txt"),
                            "--seq-len", "16", "--layers", "all", "--threshold", "1.0"])
    assert r.exit_code == 0, r.output
    assert "hits 0" in r.output and "cosine vs original mean 1.0000 min 1.0000" in r.output
    assert "memo plan at similarity threshold 1" in r.output and "memoize (forced)" in r.output
    r = runner.invoke(cli, ["memo", "build", str(tmp_path / "bert"), "--calibration", str(tmp_path / "calib.txt"),
                            "-o", str(tmp_path / "db2"), "--edit-rates", "x"])
    assert r.exit_code != 0 and "--edit-rates" in r.output
    r = runner.invoke(cli, ["memo", "run", str(tmp_path / "other"), "--db", db, "--text",
                            str(tmp_path / "eval.txt"), "--seq-len", "16"])
    assert r.exit_code != 0 and "does not match the model" in r.output
