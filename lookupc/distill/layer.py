"""Distillation: fit a LookupFFN to the dense FFN it replaces, layer by layer.

For one layer, with inputs ``x`` [N, d_in] and the dense FFN's outputs ``y`` [N, d_out],
:func:`fit_lookup_ffn` runs three phases:

1. **Hash** (:func:`~lookupc.distill.hash_fit.fit_hash`): choose the BH4 weights and
   hash bias so that the soft codes ``z`` follow the dense FFN's own hidden
   pre-activations ``u_j = W1_j x + b1_j`` of its ``h * tau`` most important hidden
   units (importance: ``||W2[:, j]|| * std(GELU(u_j))``, the share of the output that
   unit carries). A few hundred Adam steps on ``||z - target||^2``: each code bit then
   flips where one of the dense FFN's important GELUs bends, and the score (``~ |z|``
   for large ``|z|``) grows like that unit's activation. With 1-bit codes this makes
   the LookupFFN a pruned copy of the dense FFN whose first layer is a BH4 matrix.
2. **Tables** (:func:`~lookupc.distill.table_solve.solve_tables`): with the codes fixed
   the output ``y ~ sum_k s_k T[k, c_k] + b`` is linear in the tables, a sparse design
   with h non-zeros per token. Solved as ridge regression by Jacobi-preconditioned
   conjugate gradients on the normal equations (sparse matrix products, nothing dense
   of size rows x rows).
3. **Fine-tune** (:func:`finetune`): Adam on the MSE of all parameters, minibatches.

:func:`distill_conversion` is what ``lookupc.convert(..., init="distill")`` calls: it
captures every replacement's input activations on the calibration set (streaming,
capped at ``max_tokens``), fits it, and writes the held-out relative error
``||y_lookup - y_dense|| / ||y_dense||`` into ``result.report.matched[i].rel_error``.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LookupcInputError
from ..module import LookupFFN
from .calibration import calibration_items, capture_inputs, run_item
from .calibration_text import text_items
from .hash_fit import first_linear, fit_hash, hash_target, hidden_target, last_linear, minibatches
from .options import DistillOptions
from .table_solve import solve_tables

__all__ = ["fit_lookup_ffn", "finetune", "relative_error", "distill_conversion"]


# ---------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------

def relative_error(lookup: LookupFFN, x: Tensor, y: Tensor, batch: int = 8192) -> float:
    """``||lookup(x) - y|| / ||y||`` over all rows (computed in batches, no grad)."""
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            yb = y[i:i + batch]
            num += float((lookup(x[i:i + batch]) - yb).pow(2).sum())
            den += float(yb.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def finetune(lookup: LookupFFN, x: Tensor, y: Tensor, *, steps: int, lr: float,
             batch: int = 2048, seed: int = 0, bar=None, hash_lr: float | None = None,
             dense: nn.Module | None = None, noise: float = 0.0) -> float:
    """Adam (cosine-decayed lr) on the MSE of all parameters; returns the last batch's
    relative error. ``hash_lr`` (default ``lr``) is the hash parameters' learning rate.

    ``noise`` > 0 (with ``dense``): each minibatch's inputs get Gaussian noise of that many
    standard deviations of x per feature, and the targets are the dense FFN's outputs on
    the noisy inputs (augmentation: more distinct inputs than the calibration tokens)."""
    noise_gen = torch.Generator(device=x.device).manual_seed(seed + 2)
    x_std = x.std(0, keepdim=True) if noise > 0 and dense is not None else None
    hash_params = [lookup.bh4_weight, lookup.hash_bias]
    ids = {id(p) for p in hash_params}
    rest = [p for p in lookup.parameters() if id(p) not in ids]
    opt = torch.optim.Adam([{"params": hash_params, "lr": lr if hash_lr is None else hash_lr},
                            {"params": rest, "lr": lr}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    last = float("nan")
    for step, idx in enumerate(minibatches(x.shape[0], batch, steps, seed + 1)):
        xb, yb = x[idx], y[idx]
        if x_std is not None:
            xb = xb + noise * x_std * torch.randn(xb.shape, generator=noise_gen, device=xb.device,
                                                  dtype=xb.dtype)
            with torch.no_grad():
                yb = dense(xb).to(yb.dtype)
        loss = (lookup(xb) - yb).pow(2).sum() / yb.pow(2).sum().clamp_min(1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = math.sqrt(float(loss.detach()))
        if bar is not None and step % 10 == 0:
            bar.set_postfix_str(f"finetune {step}/{steps} rel {last:.3f}")
    for p in lookup.parameters():
        p.grad = None
    return last


def fit_lookup_ffn(lookup: LookupFFN, x: Tensor, y: Tensor, *, dense: nn.Module | None = None,
                   x_val: Tensor | None = None, y_val: Tensor | None = None,
                   options: DistillOptions | None = None, bar=None) -> dict:
    """Fit ``lookup`` to map x [N, d_in] to y [N, d_out] (hash, tables, fine-tune).

    Parameters
    ----------
    lookup : LookupFFN
        Fitted in place.
    x, y : Tensor
        Training inputs and dense outputs.
    dense : nn.Module, optional
        The dense FFN; its first Linear gives the hash target (see ``hash_source``).
    x_val, y_val : Tensor, optional
        Held-out tokens; the returned ``rel_error`` is measured on them (else on x, y).
    options : DistillOptions, optional
        Steps, learning rates, ridge (defaults: ``DistillOptions()``).
    bar : tqdm, optional
        A progress bar whose postfix shows the phase and loss.

    Returns
    -------
    dict
        ``hash_rel`` (fit of z to its target), ``table_rel`` (training residual after
        the solve), ``train_rel`` (after fine-tuning), ``rel_error`` (held out),
        ``seconds``; with held-out tokens also ``finetune_kept`` (1.0 when fine-tuning
        lowered the held-out error and was kept, 0.0 when the solved parameters were put
        back).

    Examples
    --------
    >>> from lookupc import LookupConfig
    >>> dense = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    >>> x = torch.randn(4096, 32)
    >>> with torch.no_grad(): y = dense(x)
    >>> lk = LookupFFN(32, 32, LookupConfig(tables=16, bits=4, block_size=8))
    >>> stats = fit_lookup_ffn(lk, x, y, dense=dense,
    ...                        options=DistillOptions(progress=False, finetune_steps=20))
    >>> stats["rel_error"] < 0.6
    True
    """
    opts = options or DistillOptions()
    from ..table_quant import require_float_tables

    require_float_tables(lookup, "fit_lookup_ffn")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise LookupcInputError(f"fit_lookup_ffn needs x [N, d_in] and y [N, d_out] with the same "
                                f"N, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != lookup.d_in or y.shape[1] != lookup.d_out:
        raise LookupcInputError(
            f"fit_lookup_ffn: x has {x.shape[1]} features and y {y.shape[1]}, but the LookupFFN "
            f"maps {lookup.d_in} -> {lookup.d_out}")
    dev, dt = lookup.tables.device, lookup.tables.dtype
    x, y = x.to(dev, dt), y.to(dev, dt)
    t0 = time.perf_counter()
    stats: dict[str, float] = {"tokens": float(x.shape[0])}
    if opts.hash_steps:
        fc1 = first_linear(dense) if opts.hash_source != "input" else None
        if fc1 is not None and fc1.in_features != x.shape[1]:
            fc1 = None
        if fc1 is not None:
            fc1 = _float_copy(fc1, dev, dt)
        if fc1 is not None and opts.hash_source == "hidden":
            fc2 = last_linear(dense)
            target = hidden_target(x, lookup.config.code_width, fc1, fc2, opts.hash_scale)
        else:
            target = hash_target(x, lookup.config.code_width, fc1, opts.hash_scale)
        stats["hash_rel"] = fit_hash(lookup, x, target, steps=opts.hash_steps, lr=opts.hash_lr,
                                     batch=opts.batch_tokens, seed=opts.seed, bar=bar)
    if opts.cg_iters:
        stats["table_rel"] = solve_tables(lookup, x, y, ridge=opts.ridge, iters=opts.cg_iters,
                                          bar=bar, ridge_grid=opts.ridge_grid)
    held_out = x_val is not None and y_val is not None
    xv, yv = (x_val.to(dev, dt), y_val.to(dev, dt)) if held_out else (x, y)
    held_err = None  # the held-out error of the current parameters, once measured
    if opts.finetune_steps:
        dense_f = None
        if opts.input_noise > 0 and dense is not None:
            dense_f = copy.deepcopy(dense).to(dev, dt).eval()
        # fine-tuning can overfit the solved tables (MiniLM layer 3: held-out 0.201 -> 0.217
        # after 60 steps): with held-out tokens, keep whichever parameters are better there
        if held_out:
            before = relative_error(lookup, xv, yv)
            saved = {k: v.detach().clone() for k, v in lookup.state_dict().items()}
        finetune(lookup, x, y, dense=dense_f, noise=opts.input_noise,
                 steps=opts.finetune_steps, lr=opts.finetune_lr,
                 hash_lr=opts.finetune_hash_lr, batch=opts.batch_tokens, seed=opts.seed, bar=bar)
        if held_out:
            held_err = relative_error(lookup, xv, yv)
            stats["finetune_kept"] = float(held_err <= before)
            if held_err > before:
                lookup.load_state_dict(saved)
                held_err = before
    stats["train_rel"] = relative_error(lookup, x, y)
    stats["rel_error"] = relative_error(lookup, xv, yv) if held_err is None else held_err
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _float_copy(linear: nn.Linear, device, dtype) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    return copy.to(device, dtype)


# ---------------------------------------------------------------------------------------
# A whole converted model
# ---------------------------------------------------------------------------------------

def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` inside ``root``; return what was there."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    return old


def _slot_of(root: nn.Module, rep: Any) -> str:
    slot = getattr(rep, "slot", None)
    if slot:
        return slot
    for name, mod in root.named_modules():
        if mod is rep.lookup:
            return name
    raise LookupcInputError(f"replacement {rep.name!r}: its LookupFFN is not inside result.module")


def _dense_outputs(dense: nn.Module, x: Tensor, batch: int = 8192) -> Tensor:
    p = next(dense.parameters(), None)
    dev, dt = (p.device, p.dtype) if p is not None else (x.device, x.dtype)
    with torch.no_grad():
        return torch.cat([dense(x[i:i + batch].to(dev, dt)).float().cpu()
                          for i in range(0, x.shape[0], batch)])


def _split(n: int, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(holdout * n)))
    return perm[n_val:], perm[:n_val]


def _set_rel_error(entry: Any, value: float) -> None:
    try:
        entry.rel_error = value
    except (AttributeError, TypeError):  # frozen dataclass
        object.__setattr__(entry, "rel_error", value)


def distill_conversion(result: Any, original_model: nn.Module, calibration: Any,
                       tokenizer: Any = None, **options: Any) -> list[dict]:
    """Fit every LookupFFN of a conversion to the dense FFN it replaced.

    Called by ``lookupc.convert(..., init="distill")``. Layer by layer (in
    ``result.replacements`` order): capture the LookupFFN's inputs on the calibration
    items (``feed="converted"``: in ``result.module``, whose earlier LookupFFNs are
    already fitted, stopping the forward at the layer; ``"original"``: once, with every
    dense FFN put back), compute the targets with ``replacement.dense``, fit with
    :func:`fit_lookup_ffn` and record the held-out relative error in
    ``result.report.matched[i].rel_error``. With ``model_steps`` the LookupFFNs are then
    trained together on the model's outputs (:func:`lookupc.distill.model.finetune_model`)
    and ``result.report.model_error`` records the output error before and after.

    Parameters
    ----------
    result : ConversionResult
        From ``lookupc.convert``; ``result.module`` is changed in place.
    original_model : nn.Module
        The unconverted model (only used to check the calibration items fit it).
    calibration : iterable or str
        Example inputs: tuples of positional args, dicts of keyword args or tensors.
        An ``attention_mask`` kwarg shaped like the tokens drops padding tokens. Or
        text: a list of sentences, or the path of a ``.txt`` (one per line) or ``.jsonl``
        (``text`` field) file, tokenised with ``tokenizer``.
    tokenizer : optional
        A Hugging Face tokenizer for text calibration (default: the one in the model's
        directory, ``model.config._name_or_path``).
    **options
        Fields of :class:`DistillOptions`.

    Returns
    -------
    list of dict
        Per replacement: ``name`` and the statistics of :func:`fit_lookup_ffn`.

    Raises
    ------
    LookupcInputError
        Empty or missing calibration, unknown options, or a calibration item the
        model cannot run (the message names the item and the model's error).
    """
    opts = DistillOptions.from_kwargs(**options)
    from ..table_quant import require_float_tables

    require_float_tables(result.module, "distillation")
    items = calibration_items(text_items(calibration, original_model, tokenizer))
    reps = list(result.replacements)
    if not reps:
        return []
    module = result.module
    slots = [_slot_of(module, r) for r in reps]
    modes = (module.training, original_model.training)
    module.eval()
    original_model.eval()
    with torch.no_grad():  # a wrong item fails here with the model's own message
        try:
            run_item(original_model, items[0], 0)
        finally:
            original_model.train(modes[1])
    from ..progress import progress as progress_bar
    from .distributed import setup as setup_distributed

    comm = setup_distributed(opts.distributed)
    show = opts.progress and (comm is None or comm.rank == 0)
    stats_all = []
    try:
        pre = _capture_original(module, reps, slots, items, opts) if opts.feed == "original" \
            else None
        bar = progress_bar(total=len(reps), desc="distill", unit="ffn", disable=not show)
        with bar:
            for i, rep in enumerate(reps):
                bar.set_description(f"distill {rep.name}")
                x = pre[i] if pre is not None else \
                    capture_inputs(module, [rep.lookup], items, opts.max_tokens, stop=True)[0]
                if x.shape[0] < 2:
                    raise LookupcInputError(
                        f"calibration gave {x.shape[0]} token(s) for FFN {rep.name!r}; need >= 2 "
                        f"(is it reached by the model's forward?)")
                y = _dense_outputs(rep.dense, x)
                tr, va = _split(x.shape[0], opts.holdout, opts.seed + i)
                stats = fit_lookup_ffn(rep.lookup, x[tr], y[tr], dense=rep.dense, x_val=x[va],
                                       y_val=y[va], options=opts, bar=bar)
                if comm is not None:  # every rank goes on with rank 0's fit, bit for bit
                    comm.broadcast_(list(rep.lookup.parameters()))
                _set_rel_error(result.report.matched[i], stats["rel_error"])
                stats_all.append({"name": rep.name, **stats})
                bar.set_postfix_str(f"rel_error {stats['rel_error']:.4f}")
                bar.update(1)
        if opts.model_steps:
            from .model import finetune_model
            result.report.model_error = finetune_model(
                module, original_model, items, steps=opts.model_steps, lr=opts.model_lr,
                hash_lr=opts.model_hash_lr, rest_lr=opts.model_rest_lr, train=opts.model_train,
                cosine_weight=opts.model_cosine_weight, layers=opts.model_layers,
                seed=opts.seed, progress=show, checkpoint=opts.checkpoint,
                checkpoint_every=opts.checkpoint_every, resume=opts.resume,
                distributed=opts.distributed)
    finally:
        module.train(modes[0])
    return stats_all


def _capture_original(module: nn.Module, reps: list, slots: list[str], items: list,
                      opts: DistillOptions) -> list[Tensor]:
    """Inputs of every FFN in the dense model: slots temporarily hold the dense modules."""
    olds = [_set_submodule(module, s, r.dense) for s, r in zip(slots, reps)]
    try:
        return capture_inputs(module, [r.dense for r in reps], items, opts.max_tokens, stop=False)
    finally:
        for s, old in zip(slots, olds):
            _set_submodule(module, s, old)
