"""On-disk attention database for memoization: APMs in memory-mapped files, keys in faiss.

Layout of a database directory (one bucket per (layer, padded length L))::

    manifest.json                    written last; model fingerprint, every file with its hash
    apm_l{layer}_s{L}.bin            the bucket's APMs, back to back (float32 or float16): record i
                                     is [heads, n_i, n_i] at element offsets[i], n_i its real length
    meta_l{layer}_s{L}.safetensors   lengths, offsets, the similarity calibration knots, held-out
                                     near pairs (error margin) and the representative queries'
                                     predicted / true similarity (alpha)
    embed_l{layer}_s{L}.safetensors  the layer's embedder (``lookupc.memo.embed``)
    index_l{layer}_s{L}_n{n}.faiss   one index per real length n over that group's keys

**Real lengths.** A record is the APM of one sequence's ``n`` real tokens (``n <= L``;
``n = L`` for packed, unpadded sequences). A live sequence may use only a record of the
same real length, so each length group has its own index; a query searches the group of
its length only.

**Memory mapping.** APMs are opened with ``numpy.memmap(mode="c")``: the store can be
larger than RAM, and a hit reads only the pages of the records it uses.
``BucketData.apm`` is a zero-copy view of one record; ``BucketData.gather`` copies the
records of a batch's hits into one contiguous array at once (one numpy fancy-index
when all records of the bucket have one length) for a single batched ``APM @ V``.
float16 storage halves disk and page-cache use at the price of one conversion.

**Index.** Groups of up to ``FLAT_MAX`` records use an exact ``IndexFlatL2``; larger
ones ``IndexHNSWFlat`` (no training, high recall at sub-millisecond latency, what the
paper uses; IVF would need k-means training and pays off only for millions of keys).
Both return squared L2 distances, which the embedder turns into a predicted similarity.

**Integrity.** Every file's size and SHA-256 are in the manifest. ``MemoStore.open``
checks all sizes, the hashes of the small files, and for the (large) APM files the hash
of 17 sampled 64 KiB blocks (``verify="full"`` hashes them whole). A mismatch, a
missing or unreadable file, inconsistent offsets or an index of the wrong size raises
:class:`MemoDatabaseError`, so nothing is ever served from a damaged store.

**Atomic build.** ``StoreWriter`` writes into a hidden temp directory beside the
target and only ``finalize`` renames it into place after the manifest (written
last, with ``"complete": true``) is flushed. An exception inside the ``with``
block removes the temp directory; a killed process leaves only a
``.name.tmp-*`` directory without a manifest, which ``MemoStore.open`` refuses.

Size: the reader (``MemoStore``) and the writer (``StoreWriter``) of the one on-disk
format described above; the file names, manifest fields and integrity hashes are defined
here once, so the two sides cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookupc.errors import LookupcInputError
from lookupc.extras import require

__all__ = ["FORMAT", "FLAT_MAX", "MemoDatabaseError", "ModelFingerprint", "MemoStore", "StoreWriter",
           "BucketData", "LengthGroup", "new_index"]

FORMAT = "lookupc-attention-memo/2"
MANIFEST = "manifest.json"
FLAT_MAX = 4096
_DTYPES = {"float32": np.float32, "float16": np.float16}
_SAMPLE_BLOCKS, _BLOCK = 17, 1 << 16


class MemoDatabaseError(LookupcInputError):
    """The attention database is missing, incomplete, corrupt or built for another model or length."""


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


def new_index(dim: int, count: int, m: int = 32):
    """An empty index for ``count`` keys of width ``dim``: exact flat up to ``FLAT_MAX``, else HNSW."""
    faiss = require("faiss", "the attention-memo store")

    if count <= FLAT_MAX:
        return faiss.IndexFlatL2(dim)
    index = faiss.IndexHNSWFlat(dim, m)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = 64
    return index


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sample_sha256(path: Path) -> str:
    """SHA-256 of the file size and ``_SAMPLE_BLOCKS`` evenly spaced 64 KiB blocks (first and last included)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    starts = sorted({int(x) for x in np.linspace(0, max(0, size - _BLOCK), _SAMPLE_BLOCKS)})
    with open(path, "rb") as fh:
        for s in starts:
            fh.seek(s)
            h.update(fh.read(_BLOCK))
    return h.hexdigest()


@dataclass
class LengthGroup:
    """The records of one real length ``n`` in a bucket: their record ids and their index."""

    n: int
    ids: np.ndarray
    index: Any


@dataclass
class BucketData:
    """One (layer, padded length) entry of an open store."""

    layer: int
    seq_len: int
    count: int
    heads: int
    lengths: np.ndarray
    offsets: np.ndarray
    flat: np.memmap
    embedder: Any
    groups: dict[int, LengthGroup]
    calibration: Any
    alpha_predicted: np.ndarray
    alpha_true: np.ndarray
    info: dict
    heldout_predicted: np.ndarray = field(default_factory=lambda: np.zeros(0))  # near pairs for the error margin
    heldout_true: np.ndarray = field(default_factory=lambda: np.zeros(0))
    uniform: np.ndarray | None = field(default=None, repr=False)  # [N, heads, L, L] view when all n == L

    def __post_init__(self) -> None:
        if self.count and (self.lengths == self.lengths[0]).all():
            n = int(self.lengths[0])
            self.uniform = self.flat.reshape(self.count, self.heads, n, n)

    @property
    def apms(self) -> np.ndarray:
        """``[N, heads, L, L]`` view of all records (only when every record has the same length)."""
        if self.uniform is None:
            raise LookupcInputError("this bucket holds records of several real lengths; use apm(i) or gather()")
        return self.uniform

    def margin(self, quantile: float | None) -> float:
        """``lookupc.memo.calib.error_margin`` of this bucket's held-out near pairs."""
        from lookupc.memo.calib import error_margin

        return error_margin(self.calibration, self.heldout_predicted, self.heldout_true, quantile)

    def apm(self, record: int) -> np.ndarray:
        """The stored APM ``[heads, n, n]`` of ``record``: a view of the mapped file, no copy.

        Mapped copy-on-write (``mode="c"``) so torch accepts it as a tensor without a copy;
        nothing ever writes to it, so the file is never modified.
        """
        n, off = int(self.lengths[record]), int(self.offsets[record])
        return self.flat[off:off + self.heads * n * n].reshape(self.heads, n, n)

    def gather(self, records) -> np.ndarray:
        """The APMs of ``records`` (all of one real length) as one contiguous ``[k, heads, n, n]`` array."""
        records = np.asarray(records, dtype=np.int64)
        if self.uniform is not None:
            return self.uniform[records]
        n = int(self.lengths[records[0]])
        if (self.lengths[records] != n).any():
            raise LookupcInputError("gather() needs records of one real length")
        out = np.empty((len(records), self.heads, n, n), dtype=self.flat.dtype)
        for k, r in enumerate(records.tolist()):
            out[k] = self.apm(r)
        return out


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
    def open(cls, path: str | os.PathLike, expect: ModelFingerprint | None = None,
             verify: str = "quick") -> "MemoStore":
        """Open a finished database; refuse incomplete, corrupt or (with ``expect``) mismatched ones.

        ``verify``: ``"quick"`` (sizes, hashes of the small files, sampled hash of the APM files),
        ``"full"`` (whole-file hashes of everything) or ``"none"`` (sizes only).
        """
        if verify not in ("quick", "full", "none"):
            raise LookupcInputError(f"verify must be 'quick', 'full' or 'none', got {verify!r}")
        path = Path(path)
        manifest = _read_manifest(path)
        buckets = {}
        try:
            for entry in manifest["buckets"]:
                b = _open_bucket(path, manifest, entry, verify)
                buckets[(b.layer, b.seq_len)] = b
            store = cls(path, manifest, buckets)
        except MemoDatabaseError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
            raise MemoDatabaseError(f"attention database {str(path)!r} is corrupt: {type(exc).__name__}: {exc}") \
                from exc
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemoDatabaseError(f"cannot read {str(mf)!r}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("complete") is not True:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        done = manifest.get("complete") if isinstance(manifest, dict) else None
        hint = "; rebuild it with this version" if isinstance(fmt, str) and fmt.startswith("lookupc-attention-memo/") \
            else ""
        raise MemoDatabaseError(f"{str(mf)!r} has format {fmt!r} (complete={done!r}); expected {FORMAT!r}, "
                                f"complete{hint}")
    return manifest


def _check_file(path: Path, spec: dict, verify: str, large: bool) -> Path:
    f = path / spec["name"]
    if not f.is_file():
        raise MemoDatabaseError(f"{str(f)!r} is missing")
    if f.stat().st_size != spec["bytes"]:
        raise MemoDatabaseError(f"{str(f)!r} has {f.stat().st_size} bytes, expected {spec['bytes']}")
    if verify == "full" or (verify == "quick" and not large):
        if file_sha256(f) != spec["sha256"]:
            raise MemoDatabaseError(f"{str(f)!r} is corrupt (SHA-256 differs from the manifest)")
    elif verify == "quick" and sample_sha256(f) != spec["sample_sha256"]:
        raise MemoDatabaseError(f"{str(f)!r} is corrupt (sampled SHA-256 differs from the manifest)")
    return f


def _open_bucket(path: Path, manifest: dict, entry: dict, verify: str) -> BucketData:
    faiss = require("faiss", "the attention-memo store")
    import torch
    from safetensors.numpy import load_file as load_np
    from safetensors.torch import load_file

    from lookupc.memo.calib import SimilarityCalibration
    from lookupc.memo.embed import EmbedConfig, HiddenStateEmbedder

    layer, seq_len, count, heads = entry["layer"], entry["seq_len"], entry["count"], entry["heads"]
    files = entry["files"]
    dtype = np.dtype(_DTYPES[manifest["apm_dtype"]])
    meta = load_np(str(_check_file(path, files["meta"], verify, large=False)))
    lengths, offsets = meta["lengths"].astype(np.int64), meta["offsets"].astype(np.int64)
    where = f"bucket layer {layer} L={seq_len}"
    if lengths.shape != (count,) or offsets.shape != (count,) or (lengths < 1).any() or (lengths > seq_len).any():
        raise MemoDatabaseError(f"{where}: lengths/offsets do not describe {count} records of length <= {seq_len}")
    sizes = heads * lengths * lengths
    if count and (offsets != np.concatenate([[0], np.cumsum(sizes)[:-1]])).any():
        raise MemoDatabaseError(f"{where}: record offsets are inconsistent")
    total = int(sizes.sum())
    if files["apm"]["bytes"] != total * dtype.itemsize:
        raise MemoDatabaseError(f"{where}: manifest APM size {files['apm']['bytes']} != {total * dtype.itemsize}")
    apm_file = _check_file(path, files["apm"], verify, large=True)
    flat = np.memmap(apm_file, dtype=dtype, mode="c", shape=(total,))
    cfg = EmbedConfig.from_dict(manifest["embed_config"])
    embedder = HiddenStateEmbedder(seq_len, manifest["fingerprint"]["hidden_size"], cfg)
    state = load_file(str(_check_file(path, files["embed"], verify, large=False)))
    embedder.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    embedder.eval()
    groups = {}
    for g in entry["groups"]:
        n = int(g["n"])
        ids = np.flatnonzero(lengths == n)
        index = faiss.read_index(str(_check_file(path, files[f"index_n{n}"], verify, large=False)))
        if index.ntotal != len(ids) or index.d != n * embedder.token_dim:
            raise MemoDatabaseError(f"{where}: index for length {n} holds {index.ntotal} keys of width {index.d}, "
                                    f"expected {len(ids)} of width {n * embedder.token_dim}")
        groups[n] = LengthGroup(n, ids, index)
    if sorted(groups) != sorted(set(lengths.tolist())):
        raise MemoDatabaseError(f"{where}: the length groups do not cover the records")
    calibration = SimilarityCalibration.from_arrays(meta)
    return BucketData(layer, seq_len, count, heads, lengths, offsets, flat, embedder, groups, calibration,
                      meta["alpha_predicted"].astype(np.float64), meta["alpha_true"].astype(np.float64), entry,
                      meta["heldout_predicted"].astype(np.float64), meta["heldout_true"].astype(np.float64))


def _file_spec(path: Path, large: bool) -> dict:
    spec = dict(name=path.name, bytes=path.stat().st_size, sha256=file_sha256(path))
    if large:
        spec["sample_sha256"] = sample_sha256(path)
    return spec


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

    def apm_array(self, layer: int, seq_len: int, lengths: np.ndarray, heads: int) -> tuple[np.memmap, np.ndarray]:
        """A writable flat memmap for the APMs of one bucket's records (real lengths ``lengths``) and
        the element offset of each record in it."""
        lengths = np.asarray(lengths, dtype=np.int64)
        sizes = heads * lengths * lengths
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes
        arr = np.memmap(self.tmp / f"apm_{bucket_stem(layer, seq_len)}.bin", dtype=_DTYPES[self.apm_dtype],
                        mode="w+", shape=(max(1, int(sizes.sum())),))
        self._arrays.append(arr)
        return arr, offsets

    def scratch_array(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.memmap:
        """A writable memmap under ``scratch/`` (deleted by ``finalize``), e.g. captured hidden states."""
        (self.tmp / "scratch").mkdir(exist_ok=True)
        arr = np.memmap(self.tmp / "scratch" / f"{name}.bin", dtype=dtype, mode="w+",
                        shape=tuple(max(1, s) for s in shape))
        self._arrays.append(arr)
        return arr

    def add_bucket(self, layer: int, seq_len: int, heads: int, lengths: np.ndarray, embedder,
                   indexes: dict[int, Any], meta: dict[str, np.ndarray], info: dict) -> None:
        """Write the embedder, per-length indexes and metadata of a bucket whose APMs are filled in."""
        faiss = require("faiss", "the attention-memo store")
        from safetensors.numpy import save_file as save_np
        from safetensors.torch import save_file

        stem = bucket_stem(layer, seq_len)
        apm_path = self.tmp / f"apm_{stem}.bin"
        for arr in [a for a in self._arrays if Path(a.filename) == apm_path]:
            arr.flush()
        self._arrays = [a for a in self._arrays if Path(a.filename) != apm_path]
        lengths = np.asarray(lengths, dtype=np.int64)
        total = int((heads * lengths * lengths).sum())
        os.truncate(apm_path, total * np.dtype(_DTYPES[self.apm_dtype]).itemsize)
        files = {"apm": _file_spec(apm_path, large=True)}
        sizes = heads * lengths * lengths
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes
        meta = dict(meta, lengths=lengths, offsets=offsets)
        save_np({k: np.ascontiguousarray(v) for k, v in meta.items()}, str(self.tmp / f"meta_{stem}.safetensors"))
        files["meta"] = _file_spec(self.tmp / f"meta_{stem}.safetensors", large=False)
        save_file({k: v.contiguous() for k, v in embedder.state_dict().items()},
                  str(self.tmp / f"embed_{stem}.safetensors"))
        files["embed"] = _file_spec(self.tmp / f"embed_{stem}.safetensors", large=False)
        groups = []
        for n, index in sorted(indexes.items()):
            p = self.tmp / f"index_{stem}_n{n}.faiss"
            faiss.write_index(index, str(p))
            files[f"index_n{n}"] = _file_spec(p, large=False)
            groups.append(dict(n=int(n), count=int(index.ntotal)))
        self.buckets.append(dict(layer=layer, seq_len=seq_len, count=int(len(lengths)), heads=heads, groups=groups,
                                 files=files, **info))

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
