"""``lookupc memo``: build, inspect and use attention-memoization databases.

Attached to the main ``lookupc`` command lazily (``lookupc.cli.main._LAZY``); torch,
transformers and faiss are imported inside the commands only.

\b
lookupc memo build all-minilm-l6-v2 --calibration sentences.txt -o minilm.memo
lookupc memo info minilm.memo
lookupc memo run all-minilm-l6-v2 --db minilm.memo --text held_out.txt --preset moderate [--lookup]

MODEL is a local Hugging Face encoder directory (config.json, safetensors and a
tokenizer) or ``all-minilm-l6-v2`` (the packaged model). Text files hold one
sentence per line; they are packed into full ``--seq-len`` sequences, or with
``--pad`` one sentence per sequence, right-padded to ``--seq-len`` (records are then
matched by real length). A calibration file may instead be token ids saved as
.pt/.safetensors/.npz (the first tensor, ``[N, L]``).
"""

from __future__ import annotations

import json
import time

import click

__all__ = ["memo"]

_PRESETS = ("conservative", "moderate", "aggressive")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def memo() -> None:
    """Attention memoization (AttMemo): reuse stored attention probabilities of similar inputs.

    \b
    lookupc memo build all-minilm-l6-v2 --calibration sentences.txt -o minilm.memo
    lookupc memo info minilm.memo
    lookupc memo run all-minilm-l6-v2 --db minilm.memo --text held_out.txt
    """


def _token_batches(tokenizer, path: str, seq_lens: tuple[int, ...], max_sequences: int | None, batch: int,
                   pad: bool = False):
    from lookupc.memo.data import pack_sentences, pad_sentences, read_sentences

    if path.endswith((".pt", ".safetensors", ".npz")):
        from lookupc.artifact.tensor_files import load_inputs

        ids = load_inputs(path)[0]
        ids = ids[:max_sequences] if max_sequences else ids
        return [{"input_ids": ids[s:s + batch]} for s in range(0, len(ids), batch)]
    sentences = read_sentences(path)
    items = []
    for L in seq_lens:
        if pad:
            ids, mask = pad_sentences(tokenizer, sentences, L, max_sequences)
            items += [{"input_ids": ids[s:s + batch], "attention_mask": mask[s:s + batch]}
                      for s in range(0, len(ids), batch)]
        else:
            ids = pack_sentences(tokenizer, sentences, L, max_sequences)
            items += [{"input_ids": ids[s:s + batch]} for s in range(0, len(ids), batch)]
    return items


@memo.command()
@click.argument("model")
@click.option("--calibration", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text (one sentence per line) or token ids (.pt/.safetensors/.npz): the database content.")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Database directory to create.")
@click.option("--alpha-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Representative queries (same form as --calibration): the traffic the database is for; "
                   "eq. 3 layer selection measures its hit rate on them. Default: held-out token-edited "
                   "copies of the calibration sequences.")
@click.option("--seq-len", "seq_lens", type=click.IntRange(min=3), multiple=True, default=(128,),
              show_default=True, help="Length bucket(s) to pack or pad text into (repeatable).")
@click.option("--pad", is_flag=True, help="One sentence per sequence, right-padded (default: pack sentences).")
@click.option("--max-sequences", type=click.IntRange(min=2), default=512, show_default=True,
              help="Calibration sequences per length.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--token-dim", type=click.IntRange(min=1), default=16, show_default=True,
              help="Embedder features per token (a key has seq-len x token-dim values).")
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True,
              help="Upper limit on embedder training steps per layer (it stops when converged).")
@click.option("--train-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Embedder training time budget per layer (default: none).")
@click.option("--edit-rates", default="0.02,0.05,0.1,0.2", show_default=True,
              help="Token-replacement rates of the edited copies used to train and calibrate; '' for none.")
@click.option("--apm-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing database.")
def build(model, calibration, output, alpha_text, seq_lens, pad, max_sequences, batch, token_dim, steps,
          train_seconds, edit_rates, apm_dtype, overwrite):
    """Build an attention database for MODEL from calibration text."""
    from lookupc.memo.build import build_memo_db
    from lookupc.memo.data import load_encoder
    from lookupc.memo.embed import EmbedConfig

    try:
        rates = tuple(float(x) for x in edit_rates.split(",") if x.strip())
    except ValueError as exc:
        raise click.BadParameter(f"not a comma-separated list of numbers: {edit_rates!r}",
                                 param_hint="--edit-rates") from exc
    net, tok = load_encoder(model)
    items = _token_batches(tok, calibration, seq_lens, max_sequences, batch, pad)
    alpha = _token_batches(tok, alpha_text, seq_lens, max_sequences, batch, pad) if alpha_text else None
    t0 = time.perf_counter()
    cfg = EmbedConfig(token_dim=token_dim, steps=steps, max_seconds=train_seconds, edit_rates=rates)
    store = build_memo_db(net, items, output, embed=cfg, alpha_inputs=alpha, apm_dtype=apm_dtype,
                          overwrite=overwrite, log=click.echo)
    click.echo(f"wrote {store.path} ({len(store.buckets)} layer buckets) in {time.perf_counter() - t0:.1f}s")


@memo.command()
@click.argument("db", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(db, as_json):
    """Summarise a database: model fingerprint, buckets, embedder training, eq. 3 plan per preset."""
    from lookupc.memo.perf import PRESETS, format_plan
    from lookupc.memo.plan import memo_plan
    from lookupc.memo.store import MemoStore

    store = MemoStore.open(db)
    if as_json:
        click.echo(json.dumps(store.manifest, indent=1))
        return
    fp = store.fingerprint
    click.echo(f"{store.path}: model {fp.model_id!r} layers={fp.num_layers} hidden={fp.hidden_size} "
               f"heads={fp.num_heads} hash={fp.qk_hash[:12]} apm={store.manifest['apm_dtype']}")
    click.echo(f"{'layer':>5} {'L':>5} {'records':>7} {'lengths':>7} {'train s':>8} {'steps':>6} "
               f"{'held-out loss':>20} {'|cal-true|':>10}")
    for (layer, L), b in sorted(store.buckets.items()):
        tr, cal = b.info["train"], b.info["calibration"]["held_out"]
        loss = f"{tr['initial_val_loss']:.2g}->{tr['final_val_loss']:.2g} (-{100 * tr['val_reduction']:.0f}%)"
        mae = f"{cal['mae']:.3f}" if cal["n"] else "-"
        click.echo(f"{layer:>5} {L:>5} {b.count:>7} {len(b.groups):>7} {tr['seconds']:>8.1f} {tr['steps']:>6} "
                   f"{loss:>20} {mae:>10}")
    for name, thr in PRESETS.items():
        click.echo(f"\n{name}:")
        click.echo(format_plan(memo_plan(store, threshold=thr), thr))


@memo.command()
@click.argument("model")
@click.option("--db", required=True, type=click.Path(exists=True, file_okay=False), help="Attention database.")
@click.option("--text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Evaluation text, one sentence per line.")
@click.option("--preset", type=click.Choice(_PRESETS), default="moderate", show_default=True)
@click.option("--threshold", type=float, default=None, help="Similarity threshold (overrides --preset).")
@click.option("--layers", default="auto", show_default=True, help="'auto' (eq. 3), 'all' or e.g. '0,1'.")
@click.option("--margin-quantile", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Error margin: this quantile of the calibration's held-out overstatement.")
@click.option("--seq-len", type=click.IntRange(min=3), default=128, show_default=True)
@click.option("--pad", is_flag=True, help="One sentence per sequence, right-padded (default: pack sentences).")
@click.option("--max-sequences", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lookup", is_flag=True, help="Apply the LookupFFN pass first (random init), then memoization.")
def run(model, db, text, preset, threshold, layers, margin_quantile, seq_len, pad, max_sequences, batch, lookup):
    """Run MODEL with memoization on TEXT; print hit rates, cosine vs the unmemoized model and times."""
    import torch

    from lookupc.memo.attention import memo_stats
    from lookupc.memo.data import load_encoder
    from lookupc.passes.attention_memo import apply_memo

    net, tok = load_encoder(model)
    items = _token_batches(tok, text, (seq_len,), max_sequences, batch, pad)
    if lookup:
        import lookupc

        net = lookupc.convert(net, items[0]).module
    layer_sel = layers if layers in ("auto", "all") else [int(x) for x in layers.split(",") if x.strip()]
    fast = apply_memo(net, db, preset, layers=layer_sel, threshold=threshold, margin_quantile=margin_quantile,
                      log=click.echo)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = [_pool(net(**it).last_hidden_state, it) for it in items]
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = [_pool(fast(**it).last_hidden_state, it) for it in items]
        t_memo = time.perf_counter() - t0
    cos = torch.nn.functional.cosine_similarity(torch.cat(ref), torch.cat(got), dim=-1)
    for layer, s in sorted(memo_stats(fast).items()):
        click.echo(f"layer {layer}: hits {s.hits} misses {s.misses} ineligible {s.ineligible} "
                   f"(hit rate {s.hit_rate:.2f})")
    if not memo_stats(fast):
        click.echo("no layer memoizes (eq. 3 predicts no benefit at this threshold; try --layers all)")
    click.echo(f"{len(cos)} sequences: cosine vs original mean {cos.mean():.4f} min {cos.min():.4f}; "
               f"time {t_ref:.2f}s -> {t_memo:.2f}s")


def _pool(hidden, item):
    """Mean over the real tokens (the attention mask's ones)."""
    mask = item.get("attention_mask")
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
