"""Whole-model distillation: objective, trained scope, checkpoints, resume and Ctrl-C."""

import os
import signal

import pytest
import torch
from two_block_net import Net

import lookupc
from lookupc.distill.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lookupc.distill.model import finetune_model
from lookupc.errors import LookupcInputError

CFG = lookupc.LookupConfig(tables=16, bits=4, block_size=8)




def _setup(n=12):
    torch.manual_seed(0)
    teacher = Net().eval()
    g = torch.Generator().manual_seed(1)
    items = [(torch.randn(2, 16, 32, generator=g),) for _ in range(n)]
    res = lookupc.convert(teacher, items[0], config=CFG)
    return teacher, res.module, items


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


KW = dict(steps=12, lr=1e-2, hash_lr=1e-3, rest_lr=1e-3, evals=3, progress=False)


def test_training_lowers_the_error_and_keeps_the_best():
    teacher, student, items = _setup()
    stats = finetune_model(student, teacher, items, train="lookup", **KW)
    assert stats["steps"] == 12 and stats["held_out_items"] == 2 and not stats["interrupted"]
    assert stats["loss_after"] <= stats["loss_before"], stats
    assert stats["after"] < stats["before"], stats
    assert stats["cosine_after"] >= stats["cosine_before"] - 1e-6, stats
    assert [h["step"] for h in stats["history"]] == [4, 8, 12]


@pytest.mark.parametrize("scope", ["lookup", "all"])
def test_the_trained_scope(scope):
    teacher, student, items = _setup()
    before = _params(student)
    finetune_model(student, teacher, items, train=scope, **{**KW, "evals": 1})
    after = _params(student)
    norm_moved = not torch.equal(before["blocks.0.norm.weight"], after["blocks.0.norm.weight"])
    assert norm_moved == (scope == "all")
    assert any(not torch.equal(before[k], after[k]) for k in before if "tables" in k)
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path):
    teacher, student, items = _setup()
    start = _params(student)
    full = finetune_model(student, teacher, items, **KW)
    expected = _params(student)

    student.load_state_dict(start)
    ckpt = str(tmp_path / "run.ckpt")

    def kill_at_7(step, parts):
        if step == 7:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        finetune_model(student, teacher, items, checkpoint=ckpt, checkpoint_every=3,
                       callback=kill_at_7, **KW)
    assert _checkpoint_step(ckpt) == 6
    student.load_state_dict(start)  # a fresh process: nothing but the checkpoint survives
    resumed = finetune_model(student, teacher, items, checkpoint=ckpt, checkpoint_every=3,
                             resume=True, **KW)
    got = _params(student)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["best_step"] == full["best_step"]
    assert resumed["after"] == pytest.approx(full["after"], rel=1e-5)


def _checkpoint_step(path):
    return torch.load(path, weights_only=True)["state"]["step"]


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    teacher, student, items = _setup()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        finetune_model(student, teacher, items, checkpoint=str(bad), resume=True, **KW)
    with pytest.raises(CheckpointError, match="no such file"):
        finetune_model(student, teacher, items, checkpoint=str(tmp_path / "none"),
                       resume=True, **KW)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    teacher, student, items = _setup()
    ckpt = str(tmp_path / "run.ckpt")
    finetune_model(student, teacher, items, checkpoint=ckpt, **{**KW, "steps": 3})
    with pytest.raises(CheckpointError, match=r"different run \(lr: checkpoint 0.01 vs now 0.02"):
        finetune_model(student, teacher, items, checkpoint=ckpt, resume=True,
                       **{**KW, "steps": 3, "lr": 2e-2})
    with pytest.raises(LookupcInputError, match="needs checkpoint"):
        finetune_model(student, teacher, items, resume=True, **KW)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.ckpt")
    save_checkpoint(path, {"a": 1}, {"x": torch.ones(3)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"a": 1}, {"x": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path, {"a": 1})["x"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["c.ckpt"]  # no temporary file left behind


def test_first_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path):
    teacher, student, items = _setup()
    ckpt = str(tmp_path / "run.ckpt")

    def ctrl_c_at_5(step, parts):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    stats = finetune_model(student, teacher, items, checkpoint=ckpt, checkpoint_every=100,
                           callback=ctrl_c_at_5, **KW)
    assert stats["interrupted"] and stats["steps"] == 5
    assert _checkpoint_step(ckpt) == 5
    assert stats["loss_after"] <= stats["loss_before"]
    resumed = finetune_model(student, teacher, items, checkpoint=ckpt, resume=True, **KW)
    assert resumed["steps"] == 12 and not resumed["interrupted"]
