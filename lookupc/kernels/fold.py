"""The folded weight layout the ``fold=True`` hash kernel takes (:func:`fold_weight`).

Sylvester order gives ``H_D = H_{D/BS} (x) H_BS``, so the BS-wide factor of every BH4
round's Hadamard transform can be multiplied into the module's blocks once, ahead of the
kernel, leaving only the butterfly stages across blocks in the TensorIR
(``lookupc.kernels.forward``). The runtimes (``lookupc.runtime.compiled``,
``lookupc.runtime.cuda_training``) call this to prepare the hash kernel's weight argument; it is
plain torch math, so it lives here with the kernels it serves and imports no runtime.
"""

from __future__ import annotations

__all__ = ["hadamard", "fold_weight"]


def hadamard(n: int, dtype=None):
    """Sylvester Hadamard matrix H_n (entries +-1) as a torch tensor."""
    import torch

    h = torch.ones(1, 1, dtype=dtype or torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def fold_weight(weight):
    """BH4 weight [R, 4, D/BS, BS(out), BS(in)] -> folded [R, 4, D/BS, BS(in), BS(out)].

    Block ``b`` becomes ``(H_BS @ W_b)^T``: the BS-wide factor of every round's
    Hadamard transform moves into the blocks (``H_D = H_{D/BS} (x) H_BS``), computed in
    float64 and rounded once to float32.
    """
    import torch

    bs = weight.shape[-1]
    h = hadamard(bs).to(weight.device)
    folded = torch.einsum("po,rjboi->rjbip", h, weight.detach().double())
    return folded.to(torch.float32).contiguous()
