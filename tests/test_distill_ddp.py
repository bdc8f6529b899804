"""Whole-model distillation on 2 gloo processes (CPU) equals the 1-process run.

The ranks are forked from the test process (nothing to re-import, ~1 s each) and find
each other through torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so ``finetune_model`` initialises the process group itself, as it does
under ``torchrun``.

Tolerance: each step's gradient is the 1-process gradient summed in another order
(two row halves, then across ranks), so parameters agree to float32 rounding carried
through 12 Adam steps: ``rtol=1e-4, atol=1e-5`` (observed differences are ~1e-6).
The two ranks end bit-identical (rank 0's parameters are broadcast at the end).
"""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from two_block_net import Net

import lookupc
from lookupc.distill.distributed import shard_item
from lookupc.distill.model import finetune_model

CFG = lookupc.LookupConfig(tables=16, bits=4, block_size=8)
KW = dict(steps=12, lr=1e-2, hash_lr=1e-3, rest_lr=1e-3, evals=3, progress=False,
          train="all", cosine_weight=0.5)
TOL = dict(rtol=1e-4, atol=1e-5)


class MaskedNet(Net):
    """Net taking keyword inputs with an attention mask (padding dropped from the loss)."""

    def forward(self, x, attention_mask=None):
        return super().forward(x)


def _setup():
    """Teacher, converted student and 12 items with 4, 3 and 1 rows: split 2+2, 1+2, and
    (fewer rows than ranks) run whole by both ranks."""
    torch.manual_seed(0)
    teacher = MaskedNet().eval()
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(12):
        rows = (4, 3, 1)[i % 3]
        mask = torch.ones(rows, 16, dtype=torch.long)
        mask[0, 10:] = 0  # padding in the first row
        items.append({"x": torch.randn(rows, 16, 32, generator=g), "attention_mask": mask})
    res = lookupc.convert(teacher, {"x": items[0]["x"]}, config=CFG)
    return teacher, res.module, items


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _worker(rank, world, port, out, job):
    """One forked rank: torchrun's environment, then ``job(rank)`` -> (state, report)."""
    code = 1
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        state, report = job(rank)
        save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        code = 0
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)


def _fork(tmp_path, name, job, world=2, errors=False):
    """Fork ``world`` ranks running ``job``; their (state, report), or (``errors=True``)
    the tracebacks of the ranks that failed."""
    out = tmp_path / name
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out), job))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    failed = [(out / f"rank{r}.error").read_text() for r in range(world)
              if (out / f"rank{r}.error").exists()]
    for p in procs:
        if p.is_alive():
            p.kill()
    if errors:
        return failed
    assert not failed, failed[0]
    assert [p.exitcode for p in procs] == [0] * world
    return [(load_file(str(out / f"rank{r}.safetensors")),
             json.loads((out / f"rank{r}.json").read_text())) for r in range(world)]


def _finetune_job(teacher, student, items, kwargs, kill_at=-1, rank_items=None):
    """finetune_model on one rank: the final state, stats, per-step losses, the rows each
    forward saw and how many checkpoint writes this rank made."""

    def job(rank):
        import lookupc.distill.model as dm

        saves, rows, losses = [], [], []
        real_save = dm.save_checkpoint

        def counting_save(*a, **k):
            saves.append(1)
            return real_save(*a, **k)

        dm.save_checkpoint = counting_save
        student.register_forward_pre_hook(lambda m, a, k: rows.append(k["x"].shape[0]),
                                          with_kwargs=True)

        def callback(step, parts):
            losses.append(parts["loss"])
            if step == kill_at:
                raise RuntimeError("killed")

        data = rank_items[rank] if rank_items else items
        try:
            stats = dm.finetune_model(student, teacher, data, callback=callback, **kwargs)
        except RuntimeError as exc:
            if "killed" not in str(exc):
                raise
            stats = {"killed": True}
        return _state(student), {"stats": stats, "saves": len(saves), "rows": rows,
                                 "losses": losses}

    return job


def _run_ranks(tmp_path, name, teacher, student, items, kwargs, kill_at=-1):
    return _fork(tmp_path, name, _finetune_job(teacher, student, items, kwargs, kill_at))


def _reference(student, teacher, items, start, **kwargs):
    student.load_state_dict(start)
    losses = []
    stats = finetune_model(student, teacher, items, distributed=False,
                           callback=lambda step, parts: losses.append(parts["loss"]), **kwargs)
    return _state(student), stats, losses


def _assert_states_close(got, expected):
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **TOL, msg=k)


def test_two_gloo_processes_equal_one_process(tmp_path):
    teacher, student, items = _setup()
    start = _state(student)
    (s0, r0), (s1, r1) = _run_ranks(tmp_path, "ddp", teacher, student, items, KW)
    ref_state, ref, ref_losses = _reference(student, teacher, items, start, **KW)

    for k in s0:  # the ranks end bit-identical
        assert torch.equal(s0[k], s1[k]), k
    _assert_states_close(s0, ref_state)
    assert any(not torch.equal(ref_state[k], start[k]) for k in start if "tables" in k)
    torch.testing.assert_close(r0["losses"], ref_losses, **TOL)
    assert r0["losses"] == r1["losses"]  # per-step loss of the whole item, on both ranks
    stats = r0["stats"]
    assert stats["processes"] == 2 and ref["processes"] == 1
    assert stats["best_step"] == ref["best_step"] and stats["steps"] == 12
    for key in ("before", "after", "loss_before", "loss_after", "cosine_before",
                "cosine_after"):
        assert stats[key] == pytest.approx(ref[key], rel=1e-4), key
    assert [h["step"] for h in stats["history"]] == [h["step"] for h in ref["history"]]
    for h, h_ref in zip(stats["history"], ref["history"]):
        assert h["loss"] == pytest.approx(h_ref["loss"], rel=1e-4)
    # rows really were split: items of 4 rows as 2 + 2, of 3 as 1 + 2, of 1 run whole
    assert 4 not in r0["rows"] and 4 not in r1["rows"]
    assert {1, 2} <= set(r0["rows"]) and set(r1["rows"]) == {1, 2}


def test_rank_0_alone_writes_the_checkpoint_and_two_processes_resume(tmp_path):
    teacher, student, items = _setup()
    start = _state(student)
    ckpt = str(tmp_path / "run.ckpt")
    kw = dict(KW, checkpoint=ckpt, checkpoint_every=3)
    (_, r0), (_, r1) = _run_ranks(tmp_path, "killed", teacher, student, items, kw, kill_at=7)
    assert r0["stats"] == r1["stats"] == {"killed": True}
    assert r0["saves"] == 2 and r1["saves"] == 0  # steps 3 and 6, by rank 0 only
    assert torch.load(ckpt, weights_only=True)["state"]["step"] == 6
    shutil.copy(ckpt, tmp_path / "step6.ckpt")

    (s0, r0), (s1, _) = _run_ranks(tmp_path, "resumed", teacher, student, items,
                                   dict(kw, resume=True))
    ref_state, ref, _ = _reference(student, teacher, items, start, **KW)
    assert r0["stats"]["steps"] == 12 and r0["stats"]["best_step"] == ref["best_step"]
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    _assert_states_close(s0, ref_state)

    # the checkpoint of 2 processes resumes in 1 (the run does not depend on their number)
    one_state, one, _ = _reference(student, teacher, items, start,
                                   **dict(kw, checkpoint=str(tmp_path / "step6.ckpt"),
                                          resume=True))
    assert one["steps"] == 12 and one["best_step"] == ref["best_step"]
    _assert_states_close(one_state, ref_state)


@pytest.mark.slow
def test_the_cli_under_torchrun_matches_one_process(tmp_path):
    """The README's command: `python -m torch.distributed.run --nproc-per-node 2 -m
    lookupc.cli.main convert ...` gives the trained state of the 1-process command (~60 s)."""
    root = Path(__file__).resolve().parents[1]
    args = ["-m", "lookupc.cli", "convert", "examples.tiny_bert:factory", "--init", "distill",
            "--distill-option", "hash_steps=5", "--distill-option", "finetune_steps=0",
            "--distill-option", "model_steps=6"]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    runs = {}
    for name, launch in [("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                              "--nproc-per-node", "2"])]:
        out = tmp_path / name
        out.mkdir()
        r = subprocess.run([sys.executable, *launch, *args, "-o", str(out / "m.pt2"),
                            "--checkpoint", str(out / "d.ckpt")], cwd=out, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (r.stdout, torch.load(out / "d.ckpt", weights_only=True)["state"])
        assert sorted(os.listdir(out)) == ["d.ckpt", "m.pt2"]
    (one_out, one), (two_out, two) = runs["one"], runs["two"]
    assert two_out.count("lookupc conversion:") == 1  # rank 1 prints nothing
    assert "data parallel on 2 processes" in two_out
    line = [ln for ln in one_out.splitlines() if ln.startswith("whole-model")][0]
    assert line.split(": ", 1)[1] in two_out  # same errors and cosines
    for key in ("params", "best_params"):
        for a, b in zip(two[key], one[key]):
            torch.testing.assert_close(a, b, **TOL)


def test_ranks_given_different_data_are_refused(tmp_path):
    teacher, student, items = _setup()
    errors = _fork(tmp_path, "mixed", _finetune_job(teacher, student, items, KW,
                                                    rank_items=[items, items[::-1]]),
                   errors=True)
    assert len(errors) == 2 and all("every rank needs the same ones" in e for e in errors), errors


def test_distill_conversion_under_two_processes_equals_one_process(tmp_path):
    """lookupc.convert(init="distill") with whole-model steps: every rank runs the layer
    fits and goes on with rank 0's; the result is the 1-process conversion's."""
    _, _, items = _setup()
    torch.manual_seed(0)
    teacher = MaskedNet().eval()
    options = dict(hash_steps=5, finetune_steps=3, model_steps=6, model_lr=1e-2,
                   progress=False)

    def convert(rank=None):
        torch.manual_seed(0)
        res = lookupc.convert(teacher, {"x": items[0]["x"]}, config=CFG, init="distill",
                              calibration=items,
                              distill_options=dict(options, distributed=rank is not None))
        err = res.report.model_error
        return _state(res.module), {"after": err["after"], "processes": err["processes"],
                                    "rel": [m.rel_error for m in res.report.matched]}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (s0, r0), (s1, _) = _fork(tmp_path, "convert", convert)
        one_state, one = convert()
    assert r0["processes"] == 2 and one["processes"] == 1
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    _assert_states_close(s0, one_state)
    assert r0["after"] == pytest.approx(one["after"], rel=1e-4)
    assert r0["rel"] == pytest.approx(one["rel"], rel=1e-5)


def test_shard_item_splits_the_batch_dimension_only():
    x, m, pos = torch.zeros(5, 3, 2), torch.ones(5, 3), torch.arange(3)
    assert shard_item((x, 7), 0, 2)[0].shape[0] == 2 and shard_item((x, 7), 1, 2)[1] == 7
    got = shard_item({"x": x, "attention_mask": m, "flag": True}, 1, 2)
    assert got["x"].shape[0] == got["attention_mask"].shape[0] == 3 and got["flag"] is True
    assert shard_item(x, 2, 3).shape[0] == 2
    assert shard_item((x[:1],), 1, 2)[0].shape[0] == 1  # fewer rows than ranks: whole
    assert shard_item((x, pos), 0, 2)[0].shape[0] == 5  # first dims disagree: whole


def test_cli_ranks_other_than_0_print_and_write_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lookupc.cli.main import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "m.pt2"
    r = CliRunner().invoke(cli, ["convert", "examples.tiny_bert:factory", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output == "" and not out.exists()
