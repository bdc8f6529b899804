"""On-disk attention database for memoization: APMs in memory-mapped files, keys in faiss.

Layout of a database directory (one entry per (layer, sequence-length bucket))::

    manifest.json               written last; names the model fingerprint and every file
    apm_l{layer}_s{L}.bin       raw numpy.memmap [N, heads, L, L] (float32 or float16)
    index_l{layer}_s{L}.faiss   faiss HNSW index over the N embeddings
    embed_l{layer}_s{L}.safetensors  the layer's embedder weights
    loo_l{layer}_s{L}.npy       [2, N]: leave-one-out predicted / true similarity (perf model)

**Memory mapping.** APMs are opened with ``numpy.memmap(mode="r")``: the store can be
larger than RAM, and a hit reads only the pages of the one record it uses. With
float32 storage, ``torch.from_numpy(store.apm(...))`` is a zero-copy view of the
mapped pages that feeds the ``APM @ V`` matmul directly — the Python analogue of the
paper's page remapping (section 5.3); float16 storage halves disk and page-cache
use at the price of one conversion per hit.

**Index: HNSW, not IVF.** ``faiss.IndexHNSWFlat`` needs no training, so it works
for the small per-layer calibration sets used here (IVF must train k-means
centroids and wants ~40 points per centroid; with a few hundred to a few thousand
keys per layer it would either have a handful of lists or warn about too little
data), gives high recall at sub-millisecond latency for 128-d keys, returns exact
L2 distances to the found neighbour (which is what the threshold reads), and is
what the paper uses. IVF pays off only for stores of millions of keys per layer,
where its smaller memory per key matters; switching is a one-line change in
``new_index``.

**Atomic build.** ``StoreWriter`` writes into a hidden temp directory beside the
target and only ``finalize`` renames it into place after the manifest (written
last, with ``"complete": true``) is flushed. An exception inside the ``with``
block removes the temp directory; a killed process leaves only a
``.name.tmp-*`` directory without a manifest, which ``MemoStore.open`` refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookupc.errors import LookupcInputError
from lookupc.extras import require

__all__ = ["FORMAT", "MemoDatabaseError", "ModelFingerprint", "MemoStore", "StoreWriter", "BucketData"]

FORMAT = "lookupc-attention-memo/1"
MANIFEST = "manifest.json"
_DTYPES = {"float32": np.float32, "float16": np.float16}


class MemoDatabaseError(LookupcInputError):
    """The attention database is missing, incomplete, corrupt or built for another model."""


@dataclass(frozen=True)
class ModelFingerprint:
    """What a database must agree with before it may serve a model.

    ``qk_hash`` is a SHA-256 over the query/key weights and biases of every
    self-attention layer, in order: the parameters that turn a layer's hidden
    state into its APM. FFN weights are deliberately left out so that a database
    built on the dense model also serves the same model after the LookupFFN pass
    (its hidden states move slightly; the embedding threshold guards quality).
    """

    model_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    qk_hash: str

    def mismatches(self, other: "ModelFingerprint") -> list[str]:
        """Human-readable differences that make ``other`` (the live model) incompatible."""
        out = []
        for name in ("num_layers", "hidden_size", "num_heads"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: database has {a}, model has {b}")
        if not out and self.qk_hash != other.qk_hash:
            out.append(f"attention weights differ (database built for {self.model_id!r} "
                       f"hash {self.qk_hash[:12]}, model {other.model_id!r} hash {other.qk_hash[:12]})")
        return out


def hash_tensors(tensors) -> str:
    """SHA-256 of the float32 bytes and shapes of a sequence of tensors."""
    h = hashlib.sha256()
    for t in tensors:
        arr = t.detach().to("cpu").float().contiguous().numpy()
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def bucket_stem(layer: int, seq_len: int) -> str:
    return f"l{layer}_s{seq_len}"


def new_index(dim: int, m: int = 32):
    """An empty HNSW index (L2) for ``dim``-wide keys; see the module docstring for why HNSW."""
    faiss = require("faiss", "the attention-memo store")

    index = faiss.IndexHNSWFlat(dim, m)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = 64
    return index


@dataclass
class BucketData:
    """One (layer, length) entry of an open store."""

    layer: int
    seq_len: int
    count: int
    heads: int
    apms: np.memmap
    index: Any
    embedder: Any
    loo: np.ndarray
    info: dict

    def apm(self, record: int) -> np.ndarray:
        """The stored APM ``[heads, L, L]`` of ``record``: a view of the mapped file, no copy.

        Mapped copy-on-write (``mode="c"``) so torch accepts it as a tensor without a copy;
        nothing ever writes to it, so the file is never modified.
        """
        return self.apms[record]


class MemoStore:
    """A read-only, opened attention database. Use ``MemoStore.open(path)``."""

    def __init__(self, path: Path, manifest: dict, buckets: dict[tuple[int, int], BucketData]):
        self.path = path
        self.manifest = manifest
        self.fingerprint = ModelFingerprint(**manifest["fingerprint"])
        self.buckets = buckets

    def __deepcopy__(self, memo):  # shared read-only resource: copies of a model share one store
        return self

    def __repr__(self) -> str:
        return f"MemoStore({str(self.path)!r}, layers={self.fingerprint.num_layers}, buckets={sorted(self.buckets)})"

    @property
    def seq_lens(self) -> list[int]:
        return sorted({L for _, L in self.buckets})

    def bucket(self, layer: int, seq_len: int) -> BucketData | None:
        return self.buckets.get((layer, seq_len))

    def check(self, live: ModelFingerprint) -> None:
        """Raise ``MemoDatabaseError`` naming every difference between this store and ``live``."""
        problems = self.fingerprint.mismatches(live)
        if problems:
            raise MemoDatabaseError(
                f"attention database {str(self.path)!r} does not match the model: " + "; ".join(problems))

    @classmethod
    def open(cls, path: str | os.PathLike, expect: ModelFingerprint | None = None) -> "MemoStore":
        """Open a finished database; refuse incomplete, corrupt or (with ``expect``) mismatched ones."""
        path = Path(path)
        manifest = _read_manifest(path)
        buckets = {}
        for entry in manifest["buckets"]:
            b = _open_bucket(path, manifest, entry)
            buckets[(b.layer, b.seq_len)] = b
        store = cls(path, manifest, buckets)
        if expect is not None:
            store.check(expect)
        return store


def _read_manifest(path: Path) -> dict:
    mf = path / MANIFEST
    if not path.is_dir():
        raise MemoDatabaseError(f"attention database {str(path)!r} does not exist or is not a directory")
    if not mf.is_file():
        raise MemoDatabaseError(f"{str(path)!r} is not a finished attention database (no {MANIFEST}; "
                                "an interrupted build never has one)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MemoDatabaseError(f"cannot read {str(mf)!r}: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("complete") is not True:
        raise MemoDatabaseError(f"{str(mf)!r} has format {manifest.get('format')!r} "
                                f"(complete={manifest.get('complete')!r}); expected {FORMAT!r}, complete")
    return manifest


def _open_bucket(path: Path, manifest: dict, entry: dict) -> BucketData:
    faiss = require("faiss", "the attention-memo store")
    from safetensors.torch import load_file

    from lookupc.memo_embed import EmbedConfig, HiddenStateEmbedder

    layer, seq_len, count, heads = entry["layer"], entry["seq_len"], entry["count"], entry["heads"]
    dtype = np.dtype(_DTYPES[manifest["apm_dtype"]])
    apm_file = path / entry["apm_file"]
    expected = count * heads * seq_len * seq_len * dtype.itemsize
    if not apm_file.is_file() or apm_file.stat().st_size != expected:
        size = apm_file.stat().st_size if apm_file.is_file() else None
        raise MemoDatabaseError(f"{str(apm_file)!r} is missing or has {size} bytes, expected {expected}")
    apms = np.memmap(apm_file, dtype=dtype, mode="c", shape=(count, heads, seq_len, seq_len))
    index = faiss.read_index(str(path / entry["index_file"]))
    if index.ntotal != count:
        raise MemoDatabaseError(f"index {entry['index_file']!r} holds {index.ntotal} keys, expected {count}")
    fp = manifest["fingerprint"]
    embedder = HiddenStateEmbedder(seq_len, fp["hidden_size"], EmbedConfig(**manifest["embed_config"]))
    embedder.load_state_dict(load_file(str(path / entry["embed_file"])))
    embedder.eval()
    loo = np.load(path / entry["loo_file"])
    return BucketData(layer, seq_len, count, heads, apms, index, embedder, loo, entry)


class StoreWriter:
    """Build a database in a temp directory; ``finalize`` renames it to ``out_dir`` atomically.

    Use as a context manager: leaving the block by an exception deletes the temp directory.

    Parameters
    ----------
    out_dir : path
        Final location. Must not exist unless ``overwrite``.
    apm_dtype : {"float32", "float16"}
        Storage type of APMs.
    overwrite : bool
        Replace an existing database at ``out_dir`` (the old one stays until the new one is in place).
    """

    def __init__(self, out_dir: str | os.PathLike, apm_dtype: str = "float32", overwrite: bool = False):
        if apm_dtype not in _DTYPES:
            raise LookupcInputError(f"apm_dtype must be one of {sorted(_DTYPES)}, got {apm_dtype!r}")
        self.out_dir = Path(out_dir).resolve()
        if self.out_dir.exists() and not overwrite:
            raise LookupcInputError(f"output {str(self.out_dir)!r} exists; pass overwrite=True to replace it")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self.apm_dtype = apm_dtype
        self.buckets: list[dict] = []
        self._arrays: list[np.memmap] = []

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():  # not finalized: an error, or the caller forgot finalize
            self._arrays.clear()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def apm_array(self, layer: int, seq_len: int, count: int, heads: int) -> np.memmap:
        """A writable memmap ``[count, heads, L, L]`` for the APMs of one bucket."""
        arr = np.memmap(self.tmp / f"apm_{bucket_stem(layer, seq_len)}.bin", dtype=_DTYPES[self.apm_dtype],
                        mode="w+", shape=(count, heads, seq_len, seq_len))
        self._arrays.append(arr)
        return arr

    def scratch_array(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.memmap:
        """A writable memmap under ``scratch/`` (deleted by ``finalize``), e.g. captured hidden states."""
        (self.tmp / "scratch").mkdir(exist_ok=True)
        arr = np.memmap(self.tmp / "scratch" / f"{name}.bin", dtype=dtype, mode="w+", shape=shape)
        self._arrays.append(arr)
        return arr

    def add_bucket(self, layer: int, seq_len: int, count: int, heads: int, index, embedder,
                   loo: np.ndarray, info: dict) -> None:
        """Write the index, embedder and leave-one-out data of a bucket whose APMs are filled in."""
        faiss = require("faiss", "the attention-memo store")
        from safetensors.torch import save_file

        stem = bucket_stem(layer, seq_len)
        self._shrink(self.tmp / f"apm_{stem}.bin", count, heads, seq_len)
        faiss.write_index(index, str(self.tmp / f"index_{stem}.faiss"))
        save_file({k: v.contiguous() for k, v in embedder.state_dict().items()},
                  str(self.tmp / f"embed_{stem}.safetensors"))
        np.save(self.tmp / f"loo_{stem}.npy", loo)
        self.buckets.append(dict(layer=layer, seq_len=seq_len, count=count, heads=heads,
                                 apm_file=f"apm_{stem}.bin", index_file=f"index_{stem}.faiss",
                                 embed_file=f"embed_{stem}.safetensors", loo_file=f"loo_{stem}.npy", **info))

    def _shrink(self, path: Path, count: int, heads: int, seq_len: int) -> None:
        """Cut an APM file to ``count`` records (some calibration sequences were skipped)."""
        size = count * heads * seq_len * seq_len * np.dtype(_DTYPES[self.apm_dtype]).itemsize
        if path.stat().st_size > size:
            for arr in [a for a in self._arrays if Path(a.filename) == path]:
                arr.flush()
                self._arrays.remove(arr)
            os.truncate(path, size)

    def finalize(self, fingerprint: ModelFingerprint, embed_config: dict, extra: dict | None = None) -> Path:
        """Flush everything, write the manifest last, then rename the temp dir to ``out_dir``."""
        for arr in self._arrays:
            arr.flush()
        self._arrays.clear()
        shutil.rmtree(self.tmp / "scratch", ignore_errors=True)
        manifest = dict(format=FORMAT, complete=True, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        fingerprint=asdict(fingerprint), apm_dtype=self.apm_dtype, embed_config=embed_config,
                        buckets=self.buckets, **(extra or {}))
        with open(self.tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        old = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir
