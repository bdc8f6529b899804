"""Text in, embeddings out: the tokenizer an artifact carries, pooling, and ``encode``.

``lookupc compile`` copies the source model's tokenizer files (:data:`TOKENIZER_FILES`:
JSON, plain-text vocabularies and sentencepiece protobufs, never pickles) into
``DIR/tokenizer/``; the manifest lists them under ``files`` (sha256 and size, so
verification and signatures cover them) and describes them under ``tokenizer``. The
manifest's ``embedding`` says how token states become a sentence embedding:

- ``output``: the program output holding the token states (``last_hidden_state``);
- ``pooling``: ``mean`` (over the attention mask), ``cls`` or ``max``, or several of them
  concatenated in sentence-transformers' order (cls, max, mean);
- ``normalize``: L2-normalise the pooled vector (a sentence-transformers ``Normalize``
  module); a plain Hugging Face model gets mean pooling without normalisation;
- ``max_length``: the most tokens per text (sentence-transformers' ``max_seq_length``, else
  the model's ``max_position_embeddings``); a longer text is truncated with a
  :class:`TextTruncatedWarning`.

:func:`encode` tokenises, batches (longest texts first, as sentence-transformers does),
pads to the longest text of each batch (to the compiled sequence length when the program
has static shapes), runs the artifact, pools and normalises, and returns the embeddings
in the order given. :func:`pool` is the pooling itself (sentence-transformers' formulas).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import LookupcInputError

__all__ = ["TOKENIZER_DIR", "TOKENIZER_FILES", "EmbeddingSpec", "TextTruncatedWarning",
           "pool", "encode", "tokenizer_files", "bundle_tokenizer", "check_vocab",
           "load_tokenizer", "text_fields"]

TOKENIZER_DIR = "tokenizer"
#: the files of a Hugging Face tokenizer that an artifact may carry (no pickles)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
POOLING_MODES = ("cls", "max", "mean")  # sentence-transformers' concatenation order


class TextTruncatedWarning(UserWarning):
    """A text had more tokens than the model takes; it was cut to ``max_length``."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """How a model's token states become a sentence embedding (see the module docstring)."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_length: int | None = None
    source: str = "default: mean pooling over the attention mask"
    output: str = "last_hidden_state"

    def __post_init__(self):
        modes = (self.pooling,) if isinstance(self.pooling, str) else tuple(self.pooling)
        bad = [m for m in modes if m not in POOLING_MODES]
        if not modes or bad:
            raise LookupcInputError(f"pooling mode(s) {bad or modes} not supported: lookupc "
                                    f"pools with {', '.join(POOLING_MODES)}")
        object.__setattr__(self, "pooling",
                           tuple(m for m in POOLING_MODES if m in modes))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pooling"] = list(self.pooling)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EmbeddingSpec":
        return cls(**{k: tuple(v) if k == "pooling" else v for k, v in d.items()
                      if k in cls.__dataclass_fields__})


def pool(hidden, mask, modes=("mean",), normalize: bool = False):
    """Sentence embeddings ``[batch, dim * len(modes)]`` from token states ``[batch, seq, dim]``.

    The formulas are sentence-transformers' ``Pooling``: ``mean`` is the sum of the states
    where ``mask`` is 1 over the count (at least 1e-9), ``max`` the largest state over
    masked-in tokens, ``cls`` the first masked-in token; then ``F.normalize`` when
    ``normalize``.
    """
    import torch

    mask = mask.to(hidden.device)
    out = []
    for mode in (m for m in POOLING_MODES if m in modes):
        if mode == "cls":
            first = mask.to(torch.int).argmax(dim=1)
            out.append(hidden[torch.arange(hidden.shape[0]), first])
        elif mode == "max":
            m = mask.unsqueeze(-1).expand_as(hidden)
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9))
    emb = torch.cat(out, dim=-1)
    return torch.nn.functional.normalize(emb, p=2, dim=-1) if normalize else emb


# --- the tokenizer an artifact carries --------------------------------------------------------

def tokenizer_files(src: str | os.PathLike) -> list[str]:
    """Names of the :data:`TOKENIZER_FILES` present in directory ``src``."""
    return [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]


def check_vocab(tokenizer, rows: int | None, where: str) -> None:
    """Refuse a tokenizer whose ids go past the model's embedding rows."""
    if rows and len(tokenizer) > rows:
        raise LookupcInputError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's token "
            f"embedding has {rows} rows: it is not this model's tokenizer (give the model "
            f"directory its own tokenizer files)")


def bundle_tokenizer(src: str | os.PathLike, rows: int | None) -> tuple[dict, dict]:
    """The tokenizer files of ``src`` to copy into an artifact, checked against the model.

    Returns ``(files, meta)``: ``{"tokenizer/<name>": source path}`` and the manifest's
    ``tokenizer`` entry. Raises :class:`LookupcInputError` when the tokenizer does not
    load or does not fit the model's vocabulary.
    """
    from ..distill.calibration_text import tokenizer_for

    names = tokenizer_files(src)
    config = Path(src) / "tokenizer_config.json"
    try:
        has_class = config.is_file() and "tokenizer_class" in json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        has_class = False
    if not has_class and (Path(src) / "config.json").is_file():
        names.append("config.json")  # AutoTokenizer reads the model type from it
    try:
        tokenizer = tokenizer_for(None, str(src))
    except Exception as err:  # noqa: BLE001 -- tokenizers raises plain Exceptions too
        raise LookupcInputError(f"{src}: the tokenizer files do not load: "
                                f"{' '.join(str(err).split())[:200]}") from None
    check_vocab(tokenizer, rows, str(src))
    files = {f"{TOKENIZER_DIR}/{n}": str(Path(src) / n) for n in names}
    meta = {"dir": TOKENIZER_DIR, "files": sorted(files), "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer), "embedding_rows": rows,
            "pad_token_id": tokenizer.pad_token_id}
    return files, meta


def text_fields(loaded) -> tuple[dict, dict]:
    """Manifest fields (``embedding``, ``tokenizer``) and tokenizer files for an artifact of
    ``loaded`` (a :class:`lookupc.artifact.model_load.LoadedModel`); empty when it is not a text model."""
    info = loaded.info
    fields: dict = {}
    files: dict = {}
    if "input_ids" not in (loaded.input_names or []):
        return fields, files
    if info.get("embedding"):
        fields["embedding"] = EmbeddingSpec.from_dict(info["embedding"]).to_dict()
    where = info.get("tokenizer_dir")
    if where and tokenizer_files(where):
        files, fields["tokenizer"] = bundle_tokenizer(where, info.get("vocab_rows"))
    return fields, files


def load_tokenizer(root: str | os.PathLike, manifest: dict):
    """The tokenizer bundled in artifact ``root`` (already verified), or an error saying why
    there is none. Files in ``tokenizer/`` that the manifest does not list are refused."""
    meta = manifest.get("tokenizer")
    if not meta:
        raise LookupcInputError(
            f"{root}: this artifact has no tokenizer, so it cannot take text; compile it "
            f"from a Hugging Face or sentence-transformers model directory that has its "
            f"tokenizer files (or run it on token ids with --input)")
    folder = Path(root) / meta["dir"]
    listed = {Path(f).name for f in meta["files"]}
    extra = sorted(p.name for p in folder.iterdir() if p.name not in listed)
    if extra:
        raise LookupcInputError(f"{folder}: files the manifest does not list: "
                                f"{', '.join(extra)}; refusing to load the tokenizer")
    from ..distill.calibration_text import tokenizer_for

    return tokenizer_for(None, str(folder))


# --- encode -----------------------------------------------------------------------------------

def _sentences(sentences) -> tuple[list[str], bool]:
    single = isinstance(sentences, str)
    items = [sentences] if single else list(sentences)
    if not items:
        raise LookupcInputError("no sentences to encode (the list is empty)")
    for i, s in enumerate(items, 1):
        if not isinstance(s, str):
            raise LookupcInputError(f"sentence {i} is a {type(s).__name__}, not a string")
        if not s.strip():
            raise LookupcInputError(f"sentence {i} is empty")
    return items, single


def _limits(manifest: dict, spec: EmbeddingSpec, tokenizer) -> tuple[int, int | None, int | None]:
    """(max tokens per text, static batch or None, static sequence length or None)."""
    program = manifest.get("program", {})
    inputs = program.get("inputs", [])
    static_b = static_s = None
    if not program.get("dynamic_dims", True) and inputs:
        static_b, static_s = inputs[0]["shape"][:2]
    limits = [n for n in (spec.max_length, static_s) if n]
    if not limits:
        n = getattr(tokenizer, "model_max_length", None)
        limits = [n if n and n < 1 << 20 else 512]
    return min(limits), static_b, static_s


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    long = [i for i, t in enumerate(ids) if len(t) > max_length]
    for i in long:
        ids[i] = tokenizer(texts[i], add_special_tokens=True, truncation=True,
                           max_length=max_length)["input_ids"]
    if long:
        shown = ", ".join(str(i + 1) for i in long[:5]) + (" ..." if len(long) > 5 else "")
        warnings.warn(TextTruncatedWarning(
            f"{len(long)} text(s) longer than {max_length} tokens (the most this model takes) "
            f"were truncated to {max_length}: sentence(s) {shown}"), stacklevel=3)
    return ids


def _batch_inputs(names: list[dict], rows: list[list[int]], length: int, pad: int) -> tuple:
    import torch

    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    made = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "position_ids": torch.arange(length).expand(len(rows), length).contiguous()}
    out = []
    for entry in names:
        if entry["name"] not in made:
            raise LookupcInputError(f"the artifact takes an input {entry['name']!r} that lookupc "
                                    f"cannot make from text (it makes {', '.join(made)})")
        dtype = getattr(torch, entry.get("dtype", "int64"), torch.long)
        out.append(made[entry["name"]].to(dtype))
    return tuple(out), mask


def _output_index(manifest: dict, spec: EmbeddingSpec, outputs: tuple) -> int:
    names = manifest.get("program", {}).get("outputs", [])
    if spec.output in names:
        return names.index(spec.output)
    for i, t in enumerate(outputs):
        if t.dim() == 3:
            return i
    raise LookupcInputError("the artifact has no [batch, seq, hidden] output to pool")


def encode(artifact, sentences, batch_size: int = 32, normalize: bool | None = None,
           convert_to_tensor: bool = False, schedule: str | None = None) -> Any:
    """Sentence embeddings of ``sentences`` from a loaded artifact (see the module docstring).

    Returns a float32 ``numpy.ndarray`` ``[len(sentences), dim]`` (``[dim]`` for a single
    string), or a ``torch.Tensor`` when ``convert_to_tensor``. ``normalize=None`` follows
    the artifact (``manifest["embedding"]["normalize"]``).
    """
    import torch

    if batch_size < 1:
        raise LookupcInputError(f"batch_size must be >= 1, got {batch_size}")
    texts, single = _sentences(sentences)
    manifest = artifact.manifest
    tokenizer = artifact.tokenizer  # an artifact without one fails here, saying why
    if not manifest.get("embedding"):
        raise LookupcInputError(f"{artifact.path}: the manifest has no 'embedding' entry (the "
                                f"artifact was not compiled from a text model directory), so "
                                f"lookupc does not know how to pool its outputs")
    spec = EmbeddingSpec.from_dict(manifest["embedding"])
    max_length, static_b, static_s = _limits(manifest, spec, tokenizer)
    ids = _tokenize(tokenizer, texts, max_length)
    rows = (manifest.get("tokenizer") or {}).get("embedding_rows")
    top = max(max(r) for r in ids)
    if rows and top >= rows:
        raise LookupcInputError(f"token id {top} is past the model's {rows} embedding rows: "
                                f"the tokenizer does not match the model")
    names = manifest.get("program", {}).get("inputs", [])
    has_mask = any(e["name"] == "attention_mask" for e in names)
    if static_s and not has_mask and any(len(r) != static_s for r in ids):
        raise LookupcInputError(f"the artifact takes exactly {static_s} tokens and no attention "
                                f"mask, so texts cannot be padded to that length")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    if not has_mask:  # no mask: padding would change the result, so batch equal lengths only
        order.sort(key=lambda i: (-len(ids[i]), i))
    step = static_b or batch_size
    chunks, i = [], 0
    while i < len(order):
        chunk = order[i:i + step]
        if not has_mask:
            chunk = [j for j in chunk if len(ids[j]) == len(ids[chunk[0]])]
        chunks.append(chunk)
        i += len(chunk)
    result: list = [None] * len(ids)
    for chunk in chunks:
        rows_ = [ids[j] for j in chunk]
        if static_b:  # a static program takes exactly its compiled batch: repeat a real row
            rows_ += [rows_[0]] * (static_b - len(rows_))
        length = static_s or max(len(r) for r in rows_)
        inputs, mask = _batch_inputs(names, rows_, length, pad)
        outputs = artifact.run(*inputs, schedule=schedule)
        hidden = outputs[_output_index(manifest, spec, outputs)].float()
        emb = pool(hidden, mask, spec.pooling,
                   spec.normalize if normalize is None else normalize)
        for k, j in enumerate(chunk):
            result[j] = emb[k]
    out = torch.stack(result)
    if single:
        out = out[0]
    return out if convert_to_tensor else out.numpy()

