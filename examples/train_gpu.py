"""Train a small language model with LookupFFN on the GPU, with TVM-built CUDA kernels.

A byte-level transformer LM on the Python standard library's docstrings
(``lookupc.textdata.docstring_corpus``, offline) whose FFNs are LookupFFNs. The first
``--check-steps`` steps are run twice from the same initialisation and batches: once on
the CPU with the PyTorch reference math (``set_schedule("reference")``) and once on the
GPU, where the lookupc ops run the CUDA kernels (``lookupc.runtime.cuda``: hash, gather
and their backward, built by TVM from the same TensorIR as the CPU path). The losses
must agree (relative difference <= ``--tolerance``); then training continues on the GPU.

Without a GPU, ``--device cpu`` runs the same check with the CUDA schedules emulated on
the CPU (schedule ``"cuda-emulate"``: same kernels and orchestration, serial threads;
slow, so use small sizes)::

    python examples/train_gpu.py                          # needs a CUDA GPU
    python examples/train_gpu.py --device cpu --width 64 --layers 1 --batch 2 --seq 32 \\
        --steps 3 --check-steps 3

The model (``ByteLM`` with LookupFFN feed-forward layers) and the byte stream of
standard-library docstrings come from ``examples/train_from_scratch.py``, so the GPU
run trains exactly the model of the CPU dense-vs-LookupFFN comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lookupc
from lookupc.examples.train_from_scratch import ByteLM, data, sample

VOCAB = 256  # bytes


def model_and_batches(args):
    """(model factory, list of (inputs, targets)) for train_from_scratch's byte-level LM."""
    cfg = lookupc.LookupConfig.for_ffn(args.width, 4 * args.width, args.width)

    def build() -> nn.Module:
        return ByteLM(args.layers, args.width, args.heads, args.seq, lookup=cfg)

    stream, _ = data(2_000_000, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    return build, [sample(stream, args.batch, args.seq, gen) for _ in range(args.steps)]


def train(model: nn.Module, batches, device: torch.device, schedule: str, lr: float,
          log_every: int = 0) -> tuple[list[float], float]:
    """Train on ``batches``; returns the losses and the tokens per second."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses, tokens, t0 = [], 0, time.perf_counter()
    with lookupc.set_schedule(schedule):
        for step, (xb, yb) in enumerate(batches):
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb).reshape(-1, VOCAB), yb.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += xb.numel()
            if log_every and step % log_every == 0:
                print(f"  step {step:5d}  loss {losses[-1]:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return losses, tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--check-steps", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=2e-3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU here (torch.cuda.is_available() is False); "
                 "use --device cpu for the emulated check")
    device = torch.device(args.device)
    schedule = "auto" if device.type == "cuda" else "cuda-emulate"
    torch.backends.cuda.matmul.allow_tf32 = False  # compare like with like
    torch.backends.cudnn.allow_tf32 = False

    build, batches = model_and_batches(args)
    check = batches[:args.check_steps]
    torch.manual_seed(args.seed)
    init = build().state_dict()

    print(f"[1/3] CPU reference, {len(check)} steps")
    ref_model = build()
    ref_model.load_state_dict(init)
    ref_losses, _ = train(ref_model, check, torch.device("cpu"), "reference", args.lr)

    print(f"[2/3] {device} with the lookupc {schedule!r} kernels, same init and batches")
    model = build().to(device)
    model.load_state_dict(init)
    losses, _ = train(model, check, device, schedule, args.lr)
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    for i, (a, b, r) in enumerate(zip(losses, ref_losses, rel)):
        print(f"  step {i}: {device} {a:.6f}  cpu reference {b:.6f}  rel diff {r:.2e}")
    ok = max(rel) <= args.tolerance
    print(f"  first {len(rel)} losses {'match' if ok else 'DO NOT match'} "
          f"(max rel diff {max(rel):.2e}, tolerance {args.tolerance:.0e})")

    rest = batches[args.check_steps:]
    more, tok_s = [], float("nan")
    if rest:
        print(f"[3/3] training on for {len(rest)} steps")
        more, tok_s = train(model, rest, device, schedule, args.lr,
                            log_every=max(1, len(rest) // 10))
        print(f"  final loss {more[-1]:.4f} (ln {VOCAB} = {math.log(VOCAB):.3f} at init); "
              f"{tok_s:,.0f} tokens/s")
    result = {"device": str(device), "schedule": schedule, "check_losses": losses,
              "reference_losses": ref_losses, "max_rel_diff": max(rel), "match": ok,
              "losses": losses + more, "tokens_per_s": tok_s, "args": {
                  k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not ok:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
