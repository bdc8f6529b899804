"""The ``lookupc`` command's surface: fast help, lazy imports, one-line errors, MODEL parsing."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lookupc.artifact.export import flatten_outputs
from lookupc.artifact.model_load import load_model
from lookupc.artifact.tensor_files import load_inputs, save_inputs
from lookupc.cli.main import cli
from lookupc.errors import LookupcInputError

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "lookupc.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_importing_the_cli_imports_neither_torch_nor_tvm():
    code = ("import sys, lookupc.cli.main; "
            "bad = [m for m in ('torch', 'tvm', 'transformers', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_is_fast_and_lists_the_commands():
    t0 = time.perf_counter()
    r = _run("--help")
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    for command in ("inspect", "convert", "compile", "run", "tune", "compare"):
        assert f"  {command}" in r.stdout
    assert elapsed < 5.0  # torch alone takes longer than this to import on a loaded box


def test_a_bad_path_fails_in_one_line_without_loading_torch():
    r = _run("inspect", "no/such/model")
    assert r.returncode != 0
    assert r.stderr.strip() == ("Error: no/such/model: no such file or directory; MODEL is a "
                                "Hugging Face model dir (config.json + safetensors), a "
                                "torch.export .pt2 file, or package.module:factory returning "
                                "(model, example_inputs)")


@pytest.mark.parametrize("args, needle", [
    (["compile", "examples.tiny_bert:factory", "-o", "x", "--target", "llvm -mcpu=znver9"],
     "unknown CPU -mcpu=znver9"),
    (["compile", "examples.tiny_bert:factory", "-o", "x", "--target", "llvm -foo=1"],
     "unknown target option -foo"),
    (["inspect", "no_such_pkg.mod:factory"], "cannot import module 'no_such_pkg.mod'"),
    (["run", "no/such/artifact"], "no such artifact directory"),
    (["convert", "examples.tiny_bert:factory", "-o", "x.onnx"], "must end in .pt2"),
    (["convert", "examples.tiny_bert:factory", "-o", "x.pt2", "--distill-option",
      "model_steps=3"], "only used with --init distill"),
    (["convert", "examples.tiny_bert:factory", "-o", "x.pt2", "--init", "distill",
      "--distill-option", "model_step=3"], "unknown distill option(s) ['model_step']"),
    (["convert", "examples.tiny_bert:factory", "-o", "x.pt2", "--init", "distill",
      "--distill-option", "model_steps"], "wants KEY=VALUE"),
    (["convert", "examples.tiny_bert:factory", "-o", "x.pt2", "--init", "distill",
      "--distill-option", "feed=dense"], "feed must be 'converted' or 'original'"),
    (["convert", "examples.tiny_bert:factory", "-o", "x.pt2", "--checkpoint", "c.ckpt"],
     "--checkpoint is only used with --init distill"),
    (["convert", "examples.tiny_bert:factory", "-o", "x.pt2", "--init", "distill",
      "--resume"], "--resume needs --checkpoint FILE"),
])
def test_errors_are_one_line_on_stderr(args, needle):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert needle in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_debug_shows_the_traceback():
    r = _run("--debug", "inspect", "no/such/model")
    assert r.returncode != 0 and "Traceback" in r.stderr and "LookupcInputError" in r.stderr


def test_pickle_is_refused_without_the_flag(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    path = tmp_path / "model.pt"
    torch.save((model, (torch.randn(2, 8),)), path)
    with pytest.raises(LookupcInputError, match="--trust-pickle"):
        load_model(str(path))
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code != 0 and "--trust-pickle" in result.output
    loaded = load_model(str(path), trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.example_inputs[0].shape == (2, 8)


def test_pickled_hf_model_gets_token_inputs_and_bare_modules_say_how(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32)
    path = tmp_path / "bert.pt"
    torch.save(transformers.BertModel(cfg).eval(), path)
    loaded = load_model(str(path), trust_pickle=True, batch=3, seq_len=7)
    assert loaded.input_names == ["input_ids", "attention_mask"]
    assert loaded.example_inputs[0].shape == (3, 7) and int(loaded.example_inputs[0].max()) < 50
    with pytest.raises(LookupcInputError, match="exceeds the model's max_position_embeddings"):
        load_model(str(path), trust_pickle=True, seq_len=64)
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(2, 2), bare)
    with pytest.raises(LookupcInputError, match=r"save \(model, example_inputs\)"):
        load_model(str(bare), trust_pickle=True)


def test_truncated_safetensors_input_names_the_file(tmp_path):
    good = tmp_path / "in.safetensors"
    save_inputs((torch.zeros(2, 3),), str(good))
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(LookupcInputError, match="cut.safetensors: not a readable safetensors"):
        load_inputs(str(bad))


def test_factory_inputs_follow_batch_and_seq_len():
    loaded = load_model("examples.tiny_bert:factory", batch=3, seq_len=7)
    (ids,) = loaded.example_inputs
    assert ids.shape == (3, 7) and ids.dtype == torch.int64
    out = loaded.module(ids)
    assert out.shape == (3, 7, 128)


def test_hf_dir_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LookupcInputError, match="no \\*.safetensors.*pickled weights"):
        load_model(str(tmp_path))


def test_flatten_outputs_names_nested_values():
    t = torch.zeros(1)
    tensors, names = flatten_outputs({"a": t, "b": (t, {"c": t}), "d": None})
    assert names == ["a", "b.0", "b.1.c"] and len(tensors) == 3


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npz"])
def test_input_files_round_trip(tmp_path, suffix):
    inputs = (torch.randint(0, 9, (2, 3)), torch.randn(2, 3))
    path = tmp_path / f"in{suffix}"
    if suffix == ".npz":
        import numpy as np

        np.savez(path, *[t.numpy() for t in inputs])
    else:
        save_inputs(inputs, str(path))
    back = load_inputs(str(path))
    assert len(back) == 2
    for a, b in zip(back, inputs):
        torch.testing.assert_close(a, b)


def test_input_file_errors(tmp_path):
    with pytest.raises(LookupcInputError, match="no such file"):
        load_inputs(str(tmp_path / "nope.pt"))
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(LookupcInputError, match="unknown input file type"):
        load_inputs(str(tmp_path / "x.txt"))



def test_convert_with_distill_options(tmp_path):
    out = tmp_path / "m.pt2"
    result = CliRunner().invoke(cli, [
        "convert", "examples.tiny_bert:factory", "-o", str(out), "--init", "distill",
        "--distill-option", "hash_steps=5", "--distill-option", "finetune_steps=0",
        "--distill-option", "model_steps=2", "--distill-option", "progress=False"])
    assert result.exit_code == 0, result.output
    assert "whole-model distillation (2 steps)" in result.stdout
    assert "its 1 training item(s) (under 10 items: none held out)" in result.stdout
    assert out.exists()


def test_checkpoint_and_resume_flags(tmp_path):
    ckpt = tmp_path / "d.ckpt"
    args = ["convert", "examples.tiny_bert:factory", "-o", str(tmp_path / "m.pt2"), "--init",
            "distill", "--distill-option", "hash_steps=2", "--distill-option", "finetune_steps=0",
            "--distill-option", "model_steps=2", "--distill-option", "progress=False",
            "--checkpoint", str(ckpt)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert ckpt.exists()
    r = CliRunner().invoke(cli, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert "whole-model distillation (2 steps)" in r.stdout
    r = CliRunner().invoke(cli, args[:-4] + ["--distill-option", "model_steps=3", "--checkpoint",
                                             str(ckpt), "--resume"])
    assert r.exit_code != 0 and "belongs to a different run (steps: checkpoint 2 vs now 3" in \
        r.stderr, r.output


def test_one_size_flag_keeps_the_other_per_ffn_defaults():
    r = CliRunner().invoke(cli, ["inspect", "examples.tiny_bert:factory", "--bits", "6"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    # tiny_bert's FFNs are 128-512-128: per-FFN default 32 tables, block 64; only bits change
    assert r.stdout.count("32x6 / 64") == 2, r.stdout
    assert "fidelity vs the original model" in r.stdout


def test_table_budget_and_min_fidelity_flags(tmp_path):
    r = CliRunner().invoke(cli, ["inspect", "examples.tiny_bert:factory",
                                 "--max-table-mib", "0.5"])
    assert r.exit_code != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "over the budget of 0 MiB" in err or "over the budget" in err, err
    r = CliRunner().invoke(cli, ["compile", "examples.tiny_bert:factory", "-o",
                                 str(tmp_path / "a"), "--min-fidelity", "0.9999"])
    assert r.exit_code != 0 and not (tmp_path / "a").exists()
    err = r.stderr.strip().splitlines()[-1]
    assert "fidelity check failed" in err and "--init distill" in err, err


def test_sixteen_bit_tables_on_minilm_sized_ffns_fail_before_allocating(monkeypatch):
    """--bits 16 on three 384-1536-384 FFNs asks for 3 x 9.7 GB of tables: refused up front
    (on a machine with CI's 24 GiB available; the default budget is half of that)."""
    import tracemalloc

    import lookupc
    from lookupc.passes import configs

    monkeypatch.setattr(configs, "_available_bytes", lambda: 24 << 30)

    class Three(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffns = torch.nn.ModuleList(torch.nn.Sequential(
                torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
                for _ in range(3))

        def forward(self, x):
            for f in self.ffns:
                x = x + f(x)
            return x

    from lookupc.config import SizeOverride

    tracemalloc.start()
    with pytest.raises(LookupcInputError, match="tables would take 27,648 MiB, over the budget of 12,288 MiB"):
        lookupc.convert(Three(), (torch.randn(2, 384),), config=SizeOverride(bits=16))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 30


def test_a_pickle_of_the_bundled_example_loads_from_any_directory(tmp_path):
    """torch.save of examples.tiny_bert's model names module 'examples.tiny_bert'; with
    --trust-pickle it loads outside the checkout too (found in lookupc.examples)."""
    pt = tmp_path / "tb.pt"
    code = ("import torch; from examples.tiny_bert import factory; m, x = factory(); "
            f"torch.save((m, x), {str(pt)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "lookupc.cli", "inspect", str(pt), "--trust-pickle"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 FFN(s) replaced" in r.stdout
