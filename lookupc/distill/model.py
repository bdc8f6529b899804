"""Whole-model distillation: train the converted model on the original model's outputs.

Layer-by-layer fits (:mod:`lookupc.distill.layer`) make each LookupFFN match its dense FFN,
but the errors that matter are the model's: a small error in one layer may be
amplified or ignored downstream. :func:`finetune_model` trains the converted model
(the student) against the original (the teacher) on the calibration items with

    loss = output + layers + cosine_weight * (1 - cosine)

``output``
    Over the output's floating tensors, ``||student - teacher||^2 / ||teacher||^2``
    (padding tokens dropped when the item carries an ``attention_mask``).
``layers``
    TinyBERT-style hidden-state matching: the same relative error on every hidden
    state, averaged, when the model's forward takes ``output_hidden_states`` (Hugging
    Face encoders); absent otherwise.
``cosine``
    The mean cosine between the student's and teacher's mean-pooled first output
    ([batch, tokens, d], pooled over the attention mask): the sentence embedding of
    an encoder, what its users compare.

``train="lookup"`` trains only the LookupFFN parameters (hash at ``hash_lr``, tables
and bias at ``lr``); ``train="all"`` also lets every other parameter of the student
move at ``rest_lr`` (the rest of the model then adapts to the LookupFFNs' errors; on
all-MiniLM-L6-v2 this is what lifts the embedding cosine most). Adam with a linear
warm-up (5% of the steps) and cosine decay, gradients clipped to norm 1. Every tenth
item is held out; the held-out loss is checked ``evals`` times and the best parameters
seen (the start included) are kept, so the result is never worse on them than where
it started (too large a learning rate diverges).

Long runs lose nothing: with ``checkpoint=PATH`` the whole training state (parameters,
optimizer, schedule, data order, best parameters) is written atomically every
``checkpoint_every`` steps and when the run ends; ``resume=True`` continues from it and
gives the same result as an uninterrupted run with the same seed. The first Ctrl-C
stops after the current step (checkpoint written, best parameters kept, the stats say
``interrupted``); a second one stops at once, still with the best parameters in place.

Several processes (``torchrun``, or an initialised ``torch.distributed``; see
:mod:`lookupc.distill.distributed`) train data parallel and reach the one-process result up
to float rounding: every step's item has its rows split across the ranks, the loss
terms are ratios of sums whose denominators are summed across ranks, the gradients
are summed, and held-out checks are split the same way (so every rank keeps the same
best parameters). Rank 0 alone shows progress and writes the checkpoint; on resume it
reads the file and sends its bytes to the others, and any number of processes can
resume any checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import LookupcInputError
from ..module import LookupFFN
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_bytes, save_checkpoint
from .distributed import setup as setup_distributed
from .distributed import shard_item
from .objective import _Objective

__all__ = ["finetune_model", "TRAIN_SCOPES"]

TRAIN_SCOPES = ("lookup", "all")


def _local(item: Any, comm: Any) -> Any:
    """This process's rows of ``item`` (the whole item in a single process)."""
    return item if comm is None else shard_item(item, comm.rank, comm.world)


def _evaluate(objective: _Objective, student, teacher, items: list, targets: list,
              comm: Any = None) -> dict:
    """Mean loss parts over the held-out items (teacher outputs cached in ``targets``;
    with ``comm`` each item's rows are split across the ranks, the parts summed)."""
    totals: dict[str, float] = {}
    with torch.no_grad():
        for i, item in enumerate(items):
            item = _local(item, comm)
            if len(targets) <= i:
                targets.append(objective.run(teacher, item, i))
            _, parts = objective(objective.run(student, item, i), targets[i], item, comm)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
    return {k: v / max(1, len(items)) for k, v in totals.items()}


class _Interrupts:
    """First SIGINT: ask the loop to stop after the current step; second: KeyboardInterrupt."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _digest(items: list) -> str:
    """A cheap fingerprint of the calibration data (sizes and a few values per item)."""
    h = hashlib.sha1()
    for item in items:
        values = item.values() if isinstance(item, Mapping) else (
            item if isinstance(item, (tuple, list)) else (item,))
        for v in values:
            if isinstance(v, Tensor):
                flat = v.detach().reshape(-1)
                h.update(f"{tuple(v.shape)}{v.dtype}".encode())
                h.update(flat[:64].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def finetune_model(student: nn.Module, teacher: nn.Module, items: list, *, steps: int,
                   lr: float = 3e-4, hash_lr: float = 3e-5, rest_lr: float = 2e-5,
                   train: str = "lookup", cosine_weight: float = 0.0, layers: bool = True,
                   evals: int = 5, seed: int = 0, progress: bool = True,
                   checkpoint: str | None = None, checkpoint_every: int = 50,
                   resume: bool = False, distributed: bool = True,
                   callback: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``student`` to reproduce ``teacher``'s outputs (see the module docstring).

    Parameters
    ----------
    student : nn.Module
        The converted model, changed in place.
    teacher : nn.Module
        The original model (not changed; run without gradients).
    items : list
        Calibration items (one optimiser step per item, cycling in a seeded order);
        every tenth is held out when there are at least 10.
    steps : int
        Optimiser steps.
    lr, hash_lr, rest_lr : float
        Peak learning rates of the tables and bias, of the hash (BH4 weight, hash bias)
        and (``train="all"``) of every other parameter.
    train : {"lookup", "all"}
        Which parameters move.
    cosine_weight : float
        Weight of ``1 - cosine`` of the pooled output in the loss (0: left out).
    layers : bool
        Add the hidden-state matching term when the model can return hidden states.
    evals : int
        Held-out checks during training (the best parameters are kept).
    checkpoint, checkpoint_every, resume :
        Checkpoint file, its period in steps, and whether to continue from it.
    distributed : bool
        Data parallel over the processes of ``torch.distributed`` when it is initialised
        or the process was started by torchrun (see :mod:`lookupc.distill.distributed`): each
        item's rows are split across the ranks, gradients summed, the result that of one
        process; rank 0 alone shows progress and writes the checkpoint (any number of
        processes resumes it). False: every process trains alone.
    callback : callable, optional
        ``callback(step, parts)`` after every step (``parts``: the loss terms).

    Returns
    -------
    dict
        ``before``/``after``: mean relative output error on the held-out items
        (``after`` of the kept parameters); ``loss_before``/``loss_after``: the held-out
        loss (never higher after); ``cosine_before``/``cosine_after`` when the output is
        poolable; ``best_step`` (0: none improved), ``steps`` (done), ``seconds``,
        ``held_out_items``, ``history`` (held-out checks), ``interrupted``,
        ``processes``.
    """
    if train not in TRAIN_SCOPES:
        raise LookupcInputError(f"train must be one of {TRAIN_SCOPES}, got {train!r}")
    from ..table_quant import require_float_tables

    require_float_tables(student, "whole-model distillation")
    lookups = [m for m in student.modules() if isinstance(m, LookupFFN)]
    if (not lookups and train != "all") or steps <= 0:
        return {}
    if resume and not checkpoint:
        raise LookupcInputError("resume=True needs checkpoint=<path>")
    held = items[::10] if len(items) >= 10 else items
    train_items = [it for i, it in enumerate(items) if i % 10] if len(items) >= 10 else items
    names = {id(p): n for n, p in student.named_parameters()}
    hash_p = [p for m in lookups for p in (m.bh4_weight, m.hash_bias)]
    table_p = [p for m in lookups for p in (m.tables, m.bias)]
    lookup_ids = {id(p) for p in hash_p + table_p}
    rest_p = [p for p in student.parameters() if id(p) not in lookup_ids and p.is_floating_point()]
    groups = [{"params": hash_p, "lr": hash_lr}, {"params": table_p, "lr": lr}]
    if train == "all" and rest_p:
        groups.append({"params": rest_p, "lr": rest_lr})
    params = [p for g in groups for p in g["params"]]
    trained = {id(p) for p in params}
    frozen = [(p, p.requires_grad) for p in student.parameters() if id(p) not in trained]
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    objective = _Objective(student, cosine_weight, layers)
    comm = setup_distributed(distributed)
    main = comm is None or comm.rank == 0
    fingerprint = {
        "params": [[names.get(id(p), "?"), list(p.shape)] for p in params],
        "steps": int(steps), "lr": float(lr), "hash_lr": float(hash_lr),
        "rest_lr": float(rest_lr), "train": train, "cosine_weight": float(cosine_weight),
        "layers": objective.layers, "evals": int(evals), "seed": int(seed),
        "items": len(items), "data": _digest(items)}
    if comm is not None and not comm.same_everywhere(json.dumps(fingerprint, sort_keys=True)):
        raise LookupcInputError(
            "the processes were given different models, options or calibration items: every "
            "rank needs the same ones (each rank takes its share of every item's rows)")
    if comm is not None:  # every rank starts from rank 0's model
        comm.broadcast_([p for p in student.parameters() if p.is_floating_point()])
    t0 = time.perf_counter()
    opt = torch.optim.Adam(groups)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps)
                                                                          / steps)))
    gen = torch.Generator().manual_seed(seed)
    targets: list = []
    state = {"step": 0, "order": [], "history": [], "seconds": 0.0}
    if resume:
        if comm is None:
            saved = load_checkpoint(checkpoint, fingerprint)
        else:  # rank 0 reads the file, every rank gets its bytes (no shared disk needed)
            raw = comm.broadcast_bytes(read_checkpoint_bytes(checkpoint) if main else None)
            if raw is None:
                raise CheckpointError(f"checkpoint {checkpoint}: no such file (on rank 0)")
            saved = load_checkpoint(checkpoint, fingerprint, raw=raw)
        with torch.no_grad():
            for p, v in zip(params, saved["params"]):
                p.copy_(v)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["generator"])
        best = (saved["best_value"], saved["best_step"], saved["best_params"])
        stats = dict(saved["stats"])
        state.update(step=saved["step"], order=list(saved["order"]), history=saved["history"],
                     seconds=saved["seconds"])
    else:
        start = _evaluate(objective, student, teacher, held, targets, comm)
        stats = {"held_out_items": len(held) if len(items) >= 10 else 0,
                 "eval_items": len(held), "before": math.sqrt(start["output"]),
                 "train": train, "layers": objective.layers, "loss_before": start["loss"]}
        if "cosine" in start:
            stats["cosine_before"] = start["cosine"]
        best = (start["loss"], 0, [p.detach().clone() for p in params])

    def save(step: int) -> None:
        if checkpoint and main:
            save_checkpoint(checkpoint, fingerprint, {
                "step": step, "params": [p.detach().clone() for p in params],
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state(), "order": list(state["order"]),
                "best_value": best[0], "best_step": best[1], "best_params": best[2],
                "stats": stats, "history": state["history"],
                "seconds": state["seconds"] + time.perf_counter() - t0})
        if checkpoint and comm is not None:
            comm.barrier()  # the file is complete before any rank goes on

    from ..progress import progress as progress_bar

    check_every = max(1, math.ceil(steps / max(1, evals)))
    every = max(1, int(checkpoint_every))
    step = state["step"]
    interrupted = False
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with _Interrupts() as stop, progress_bar(
                total=steps, desc="distill model", unit="step", disable=not (progress and main),
                initial=step) as bar:
            while step < steps:
                if not state["order"]:
                    state["order"] = torch.randperm(len(train_items), generator=gen).tolist()
                k = state["order"].pop()
                item = _local(train_items[k], comm)
                with torch.no_grad():
                    target = objective.run(teacher, item, k)
                loss, parts = objective(objective.run(student, item, k), target, item, comm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if comm is not None:  # gradient of the whole item; stop when any rank asks
                    stop_seen = comm.sum_grads_(params, [float(stop.requested)])[0] > 0
                nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                step += 1
                if step % check_every == 0 or step == steps:
                    res = _evaluate(objective, student, teacher, held, targets, comm)
                    state["history"].append({"step": step, **res})
                    if res["loss"] < best[0]:
                        best = (res["loss"], step, [p.detach().clone() for p in params])
                held_cos = state["history"][-1].get("cosine") if state["history"] else None
                bar.set_postfix_str(f"loss {parts['loss']:.4f}" + (
                    f", held-out cosine {held_cos:.4f}" if held_cos is not None else ""))
                bar.update(1)
                if callback is not None:
                    callback(step, parts)
                # one process: a request up to now; several: one all ranks saw (same step)
                stop_now = stop.requested if comm is None else stop_seen
                if step % every == 0 or step == steps or stop_now:
                    save(step)
                if stop_now:
                    interrupted = step < steps
                    break
        with torch.no_grad():
            for p, b in zip(params, best[2]):
                p.copy_(b)
        if comm is not None:  # every rank ends with rank 0's parameters, bit for bit
            comm.broadcast_(params)
    except KeyboardInterrupt:
        with torch.no_grad(), contextlib.suppress(Exception):
            for p, b in zip(params, best[2]):
                p.copy_(b)
        raise
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
        student.train(modes[0])
        teacher.train(modes[1])
    final = _evaluate(objective, student, teacher, held, targets, comm)
    stats.update(after=math.sqrt(final["output"]), best_step=best[1], steps=step,
                 processes=1 if comm is None else comm.world,
                 seconds=state["seconds"] + time.perf_counter() - t0,
                 history=state["history"], interrupted=interrupted, loss_after=final["loss"])
    if "cosine" in final:
        stats["cosine_after"] = final["cosine"]
    return stats
