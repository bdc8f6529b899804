"""Options of the distillation: :class:`DistillOptions`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import LookupcInputError

__all__ = ["DistillOptions"]


@dataclass(frozen=True)
class DistillOptions:
    """Options of the distillation (``lookupc.convert(..., distill_options={...})``).

    Parameters
    ----------
    max_tokens : int
        Cap on the calibration tokens captured per layer (memory is about
        ``max_tokens * (d_in + d_out) * 4`` bytes per layer at a time).
    holdout : float
        Fraction of the captured tokens kept out of the fit; the reported
        ``rel_error`` is measured on them.
    feed : str
        ``"converted"``: each layer sees the activations of the model in which the
        earlier layers are already distilled LookupFFNs (errors do not compound);
        ``"original"``: the dense model's activations (one pass for all layers).
    hash_steps, hash_lr : int, float
        Adam steps and learning rate fitting the hash to the dense projection (0 skips).
    hash_source : str
        ``"hidden"`` (the pre-activations of the dense FFN's most important hidden
        units, see :mod:`lookupc.distill.layer`), ``"preact"`` (whitened principal directions
        of all pre-activations) or ``"input"`` (principal directions of x). The first
        two fall back to ``"input"`` when the dense module has no visible Linear.
    hash_scale : float
        Standard deviation of each coordinate of the hash target.
    ridge : float
        Ridge strength of the table solve, relative to the mean diagonal of A^T A.
    ridge_grid : tuple of float
        Multipliers of ``ridge`` tried by the exact (Cholesky) table solve; the one with
        the lowest error on a tenth of the training tokens held out from that solve wins
        (then the tables are solved on all training tokens). Small calibration sets
        overfit the table rows, so the strength is chosen on data, not fixed.
    cg_iters : int
        Conjugate-gradient iterations of the table solve (0 skips the solve).
    finetune_steps, finetune_lr, batch_tokens : int, float, int
        Adam fine-tuning of all parameters on the MSE (0 steps skips it).
    finetune_hash_lr : float
        Learning rate of the hash parameters during fine-tuning (the tables use
        ``finetune_lr``). Smaller: moving the hash re-codes tokens, so a hash step as
        large as a table step undoes the table solve.
    model_steps, model_lr, model_hash_lr : int, float, float
        Whole-model distillation after the layer fits (:mod:`lookupc.distill.model`):
        Adam steps (one calibration item each; 0 skips it) on the converted model's
        output error against the original model, and the learning rates of the tables
        and of the hash.
    input_noise : float
        Fine-tuning augmentation: Gaussian noise of this many per-feature standard
        deviations added to the FFN inputs, targets recomputed by the dense FFN (0: off).
    model_train, model_rest_lr : str, float
        ``"lookup"``: only the LookupFFNs train; ``"all"``: every other parameter of the
        converted model too, at ``model_rest_lr`` (it adapts to the LookupFFNs' errors).
    model_cosine_weight, model_layers : float, bool
        Weight of ``1 - cosine`` of the pooled output in the whole-model loss, and
        whether to match every hidden state (models that return ``hidden_states``).
    checkpoint, checkpoint_every, resume : str or None, int, bool
        Whole-model distillation checkpoint file (written atomically every
        ``checkpoint_every`` steps and at the end) and whether to continue from it.
    seed : int
        Seed of the token split and the minibatch order.
    progress : bool
        Show per-layer progress bars with the loss on stderr (tqdm).
    distributed : bool
        Under ``torch.distributed`` (initialised, or started by torchrun): every rank runs
        the layer fits and takes rank 0's fitted LookupFFN after each layer; whole-model
        distillation is data parallel (:mod:`lookupc.distill.distributed`); only rank 0 shows
        progress and writes the checkpoint. False: every process works alone.
    """

    max_tokens: int = 32768
    holdout: float = 0.1
    feed: str = "converted"
    hash_steps: int = 120
    hash_lr: float = 3e-3
    hash_source: str = "hidden"
    hash_scale: float = 1.0
    ridge: float = 1e-3
    ridge_grid: tuple = (1.0, 10.0, 100.0, 1000.0)
    cg_iters: int = 30
    finetune_steps: int = 60
    finetune_lr: float = 1e-3
    finetune_hash_lr: float = 3e-4
    batch_tokens: int = 2048
    input_noise: float = 0.0
    model_steps: int = 0
    model_lr: float = 3e-4
    model_hash_lr: float = 3e-5
    model_train: str = "lookup"
    model_rest_lr: float = 2e-5
    model_cosine_weight: float = 0.0
    model_layers: bool = True
    checkpoint: str | None = None
    checkpoint_every: int = 50
    resume: bool = False
    seed: int = 0
    progress: bool = True
    distributed: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise LookupcInputError(f"distill option max_tokens must be an int >= 2, got "
                             f"{self.max_tokens!r}")
        if not 0.0 < self.holdout < 1.0:
            raise LookupcInputError(f"distill option holdout must be in (0, 1), got {self.holdout!r}")
        if self.feed not in ("converted", "original"):
            raise LookupcInputError(f"distill option feed must be 'converted' or 'original', got "
                             f"{self.feed!r}")
        if self.hash_source not in ("hidden", "preact", "input"):
            raise LookupcInputError(f"distill option hash_source must be 'hidden', 'preact' or "
                             f"'input', got {self.hash_source!r}")
        for name in ("hash_steps", "cg_iters", "finetune_steps", "batch_tokens", "model_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (name == "batch_tokens" and value < 1):
                raise LookupcInputError(f"distill option {name} must be a non-negative int, got {value!r}")
        if self.model_train not in ("lookup", "all"):
            raise LookupcInputError(f"distill option model_train must be 'lookup' or 'all', got "
                             f"{self.model_train!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise LookupcInputError(f"distill option checkpoint_every must be an int >= 1, got "
                             f"{self.checkpoint_every!r}")
        if self.resume and not self.checkpoint:
            raise LookupcInputError("distill option resume=True needs checkpoint=<path>")
        if not self.ridge_grid or any(float(m) <= 0.0 for m in self.ridge_grid):
            raise LookupcInputError(f"distill option ridge_grid must be positive multipliers, got "
                             f"{self.ridge_grid!r}")
        for name in ("hash_lr", "hash_scale", "ridge", "finetune_lr", "finetune_hash_lr",
                     "model_lr", "model_hash_lr", "model_rest_lr", "model_cosine_weight",
                     "input_noise"):
            if not float(getattr(self, name)) >= 0.0:
                raise LookupcInputError(f"distill option {name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "DistillOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise LookupcInputError(f"unknown distill option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)
