"""``lookupc memo``: build, inspect and use attention-memoization databases.

Attached to the main ``lookupc`` command lazily (``lookupc.cli._LAZY``); torch,
transformers and faiss are imported inside the commands only.

\b
lookupc memo build all-minilm-l6-v2 --calibration sentences.txt -o minilm.memo
lookupc memo info minilm.memo
lookupc memo run all-minilm-l6-v2 --db minilm.memo --text held_out.txt --preset moderate [--lookup]

MODEL is a local Hugging Face encoder directory (config.json, safetensors and a
tokenizer) or ``all-minilm-l6-v2`` (the packaged model). Text files hold one
sentence per line; they are packed into full ``--seq-len`` sequences (no padding).
A calibration file may instead be token ids saved as .pt/.safetensors/.npz
(the first tensor, ``[N, L]``).
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


def _token_batches(tokenizer, path: str, seq_lens: tuple[int, ...], max_sequences: int | None, batch: int):
    from lookupc.memo_data import pack_sentences, read_sentences

    if path.endswith((".pt", ".safetensors", ".npz")):
        from lookupc.model_io import load_inputs

        ids = load_inputs(path)[0]
        ids = ids[:max_sequences] if max_sequences else ids
        return [{"input_ids": ids[s:s + batch]} for s in range(0, len(ids), batch)]
    sentences = read_sentences(path)
    items = []
    for L in seq_lens:
        ids = pack_sentences(tokenizer, sentences, L, max_sequences)
        items += [{"input_ids": ids[s:s + batch]} for s in range(0, len(ids), batch)]
    return items


@memo.command()
@click.argument("model")
@click.option("--calibration", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text (one sentence per line) or token ids (.pt/.safetensors/.npz).")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
              help="Database directory to create.")
@click.option("--seq-len", "seq_lens", type=click.IntRange(min=3), multiple=True, default=(128,),
              show_default=True, help="Length bucket(s) to pack text into (repeatable).")
@click.option("--max-sequences", type=click.IntRange(min=2), default=512, show_default=True,
              help="Calibration sequences per length.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--embed-dim", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Siamese training steps per layer.")
@click.option("--apm-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing database.")
def build(model, calibration, output, seq_lens, max_sequences, batch, embed_dim, steps, apm_dtype, overwrite):
    """Build an attention database for MODEL from calibration text."""
    from lookupc.memo_data import load_encoder
    from lookupc.memo_embed import EmbedConfig
    from lookupc.passes.attention_memo import build_memo_db

    net, tok = load_encoder(model)
    items = _token_batches(tok, calibration, seq_lens, max_sequences, batch)
    t0 = time.perf_counter()
    store = build_memo_db(net, items, output, embed=EmbedConfig(dim=embed_dim, steps=steps), apm_dtype=apm_dtype,
                          overwrite=overwrite, log=click.echo)
    click.echo(f"wrote {store.path} ({len(store.buckets)} layer buckets) in {time.perf_counter() - t0:.1f}s")


@memo.command()
@click.argument("db", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(db, as_json):
    """Summarise a database: model fingerprint, buckets, embedder training, eq. 3 per preset."""
    from lookupc.memo_perf import PRESETS
    from lookupc.memo_store import MemoStore
    from lookupc.passes.attention_memo import layer_profiles

    store = MemoStore.open(db)
    if as_json:
        click.echo(json.dumps(store.manifest, indent=1))
        return
    fp = store.fingerprint
    click.echo(f"{store.path}: model {fp.model_id!r} layers={fp.num_layers} hidden={fp.hidden_size} "
               f"heads={fp.num_heads} hash={fp.qk_hash[:12]} apm={store.manifest['apm_dtype']}")
    click.echo(f"{'layer':>5} {'L':>5} {'records':>7} {'train s':>8} {'loss':>15} {'t_attn us':>10} "
               f"{'t_saved us':>10} {'t_ovh us':>9}  " + "  ".join(f"{p}: alpha/PB us" for p in PRESETS))
    for (layer, L), prof in sorted(layer_profiles(store).items()):
        b = store.bucket(layer, L)
        tr, t = b.info["train"], prof.timing
        cols = "  ".join(f"{prof.hit_rate(v):.2f}/{1e6 * prof.benefit(v):+.0f}" for v in PRESETS.values())
        click.echo(f"{layer:>5} {L:>5} {b.count:>7} {tr['seconds']:>8.1f} "
                   f"{tr['initial_loss']:>7.4f}->{tr['final_loss']:<7.4f} {1e6 * t.t_attention:>10.0f} "
                   f"{1e6 * t.t_saved:>10.0f} {1e6 * t.t_overhead:>9.0f}  {cols}")


@memo.command()
@click.argument("model")
@click.option("--db", required=True, type=click.Path(exists=True, file_okay=False), help="Attention database.")
@click.option("--text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Evaluation text, one sentence per line.")
@click.option("--preset", type=click.Choice(_PRESETS), default="moderate", show_default=True)
@click.option("--threshold", type=float, default=None, help="Similarity threshold (overrides --preset).")
@click.option("--layers", default="auto", show_default=True, help="'auto' (eq. 3), 'all' or e.g. '0,1'.")
@click.option("--seq-len", type=click.IntRange(min=3), default=128, show_default=True)
@click.option("--max-sequences", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lookup", is_flag=True, help="Apply the LookupFFN pass first (random init), then memoization.")
def run(model, db, text, preset, threshold, layers, seq_len, max_sequences, batch, lookup):
    """Run MODEL with memoization on TEXT; print hit rates, cosine vs the unmemoized model and times."""
    import torch

    from lookupc.memo_data import load_encoder
    from lookupc.passes.attention_memo import apply_memo, memo_stats

    net, tok = load_encoder(model)
    items = _token_batches(tok, text, (seq_len,), max_sequences, batch)
    if lookup:
        import lookupc

        net = lookupc.convert(net, items[0]).module
    layer_sel = layers if layers in ("auto", "all") else [int(x) for x in layers.split(",") if x.strip()]
    fast = apply_memo(net, db, preset, layers=layer_sel, threshold=threshold)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = [net(**it).last_hidden_state.mean(1) for it in items]
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = [fast(**it).last_hidden_state.mean(1) for it in items]
        t_memo = time.perf_counter() - t0
    cos = torch.nn.functional.cosine_similarity(torch.cat(ref), torch.cat(got), dim=-1)
    for layer, s in sorted(memo_stats(fast).items()):
        click.echo(f"layer {layer}: hits {s.hits} misses {s.misses} ineligible {s.ineligible} "
                   f"(hit rate {s.hit_rate:.2f})")
    if not memo_stats(fast):
        click.echo("no layer memoizes (eq. 3 predicts no benefit at this threshold; try --layers all)")
    click.echo(f"{len(cos)} sequences: cosine vs original mean {cos.mean():.4f} min {cos.min():.4f}; "
               f"time {t_ref:.2f}s -> {t_memo:.2f}s")
