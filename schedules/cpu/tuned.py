"""``tuned``: the hand schedules' knobs searched by MetaSchedule, kept in a JSON database.

Design space
    MetaSchedule (``tvm.s_tir.meta_schedule``) searches the hand schedule of
    ``schedules/cpu.py`` itself (``space=ScheduleFn``): every tile size is a
    ``sample_categorical`` over values that tile the shapes exactly, so the hand
    schedule's default knobs are one point of the space: the hand schedule is the search's
    starting point and the tuned result can only be measured-better. (The default
    post-order-apply space was not used: on the hash's ~20 blocks it spends the trials on
    compute-location choices the hand schedule already fixes.)

Workloads
    MetaSchedule measures concrete shapes, so each kernel is tuned on a copy specialised
    to ``TUNE_TOKENS`` tokens (and, for the hash, decay 0.7); the chosen knobs are then
    applied to the symbolic-N kernel that is compiled.

Database
    ``tune(shapes_list, target, db_dir, trials)`` writes ``database_workload.json`` and
    ``database_tuning_record.json`` in ``db_dir`` (MetaSchedule's JSONDatabase appends
    each measured batch, so an interrupted run keeps what it finished). A kernel whose
    workload already has ``trials`` records is skipped; one with fewer gets only the
    missing trials. ``TunedSchedule`` reads the best record and compiles from it without
    tuning; a kernel without records falls back to the hand schedule's knobs (and says so
    once through ``warnings``).

Workers: MetaSchedule builds and runs candidates in subprocesses; the builder skips the
slow default ``tvm.s_tir.tensor_intrin`` import, and the runner fills int32 inputs with
valid codes (see ``../shared/notes/tvm`` recipe 04).

Remote measurement (``rpc="HOST:PORT", rpc_key=KEY``): candidates are compiled here for
``target`` (the board's) and measured on a board registered with a TVM RPC tracker under
KEY (MetaSchedule ``RPCRunner``). The tracker is asked for its summary, with a short
timeout, before any tuning starts: one that does not answer, or has no server under KEY,
is a :class:`~lookupc.errors.LookupcError` naming both. The modules travel as ``.tar``
(linked on the board by its ``tvm.exec.rpc_server``, which needs a C compiler there); the
int32 inputs are filled with valid codes here and copied to the board
(:mod:`lookupc.schedules.cpu.tune_rpc` names and checks the board;
:mod:`lookupc.schedules.cpu.tune_run` holds the run's log, Ctrl-C and scratch plumbing).

Size: the design space, the knob decoding of a record's trace, the workers (pickled by
value from this module, so they must live here), the database queries and
:class:`TunedSchedule`, which reads back what :func:`tune` writes, share one convention
for workloads and records and are kept together.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

from lookupc import tvm_shim
from lookupc.errors import LookupcInputError
from lookupc.kernels import forward as tir_kernels
from lookupc.schedules.cpu.hand import (
    TOKEN_TILE,
    GatherKnobs,
    HashKnobs,
    pow2_divisor,
    schedule_gather,
    schedule_hash,
    valid_gather_knobs,
    valid_hash_knobs,
)
from lookupc.schedules.cpu.tune_rpc import RemoteDevice, check_tracker, parse_rpc
from lookupc.schedules.cpu.tune_run import _quiet_tvm_logs, _StopOnInterrupt, tempfile_dir

NAME = "tuned"
TUNE_TOKENS = 1024
_DECAY = 0.7

__all__ = ["TunedSchedule", "tune", "default_db_dir", "TUNE_TOKENS", "RemoteDevice",
           "parse_rpc", "check_tracker"]


def default_db_dir() -> str:
    """``$LOOKUPC_TUNING_DB`` or ``~/.cache/lookupc/tuning``."""
    return os.environ.get("LOOKUPC_TUNING_DB") or os.path.join(
        os.path.expanduser("~"), ".cache", "lookupc", "tuning")


def _ms():
    from tvm.s_tir import meta_schedule as ms

    return ms


# ----------------------------------------------------------------------------- space
def _hash_candidates(shapes: Any, lanes: int) -> dict[str, list[int]]:
    """Register tiles of the block matmuls and token tiles (``groups * rows`` tokens).

    Rows of 8 only with AVX-512's 32 vector registers: with AVX2's 16 they spill or leave
    the broadcasts as the bottleneck (1.45-1.55x slower than 4 rows on Zen 3). Every
    ``groups * rows`` divides ``TOKEN_TILE``; 16-token tiles (``groups=4, rows=4``) were
    6-8% faster than 8 at the paper and MiniLM configs on Zen 3 (1 thread).
    """
    vec = pow2_divisor(shapes.block_size, lanes)
    cols = sorted({min(shapes.block_size, vec * m) for m in (1, 2, 4)})
    rows = [r for r in (2, 4, 8) if 2 * r <= TOKEN_TILE and (r < 8 or lanes >= 16)]
    groups = [g for g in (1, 2, 4) if g * max(rows) <= TOKEN_TILE]
    return {"groups": groups, "rows": rows, "cols": cols}


def _gather_candidates(shapes: Any, lanes: int) -> dict[str, list[int]]:
    """One knob, by the hand schedule's form for ``shapes`` (:func:`gather_mode`): the
    register tile's columns, or the table-outer group size."""
    if valid_gather_knobs(shapes, lanes, GatherKnobs()).cols:
        return {"cols": sorted({pow2_divisor(shapes.d_out, lanes * m) for m in (1, 2, 4, 8)})}
    return {"kb": sorted({pow2_divisor(shapes.tables, kb) for kb in (1, 2, 4, 8, 16, 32)})}


def _gather_knobs(shapes: Any, lanes: int, value: Any) -> GatherKnobs:
    """The knobs whose one sampled value is ``value`` (see :func:`_gather_candidates`)."""
    if "cols" in _gather_candidates(shapes, lanes):
        return GatherKnobs(cols=value)
    return GatherKnobs(kb=value, cols=0)


def _sample(sch: Any, values: list[int]) -> Any:
    return sch.sample_categorical(values, [1.0 / len(values)] * len(values))


def _hash_space(shapes: Any, lanes: int):
    cand = _hash_candidates(shapes, lanes)

    def space(sch: Any) -> None:
        groups = _sample(sch, cand["groups"])
        rows = _sample(sch, cand["rows"])
        cols = _sample(sch, cand["cols"])
        schedule_hash(sch, shapes, lanes, HashKnobs(tile=(groups, rows), rows=rows, cols=cols))

    return space


def _gather_space(shapes: Any, lanes: int):
    cand = _gather_candidates(shapes, lanes)

    def space(sch: Any) -> None:
        (values,) = cand.values()
        schedule_gather(sch, shapes, lanes, _gather_knobs(shapes, lanes, _sample(sch, values)))

    return space


def _workload(kind: str, shapes: Any) -> Any:
    """The kernel specialised to TUNE_TOKENS tokens (MetaSchedule needs static shapes)."""
    tvm = tvm_shim.tvm
    if kind == "hash":
        func = tir_kernels.make_hash(shapes, fold=True, token_tile=TOKEN_TILE)
        x, decay = func.params[0], func.params[3]
        return func.specialize({x: tvm.tirx.decl_buffer((TUNE_TOKENS, shapes.d_in), "float32"),
                                decay: tvm.tirx.const(_DECAY, "float32")})
    func = tir_kernels.make_gather(shapes)
    return func.specialize(
        {func.params[0]: tvm.tirx.decl_buffer((TUNE_TOKENS, shapes.tables), "int32")})


def _knobs_of(kind: str, trace: Any) -> list[int]:
    """Values of the sample_categorical decisions of ``trace``, in sampling order."""
    values = []
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical":
            candidates = inst.attrs[0]
            values.append(int(candidates[int(trace.decisions[inst])]))
    return values


# ----------------------------------------------------------------------------- workers
def _fast_build(mod, target, _params):  # runs in a MetaSchedule builder subprocess
    import tvm as _tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return _tvm.tirx.build(mod, target=target)


def _make_alloc(max_code: int):
    def alloc(device, args_info, alloc_repeat):  # runs in a runner subprocess
        import numpy as _np
        import tvm as _tvm

        rng = _np.random.default_rng(0)
        out = []
        for _ in range(alloc_repeat):
            args = []
            for _kind, dtype, shape in args_info:
                if dtype.startswith("int"):
                    arr = rng.integers(0, max_code, size=shape).astype(dtype)
                else:
                    arr = rng.standard_normal(size=shape).astype(dtype)
                args.append(_tvm.runtime.tensor(arr, device))
            out.append(args)
        return out

    return alloc


def _make_rpc_alloc(max_code: int):
    """``f_alloc_argument`` for ``RPCRunner``: the same valid codes, copied to the board.
    (Called in the runner worker here with the session's remote ``device``.)"""
    alloc = _make_alloc(max_code)

    def rpc_alloc(_session, device, args_info, alloc_repeat):
        return alloc(device, args_info, alloc_repeat)

    return rpc_alloc


#: seconds one remote measurement (session: upload, link, run) may take
RPC_SESSION_TIMEOUT = 120


def _evaluator() -> Any:
    return _ms().runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=0,
                                        enable_cpu_cache_flush=False)


def _builder_runner(max_code: int, remote: RemoteDevice | None = None):
    import cloudpickle

    ms = _ms()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import us
    builder = ms.builder.LocalBuilder(f_build=_fast_build, max_workers=os.cpu_count(),
                                      timeout_sec=300)
    if remote is not None:
        runner = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=remote.host, tracker_port=remote.port,
                                           tracker_key=remote.key,
                                           session_timeout_sec=RPC_SESSION_TIMEOUT),
            evaluator_config=_evaluator(), f_alloc_argument=_make_rpc_alloc(max_code),
            max_workers=1)
        return builder, runner
    runner = ms.runner.LocalRunner(timeout_sec=120, evaluator_config=_evaluator(),
                                   f_alloc_argument=_make_alloc(max_code))
    return builder, runner


# ----------------------------------------------------------------------------- database
def _open_db(db_dir: str, create: bool) -> Any | None:
    ms = _ms()
    path = os.path.join(db_dir, "database_tuning_record.json")
    if not create and not os.path.exists(path):
        return None
    return ms.database.JSONDatabase(work_dir=db_dir, allow_missing=create)


def _records(db: Any, workload_mod: Any) -> list:
    ms = _ms()
    mod = ms.tune_context._normalize_mod(workload_mod)
    if not db.has_workload(mod):
        return []
    return list(db.get_top_k(db.commit_workload(mod), 1 << 20))


def best_knobs(kind: str, shapes: Any, target: Any, db_dir: str) -> list[int] | None:
    """Knob values of the fastest record for ``kind`` at ``shapes``/``target``, or None."""
    db = _open_db(db_dir, create=False)
    if db is None:
        return None
    ms = _ms()
    record = db.query_tuning_record(ms.tune_context._normalize_mod(_workload(kind, shapes)),
                                    target, "main")
    return None if record is None else _knobs_of(kind, record.trace)


def _strategy(trials: int) -> Any:
    """Evolutionary search sized for small knob spaces.

    The defaults (population 512, 50 unmeasured initial candidates, 4 genetic rounds)
    replay the hash schedule's trace thousands of times before the first measurement,
    which takes many minutes for a space of a few dozen points.
    """
    ms = _ms()
    return ms.search_strategy.EvolutionarySearch(
        population_size=max(16, 2 * trials), init_min_unmeasured=max(4, trials),
        genetic_num_iters=2, max_fail_count=3)


#: trials per tune_tir call: the most an interrupt can lose (see :func:`tune`)
CHUNK = 4


def tune(shapes_list: list, target: Any, db_dir: str, trials: int,
         cost_model: str = "xgb", kinds=("hash", "gather"), log=print,
         verbose: bool = False, rpc: str | None = None, rpc_key: str | None = None,
         rpc_timeout: float = 10.0) -> str:
    """Tune every kernel of ``shapes_list`` for ``target`` into ``db_dir`` (resumable).

    Parameters
    ----------
    shapes_list : list of KernelShapes
    target : tvm.target.Target
        An llvm target with ``num-cores`` (``lookupc.tvm_shim.make_target``).
    db_dir : str
        MetaSchedule work directory (JSON database; created if missing).
    trials : int
        Measured candidates per kernel (records already there count).
    cost_model : str
        ``"xgb"`` (default) or ``"random"`` (cheaper for a handful of trials).
    log : callable
        Receives progress lines (one per chunk of ``CHUNK`` measured trials).
    verbose : bool
        Show MetaSchedule's logs on the console (they always go to ``db_dir/logs/*.log``).
    rpc, rpc_key : str, optional
        ``"HOST:PORT"`` of a TVM RPC tracker and the key of the board to measure on
        (``target`` is then the board's). The tracker must answer within ``rpc_timeout``
        seconds and list a server under ``rpc_key`` before tuning starts, else
        :class:`~lookupc.errors.LookupcError`.

    Interrupting loses at most the ``CHUNK`` trials in flight: every finished chunk is in
    the database, and a rerun continues from it.
    """
    if trials < 1:
        raise LookupcInputError(f"trials must be >= 1, got {trials}")
    if not tvm_shim.is_cpu_target(target):
        raise LookupcInputError(f"the tuned schedule needs an llvm target, got {target.kind.name}")
    if cost_model == "xgb":
        from lookupc.extras import require

        require("xgboost", "tuning with the XGBoost cost model (or pass cost_model='random')")
    remote = None
    if rpc is not None or rpc_key is not None:
        remote = parse_rpc(rpc or "", rpc_key)
        state = check_tracker(remote, rpc_timeout)
        log(f"measuring on {state['servers']} server(s) with {remote} "
            f"({state['free']} free now)")
    ms = _ms()
    os.makedirs(db_dir, exist_ok=True)
    lanes = tvm_shim.vector_lanes(target)
    jobs = [(kind, s) for s in shapes_list for kind in kinds]
    with _StopOnInterrupt(log) as stop:
        for number, (kind, shapes) in enumerate(jobs, 1):
            _tune_one(ms, number, len(jobs), kind, shapes, target, db_dir, trials, lanes,
                      cost_model, log, verbose, stop, remote)
    return db_dir


def _tune_one(ms, number, njobs, kind, shapes, target, db_dir, trials, lanes, cost_model,
              log, verbose, stop, remote=None) -> None:
    """Tune one kernel in chunks (see :func:`tune`)."""
    workload = _workload(kind, shapes)
    db = _open_db(db_dir, create=True)
    done = len(_records(db, workload))
    cand = (_hash_candidates if kind == "hash" else _gather_candidates)(shapes, lanes)
    size = 1
    for values in cand.values():
        size *= len(values)
    todo = min(trials, size) - done  # a space smaller than `trials` is done when covered
    label = f"[{number}/{njobs}] {kind} {shapes.key}"
    if todo <= 0:
        log(f"{label}: {done} records in {db_dir} (space of {size}), skipped")
        return
    log(f"{label}: tuning {todo} trials ({done} already recorded)...")
    start = time.time()
    space = _hash_space(shapes, lanes) if kind == "hash" else _gather_space(shapes, lanes)
    builder, runner = _builder_runner(1 << shapes.bits, remote)
    measured = 0
    with tempfile_dir(db_dir) as scratch, _quiet_tvm_logs(scratch, verbose):
        # Phase: chunks of CHUNK trials. Each chunk's records are committed to the JSON
        # database (one line per record, appended) before the next starts, so an
        # interrupt loses at most the chunk in flight; a rerun resumes from the records.
        while measured < todo:
            stop.check()  # Ctrl-C: stop between chunks, the database whole
            chunk = min(CHUNK, todo - measured)
            ms.tune_tir(workload, target, scratch, max_trials_global=chunk,
                        num_trials_per_iter=chunk, builder=builder, runner=runner,
                        database=db, cost_model=cost_model, strategy=_strategy(chunk),
                        num_tuning_cores=os.cpu_count() or 1, seed=done + measured,
                        space=ms.space_generator.ScheduleFn(space, sch_rules=[],
                                                            postprocs=[], mutator_probs={}))
            now = len(_records(db, workload))
            if now <= done + measured:  # nothing new: the space is exhausted
                break
            measured = now - done
            log(f"{label}: {measured}/{todo} trials measured "
                f"({time.time() - start:.0f}s)")
    best = _records(db, workload)
    secs = [float(sum(map(float, r.run_secs)) / len(r.run_secs)) for r in best if r.run_secs]
    knobs = best_knobs(kind, shapes, target, db_dir)
    log(f"{label}: done in {time.time() - start:.0f}s, {len(best)} records, best "
        f"{min(secs) * 1e3:.2f} ms at {TUNE_TOKENS} tokens, knobs {knobs}" if secs else
        f"{label}: done in {time.time() - start:.0f}s, no successful measurement")


# ----------------------------------------------------------------------------- schedule
class TunedSchedule:
    """Compiles with the best knobs in a tuning database (the hand knobs when none)."""

    name = NAME
    fold = True
    token_tile = TOKEN_TILE

    def __init__(self, db_dir: str | None = None):
        self.db_dir = db_dir or default_db_dir()
        self._warned: set = set()

    def applies_to(self, target: Any) -> bool:
        return tvm_shim.is_cpu_target(target)

    def _knobs(self, kind: str, shapes: Any, target: Any) -> list[int] | None:
        knobs = best_knobs(kind, shapes, target, self.db_dir)
        if knobs is None and (kind, shapes) not in self._warned:
            self._warned.add((kind, shapes))
            warnings.warn(f"lookupc: no tuning record for the {kind} kernel {shapes.key} on "
                          f"{tvm_shim.target_mcpu(target)} in {self.db_dir}; using the hand "
                          "schedule's knobs (run lookupc.runtime.build.tune first)", stacklevel=3)
        return knobs

    def hash(self, func: Any, shapes: Any, target: Any) -> Any:
        lanes = tvm_shim.vector_lanes(target)
        knobs = self._knobs("hash", shapes, target)
        if knobs is None:
            chosen = valid_hash_knobs(shapes, lanes, HashKnobs())
        else:
            groups, rows, cols = knobs
            chosen = HashKnobs(tile=(groups, rows), rows=rows, cols=cols)
        sch = tvm_shim.Schedule(func)
        schedule_hash(sch, shapes, lanes, chosen)
        return sch.mod["main"]

    def gather(self, func: Any, shapes: Any, target: Any) -> Any:
        lanes = tvm_shim.vector_lanes(target)
        knobs = self._knobs("gather", shapes, target)
        chosen = valid_gather_knobs(shapes, lanes, GatherKnobs() if knobs is None
                                    else _gather_knobs(shapes, lanes, knobs[0]))
        sch = tvm_shim.Schedule(func)
        schedule_gather(sch, shapes, lanes, chosen)
        return sch.mod["main"]

    def cache_token(self) -> str:
        """Changes whenever the database gains records (so builds pick them up)."""
        path = os.path.join(self.db_dir, "database_tuning_record.json")
        try:
            st = os.stat(path)
        except OSError:
            return f"{self.db_dir}|empty"
        return f"{os.path.abspath(self.db_dir)}|{st.st_size}|{st.st_mtime_ns}"
