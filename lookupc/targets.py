"""Compilation targets: parse target strings into TVM target dicts, and check the host.

TVM 0.27 dropped the string form of targets (``"llvm -mcpu=znver2"``); targets are
dicts such as ``{"kind": "llvm", "mcpu": "znver2", "mtriple": "x86_64-linux-gnu"}``.
This module accepts the familiar string form and turns it into that dict, validating
every part against the LLVM that TVM ships::

    "llvm -mcpu=znver2"
    "llvm -mcpu=skylake-avx512 -mattr=+avx512f"
    "llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1"
    "host"  (or no target at all): this machine's triple and CPU

:func:`can_execute` says whether code compiled for a target runs on this machine:
the same architecture, and every instruction-set extension the target enables is
present in this CPU (read from ``/proc/cpuinfo`` where it exists, else from LLVM's
description of the host CPU). Tuning-only LLVM features (``fast-lzcnt`` ...) are not
instructions and are not compared.

Only ``lookupc.tvm_shim``-style TVM calls live here (``tvm.target.codegen``); TVM is
imported lazily so that parsing errors need no TVM start-up.

Size: parsing and the host check are one concern: both query LLVM's feature lists
(``_features_for``, ``_cpu_features``) for the same triples, and :func:`can_execute`
compares the ISA table's part of the features a parsed :class:`TargetSpec` enables.
"""

from __future__ import annotations

import difflib
import functools
import os
import platform
import shlex
from dataclasses import dataclass, field

from .errors import LookupcInputError

__all__ = ["TargetSpec", "parse_target", "host_target", "can_execute", "host_report",
           "ACCEPTED_KEYS"]

# target-string keys -> what they mean (the accepted set; TVM's llvm kind knows more, but
# these are the ones that change which instructions the kernels use or how many threads)
ACCEPTED_KEYS = {
    "mcpu": "LLVM CPU name, e.g. znver2, skylake-avx512, neoverse-n1 (or 'native')",
    "mattr": "comma-separated LLVM features, each +name or -name, e.g. +avx512f,-avx2",
    "mtriple": "LLVM target triple, e.g. x86_64-linux-gnu, aarch64-linux-gnu",
    "num-cores": "threads the kernels are tuned for (default: this machine's cores)",
}
_KINDS = ("llvm",)
_HOST_WORDS = ("host", "native")

# LLVM feature -> /proc/cpuinfo flag, for instruction-set extensions only.
_X86_ISA = {
    "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1",
    "sse4.2": "sse4_2", "sse4a": "sse4a", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "fma4": "fma4", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "popcnt": "popcnt",
    "lzcnt": "abm", "movbe": "movbe", "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni",
    "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "gfni": "gfni", "adx": "adx",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw",
    "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni",
    "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8",
}
_AARCH64_ISA = {
    "neon": "asimd", "fp-armv8": "fp", "crc": "crc32", "aes": "aes", "sha2": "sha2",
    "sve": "sve", "sve2": "sve2", "dotprod": "asimddp", "fullfp16": "fphp", "bf16": "bf16",
    "i8mm": "i8mm", "lse": "atomics", "rcpc": "lrcpc",
}
_ISA = {"x86_64": _X86_ISA, "aarch64": _AARCH64_ISA}
_ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class TargetSpec:
    """A validated CPU target.

    Attributes
    ----------
    kind : str
        Always ``"llvm"`` (CPU code through LLVM).
    mtriple : str
        LLVM triple (the host's when the string named none).
    mcpu : str or None
        LLVM CPU name; ``None`` means LLVM's generic CPU for the triple.
    mattr : tuple of str
        Extra features, each ``+name`` or ``-name``.
    num_cores : int or None
        Threads the kernels are tuned for; None (not stated) for a cross-compiled target
        given without ``-num-cores``.
    text : str
        The target string this spec was parsed from (normalised).
    """

    kind: str
    mtriple: str
    mcpu: str | None
    mattr: tuple[str, ...] = ()
    num_cores: int | None = 1
    text: str = field(default="", compare=False)

    @property
    def arch(self) -> str:
        """Architecture part of the triple, normalised (``x86_64``, ``aarch64``, ...)."""
        return _arch_of(self.mtriple)

    def to_dict(self) -> dict:
        """The TVM target dict (``tvm.target.Target(spec.to_dict())``)."""
        d: dict = {"kind": self.kind, "mtriple": self.mtriple}
        if self.num_cores is not None:
            d["num-cores"] = self.num_cores
        if self.mcpu:
            d["mcpu"] = self.mcpu
        if self.mattr:
            d["mattr"] = list(self.mattr)
        return d

    def to_tvm(self):
        """A ``tvm.target.Target`` for this spec (imports TVM)."""
        import tvm

        return tvm.target.Target(self.to_dict())

    def __str__(self) -> str:
        parts = [self.kind, f"-mtriple={self.mtriple}"]
        if self.mcpu:
            parts.append(f"-mcpu={self.mcpu}")
        if self.mattr:
            parts.append(f"-mattr={','.join(self.mattr)}")
        if self.num_cores is not None:
            parts.append(f"-num-cores={self.num_cores}")
        return " ".join(parts)

    @classmethod
    def from_dict(cls, d: dict) -> "TargetSpec":
        """Inverse of :meth:`to_dict` (used when reading an artifact manifest)."""
        spec = cls(kind=d["kind"], mtriple=d["mtriple"], mcpu=d.get("mcpu"),
                   mattr=tuple(d.get("mattr", ())),
                   num_cores=int(d["num-cores"]) if "num-cores" in d else None)
        return spec


def _arch_of(triple: str) -> str:
    arch = triple.split("-", 1)[0].lower()
    return _ARCH_ALIASES.get(arch, arch)


def _codegen():
    from tvm.target import codegen

    return codegen


def _default_cores() -> int:
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def _host_triple() -> str:
    """LLVM's triple for this machine, without the vendor of the toolchain TVM was built
    with (``x86_64-conda-linux-gnu`` -> ``x86_64-linux-gnu``): an artifact's target should
    name the machine, not how its compiler was packaged."""
    parts = str(_codegen().llvm_get_system_triple()).split("-")
    if len(parts) == 4 and parts[1] in ("conda", "pc", "unknown"):
        parts.pop(1)
    return "-".join(parts)


@functools.lru_cache(maxsize=None)
def _host_cpu() -> str:
    return str(_codegen().llvm_get_system_cpu())


@functools.lru_cache(maxsize=None)
def _cpus_for(triple: str) -> tuple[str, ...]:
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mtriple": triple})
    return tuple(sorted(set(map(str, _codegen().llvm_get_cpu_archlist(target)))))


@functools.lru_cache(maxsize=None)
def _cpu_features(triple: str, cpu: str | None, mattr: tuple[str, ...] = ()) -> frozenset:
    import tvm

    d: dict = {"kind": "llvm", "mtriple": triple}
    if cpu:
        d["mcpu"] = cpu
    if mattr:
        d["mattr"] = list(mattr)
    return frozenset(map(str, _codegen().llvm_get_cpu_features(tvm.target.Target(d))))


@functools.lru_cache(maxsize=None)
def _features_for(triple: str) -> frozenset:
    """Every feature name LLVM knows for ``triple`` (the union over its CPUs)."""
    names: set[str] = set()
    for cpu in _cpus_for(triple):
        names |= _cpu_features(triple, cpu)
    return frozenset(names)


def _fail(msg: str) -> None:
    raise LookupcInputError(msg)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _split(text: str) -> tuple[str, dict[str, str]]:
    """Split ``"llvm -a=b -c=d"`` into the kind and ``{a: b, c: d}``; check the keys."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        _fail(f"bad target string {text!r}: {err}")
    if not words:
        _fail("empty target string; give e.g. 'llvm -mcpu=znver2' or 'host'")
    kind, opts = words[0], {}
    if kind not in _KINDS:
        _fail(f"unknown target kind {kind!r} in {text!r}; accepted kinds: "
              f"{', '.join(_KINDS)} (CPU code), or 'host'")
    for word in words[1:]:
        key, eq, value = word.lstrip("-").partition("=")
        if not word.startswith("-") or not eq or not value:
            _fail(f"bad target option {word!r} in {text!r}: write -key=value "
                  f"(accepted keys: {', '.join('-' + k for k in ACCEPTED_KEYS)})")
        if key not in ACCEPTED_KEYS:
            _fail(f"unknown target option -{key} in {text!r}{_suggest(key, ACCEPTED_KEYS)}; "
                  f"accepted: " + "; ".join(f"-{k} ({v})" for k, v in ACCEPTED_KEYS.items()))
        if key in opts:
            _fail(f"target option -{key} given twice in {text!r}")
        opts[key] = value
    return kind, opts


def _check_triple(triple: str) -> None:
    known = set(map(str, _codegen().llvm_get_targets()))
    arch = triple.split("-", 1)[0]
    if arch not in known and _arch_of(triple) not in known:
        _fail(f"unknown architecture {arch!r} in -mtriple={triple}; this LLVM accepts: "
              f"{', '.join(sorted(known))}")


def _check_cpu(cpu: str, triple: str) -> None:
    cpus = _cpus_for(triple)
    if cpu not in cpus and not _codegen().llvm_is_valid_cpu(cpu, triple):
        _fail(f"unknown CPU -mcpu={cpu} for {triple}{_suggest(cpu, cpus)}; accepted: "
              f"{', '.join(cpus)}")


def _parse_mattr(value: str, triple: str) -> tuple[str, ...]:
    known = _features_for(triple)
    out = []
    for item in (v.strip() for v in value.split(",")):
        if len(item) < 2 or item[0] not in "+-":
            _fail(f"bad -mattr item {item!r}: write +feature or -feature, e.g. +avx512f")
        if item[1:] not in known:
            _fail(f"unknown feature {item[1:]!r} in -mattr for {triple}"
                  f"{_suggest(item[1:], known)}; accepted: {', '.join(sorted(known))}")
        out.append(item)
    return tuple(out)


def _parse_cores(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        _fail(f"bad -num-cores={value}: must be a positive integer")
    return int(value)


def host_target(num_cores: int | None = None) -> TargetSpec:
    """This machine: its LLVM triple and CPU name (``llvm_get_system_cpu``)."""
    cores = num_cores or _default_cores()
    spec = TargetSpec("llvm", _host_triple(), _host_cpu(), (), cores, "")
    return _with_text(spec)


def _with_text(spec: TargetSpec) -> TargetSpec:
    return TargetSpec(spec.kind, spec.mtriple, spec.mcpu, spec.mattr, spec.num_cores, str(spec))


def parse_target(text: str | dict | TargetSpec | None) -> TargetSpec:
    """Parse a target string (or a TVM target dict) into a validated :class:`TargetSpec`.

    Parameters
    ----------
    text : str, dict, TargetSpec or None
        ``None``, ``"host"`` or ``"native"`` mean this machine. A string is
        ``"llvm"`` followed by ``-key=value`` options (keys in :data:`ACCEPTED_KEYS`).
        Without ``-mtriple`` the host's triple is used; ``-mcpu=native`` is the host CPU.

    Raises
    ------
    LookupcInputError
        For an unknown kind, key, architecture, CPU or feature; the message lists what
        is accepted.

    Examples
    --------
    >>> parse_target("llvm -mcpu=znver2").to_dict()["mcpu"]
    'znver2'
    """
    if isinstance(text, TargetSpec):
        return text
    if isinstance(text, dict):
        return parse_target(_dict_to_text(text))
    if text is None or text.strip().lower() in _HOST_WORDS:
        return host_target()
    kind, opts = _split(text.strip())
    triple = opts.get("mtriple") or _host_triple()
    _check_triple(triple)
    cpu = opts.get("mcpu")
    if cpu == "native":
        if _arch_of(triple) != _arch_of(_host_triple()):
            _fail(f"-mcpu=native means this machine's CPU, which cannot build for {triple}")
        cpu = _host_cpu()
    if cpu:
        _check_cpu(cpu, triple)
    mattr = _parse_mattr(opts["mattr"], triple) if "mattr" in opts else ()
    if "num-cores" in opts:
        cores = _parse_cores(opts["num-cores"])
    elif _arch_of(triple) == _arch_of(_host_triple()):
        cores = _default_cores()
    else:  # cross-compiling: this machine's core count says nothing about the target's
        cores = None
    return _with_text(TargetSpec(kind, triple, cpu, mattr, cores))


def _dict_to_text(d: dict) -> str:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind is None:
        _fail(f"target dict {d!r} has no 'kind'")
    parts = [str(kind)]
    for key, value in d.items():
        if key in ("keys", "tag"):
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        parts.append(f"-{key}={value}")
    return " ".join(parts)


@functools.lru_cache(maxsize=None)
def _cpuinfo_flags() -> frozenset | None:
    """ISA flags of this CPU from /proc/cpuinfo (x86 'flags', arm 'Features'); None if absent."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def _host_arch() -> str:
    try:
        return _arch_of(_host_triple())
    except Exception:  # noqa: BLE001 -- TVM missing: fall back to Python's view
        return _ARCH_ALIASES.get(platform.machine().lower(), platform.machine().lower())


def _host_has(feature: str, arch: str) -> bool:
    """Whether this CPU has ISA extension ``feature`` (an LLVM name in the ISA table)."""
    flags = _cpuinfo_flags()
    flag = _ISA.get(arch, {}).get(feature)
    if flags is not None and flag is not None:
        return flag in flags
    return feature in _cpu_features(_host_triple(), _host_cpu())


def missing_features(spec: TargetSpec) -> list[str]:
    """ISA extensions ``spec`` enables that this machine lacks (empty: all present)."""
    isa = _ISA.get(spec.arch, {})
    wanted = _cpu_features(spec.mtriple, spec.mcpu, spec.mattr) & set(isa)
    return sorted(f for f in wanted if not _host_has(f, spec.arch))


def can_execute(spec: TargetSpec | str | dict | None) -> tuple[bool, str]:
    """Whether code compiled for ``spec`` can run on this machine, and why not.

    Returns
    -------
    ok : bool
    reason : str
        Empty when ``ok``; otherwise one sentence naming the architecture mismatch or
        the missing instruction-set extensions.
    """
    spec = parse_target(spec)
    host_arch = _host_arch()
    if spec.arch != host_arch:
        return False, (f"it was compiled for {spec.arch} ({spec.mtriple}) but this machine is "
                       f"{host_arch} ({_host_triple()})")
    missing = missing_features(spec)
    if missing:
        name = " ".join([spec.mcpu or "generic", ",".join(spec.mattr)]).strip()
        return False, (f"target {name} uses {', '.join(missing)}, which this CPU "
                       f"({_host_cpu()}) lacks")
    return True, ""


def host_report() -> dict:
    """This machine as the CLI prints it: triple, CPU, cores and ISA extensions."""
    arch = _host_arch()
    isa = sorted(f for f in _ISA.get(arch, {}) if _host_has(f, arch))
    return {"triple": _host_triple(), "cpu": _host_cpu(), "cores": _default_cores(),
            "isa": isa}
