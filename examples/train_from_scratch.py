"""Train a small byte-level transformer LM from scratch, dense FFNs vs LookupFFNs.

The paper's claim in miniature: a LookupFFN trained end to end through the
``lookupc`` custom ops (their autograd) learns like the dense FFN it replaces. Both
runs use the same data (Python standard-library docstrings, bytes), model, optimizer,
seed and budget; the script writes the two loss curves (train loss per step and
held-out loss at intervals) to PNG and JSON::

    python examples/train_from_scratch.py                  # ~3 min per run on 2 cores
    python examples/train_from_scratch.py --seconds 60 --layers 2
    python examples/train_from_scratch.py --steps 300      # fixed step budget instead

Timings are wall clock on whatever machine runs it; on a shared CPU compare the
per-step curves (the budget in seconds gives the faster model more steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

from lookupc import LookupConfig, LookupFFN
from lookupc.textdata import docstring_corpus


class Block(nn.Module):
    """Pre-LayerNorm transformer block; ``ffn`` is dense or a LookupFFN."""

    def __init__(self, width: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, seq: int, lookup: LookupConfig | None):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, width))

        def ffn() -> nn.Module:
            if lookup is not None:
                return LookupFFN(width, width, lookup)
            return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.blocks = nn.ModuleList(Block(width, heads, ffn()) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.pos[:t]
        for b in self.blocks:
            x = b(x, self.mask[:t, :t])
        return self.head(self.ln(x))


def ffn_params(model: ByteLM) -> int:
    return sum(p.numel() for b in model.blocks for p in b.ffn.parameters())


def data(max_chars: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    raw = torch.frombuffer(bytearray(docstring_corpus(max_chars).encode("utf-8")), dtype=torch.uint8)
    raw = raw.long()
    cut = int(0.95 * raw.numel())
    return raw[:cut], raw[cut:]


def sample(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)
    chunk = stream[idx]
    return chunk[:, :-1], chunk[:, 1:]


def evaluate(model: nn.Module, val: torch.Tensor, batch: int, seq: int, batches: int = 4) -> float:
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = sample(val, batch, seq, gen)
            total += float(nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)))
    model.train()
    return total / batches


def train(kind: str, a, train_s: torch.Tensor, val_s: torch.Tensor) -> dict:
    torch.manual_seed(a.seed)
    lookup = LookupConfig(tables=a.tables, bits=a.bits, block_size=a.block_size) \
        if kind == "lookup" else None
    model = ByteLM(a.layers, a.width, a.heads, a.seq, lookup)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed)
    curve, val_curve = [], []
    t0 = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - t0
        if (a.steps and step >= a.steps) or (not a.steps and elapsed >= a.seconds):
            break
        lr = a.lr * min(1.0, (step + 1) / a.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sample(train_s, a.batch, a.seq, gen)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append({"step": step, "seconds": time.perf_counter() - t0, "loss": float(loss.detach())})
        if step % a.eval_every == 0:
            val_curve.append({"step": step, "seconds": curve[-1]["seconds"],
                              "val_loss": evaluate(model, val_s, a.batch, a.seq)})
            print(f"[{kind}] step {step:5d}  {curve[-1]['seconds']:6.1f} s  train {curve[-1]['loss']:.3f}"
                  f"  val {val_curve[-1]['val_loss']:.3f}", flush=True)
        step += 1
    final = evaluate(model, val_s, a.batch, a.seq, batches=8)
    val_curve.append({"step": step, "seconds": time.perf_counter() - t0, "val_loss": final})
    ffn_flops = (model.blocks[0].ffn.flops_per_token() if lookup is not None else
                 2 * a.width * 4 * a.width * 2 + 5 * a.width)
    return {"kind": kind, "steps": step, "seconds": time.perf_counter() - t0,
            "final_val_loss": final, "final_val_bits_per_byte": final / math.log(2),
            "ffn_params": ffn_params(model), "ffn_flops_per_token": ffn_flops,
            "lookup_config": lookup.to_dict() if lookup else None,
            "train": curve, "val": val_curve}


def smooth(values: list[float], k: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        steps = [p["step"] for p in r["train"]]
        axes[0].plot(steps, smooth([p["loss"] for p in r["train"]]), label=f"{r['kind']} train")
        axes[0].plot([p["step"] for p in r["val"]], [p["val_loss"] for p in r["val"]], "o--",
                     ms=3, label=f"{r['kind']} held-out")
        axes[1].plot([p["seconds"] for p in r["train"]], smooth([p["loss"] for p in r["train"]]),
                     label=r["kind"])
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("seconds (wall clock)")
    for ax in axes:
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.legend()
    fig.suptitle("byte-level LM on stdlib docstrings: dense FFN vs LookupFFN")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180.0, help="wall-clock budget per run")
    p.add_argument("--steps", type=int, default=0, help="step budget per run (overrides seconds)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--tables", type=int, default=64)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-chars", type=int, default=2_000_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("dense", "lookup"), help="run only one of the two")
    p.add_argument("--out", default="bench/results/train_from_scratch")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train_s, val_s = data(a.max_chars, a.seed)
    runs = [train(kind, a, train_s, val_s) for kind in ("dense", "lookup")
            if a.only in (None, kind)]
    for r in runs:
        print(f"{r['kind']:>6}: {r['steps']} steps in {r['seconds']:.0f} s, held-out loss "
              f"{r['final_val_loss']:.3f} nats/byte ({r['final_val_bits_per_byte']:.3f} bits), "
              f"FFN {r['ffn_flops_per_token']:,} FLOPs/token, {r['ffn_params']:,} FFN params")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"args": vars(a), "runs": runs}, f)
    plot(runs, a.out + ".png")
    print(f"wrote {a.out}.json and {a.out}.png")
    return runs


if __name__ == "__main__":
    main()
