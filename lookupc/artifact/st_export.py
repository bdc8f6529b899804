"""Writing converted models in the sentence-transformers layout (:mod:`lookupc.artifact.st_format`).

``lookupc convert MODEL --format sentence-transformers -o DIR`` (:func:`write_loaded`) and
:func:`save` (for ``lookupc.convert(SentenceTransformer, ...)`` results) write::

    DIR/
      modules.json              Transformer (lookupc's), Pooling, Normalize when the source had it
      1_Pooling/config.json     the pooling modes (sentence-transformers' keys)
      2_Normalize/              when the source L2-normalised
      sentence_bert_config.json max_seq_length
      model.pt2                 the converted transformer (torch.export, lookupc ops inside)
      lookupc.json              marks the directory: program, output names, embedding rows
      tokenizer files           tokenizer.json, vocab.txt ... (never pickles)

lookupc reads it back as a MODEL (``lookupc compile DIR``); the sentence-transformers
package cannot (its Transformer module needs Hugging Face weights).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import LookupcInputError
from .st_format import LOOKUPC_JSON, MODULES, PROGRAM, is_sentence_transformer, parts, token_inputs
from .text_io import TOKENIZER_FILES, EmbeddingSpec, bundle_tokenizer, tokenizer_files

__all__ = ["write_st_dir", "write_loaded", "save"]

_FORMAT = "lookupc-sentence-transformers"


def _output_dim(program, names: list[str], output: str) -> int | None:
    outs = [n for n in program.graph.nodes if n.op == "output"]
    try:
        vals = outs[0].args[0]
        node = vals[names.index(output)] if output in names else vals[0]
        return int(node.meta["val"].shape[-1])
    except (IndexError, KeyError, AttributeError, TypeError, ValueError):
        return None


def write_st_dir(out_dir: str | os.PathLike, program, output_names: list[str],
                 spec: EmbeddingSpec, *, tokenizer_dir: str | os.PathLike | None = None,
                 tokenizer: Any = None, vocab_rows: int | None = None,
                 input_names: tuple = ("input_ids", "attention_mask"),
                 overwrite: bool = False) -> Path:
    """Write a converted model as a sentence-transformers directory (module docstring).

    The tokenizer is copied from ``tokenizer_dir`` (its :data:`TOKENIZER_FILES`), or saved
    from ``tokenizer`` with ``save_pretrained``. Returns the directory.
    """
    from .export import save_program
    from .format import prepare_dir

    out = Path(out_dir)
    prepare_dir(out, overwrite, marker=LOOKUPC_JSON, what="sentence-transformers export")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_program(program, str(tmp / PROGRAM), output_names)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "lookupc.artifact.st_format.LookupTransformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling"}]
        (tmp / "1_Pooling").mkdir()
        pooling = {"word_embedding_dimension": _output_dim(program, output_names, spec.output),
                   **{f"pooling_mode_{k}": m in spec.pooling for k, m in
                      (("cls_token", "cls"), ("max_tokens", "max"), ("mean_tokens", "mean"))},
                   "pooling_mode_mean_sqrt_len_tokens": False}
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
        if spec.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (tmp / "2_Normalize").mkdir()
        (tmp / MODULES).write_text(json.dumps(modules, indent=2) + "\n")
        if spec.max_length:
            (tmp / "sentence_bert_config.json").write_text(json.dumps(
                {"max_seq_length": spec.max_length, "do_lower_case": False}, indent=2) + "\n")
        if tokenizer_dir is not None and tokenizer_files(tokenizer_dir):
            for name in tokenizer_files(tokenizer_dir):
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
            if (Path(tokenizer_dir) / "config.json").is_file():
                shutil.copyfile(Path(tokenizer_dir) / "config.json", tmp / "config.json")
        elif tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            for p in tmp.iterdir():  # keep only the files lookupc bundles (no pickles)
                if p.is_file() and p.name not in TOKENIZER_FILES and p.name != PROGRAM \
                        and p.suffix != ".json":
                    p.unlink()
        marker = {"format": _FORMAT, "program": PROGRAM, "input_names": list(input_names),
                  "output_names": list(output_names),
                  "vocab_rows": vocab_rows, "embedding": spec.to_dict()}
        (tmp / LOOKUPC_JSON).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_loaded(out_dir: str | os.PathLike, program, output_names: list[str], loaded) -> str:
    """``lookupc convert --format sentence-transformers``: write ``program`` (converted from
    ``loaded``, a Hugging Face or sentence-transformers MODEL) as a directory; one line."""
    info = loaded.info
    if "input_ids" not in (loaded.input_names or []) or not info.get("embedding"):
        raise LookupcInputError(f"{loaded.source}: --format sentence-transformers needs a "
                                f"Hugging Face or sentence-transformers model directory")
    spec = EmbeddingSpec.from_dict(info["embedding"])
    where = info.get("tokenizer_dir")
    if where and tokenizer_files(where):
        bundle_tokenizer(where, info.get("vocab_rows"))  # refuses another model's tokenizer
    out = write_st_dir(out_dir, program, output_names, spec,
                       tokenizer_dir=info.get("tokenizer_dir"), vocab_rows=info.get("vocab_rows"),
                       input_names=tuple(loaded.input_names), overwrite=True)
    return (f"wrote {out}/ (sentence-transformers layout: {'+'.join(spec.pooling)} pooling"
            f"{', Normalize' if spec.normalize else ''}, "
            f"{'tokenizer, ' if tokenizer_files(out) else 'no tokenizer, '}"
            f"{(out / PROGRAM).stat().st_size:,}-byte {PROGRAM}); compile it with "
            f"'lookupc compile {out} -o DIR'")


def save(result, out_dir: str | os.PathLike, example_inputs: tuple | None = None,
         overwrite: bool = False) -> Path:
    """Write a converted SentenceTransformer (``lookupc.convert(st, ...)``'s result, or its
    ``.module``) as a directory that ``lookupc compile`` takes."""
    from .export import export_program

    st = getattr(result, "module", result)
    if not is_sentence_transformer(st):
        raise LookupcInputError(f"save() wants a converted SentenceTransformer, got "
                                f"{type(st).__name__}")
    transformer, tokenizer, spec = parts(st)
    inputs = example_inputs if example_inputs is not None else \
        getattr(result, "example_inputs", None)
    if inputs is None:
        inputs = token_inputs(tokenizer, ["A sentence to trace the model with.", "Another."],
                               spec.max_length)
    names = ("input_ids", "attention_mask")
    if isinstance(inputs, dict):
        names = tuple(k for k in names if k in inputs)
        inputs = tuple(inputs[k] for k in names)
    names = names[:len(inputs)]
    program, outputs, _, _ = export_program(transformer.auto_model.eval(), tuple(inputs))
    rows = transformer.auto_model.get_input_embeddings().num_embeddings
    source = getattr(tokenizer, "name_or_path", None)
    src_dir = source if source and Path(source).is_dir() and tokenizer_files(source) else None
    return write_st_dir(out_dir, program, outputs, spec, tokenizer_dir=src_dir,
                        tokenizer=None if src_dir else tokenizer, vocab_rows=rows,
                        input_names=names, overwrite=overwrite)
