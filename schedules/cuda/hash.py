"""CUDA schedule of the hash forward (``lookupc.kernels.forward.make_hash``).

The whole hash of a tile of tokens runs in one thread block: the padded input, every
block-matmul and butterfly stage, the soft code and the per-table sums live in shared
memory (a butterfly exchanges values across the whole row, so the row must stay on
chip; TVM's storage rewrite lets the stages ping-pong between two buffers). Each
stage's elements are spread over the block's threads; TVM inserts the barriers.
Each block matmul walks the BH4 blocks one at a time with that block's weights staged
in shared memory (coalesced load, reused by every token of the tile) and accumulates
in registers.

The token count is fixed per build (``tokens``: the symbolic n is specialised, so no
tile has a tail and no barrier sits under a bounds check); ``tokens`` must be a
multiple of the tile (:func:`hash_tile`): ``lookupc.runtime.cuda_training`` pads the batch.
"""

from __future__ import annotations

from lookupc.errors import LookupcInputError

from .backward import SHARED_FLOATS
from .util import DEFAULT_THREADS, GpuSchedule, specialize_tokens

__all__ = ["schedule_hash", "hash_tile"]

_OUTPUT_SIDE = ("mix", "code", "sabs", "den", "score")  # consumers of the last stage
_TILE_FLOATS = 2048


def hash_tile(width: int, repeats: int) -> int:
    """Tokens per thread block (one [tile, R, D] stage buffer of <= 8 KiB)."""
    return max(1, _TILE_FLOATS // (width * repeats))


def _chain(sch) -> list[str]:
    """Names of the blocks before ``mix`` (pad, bmm0, fwht0_*, ..., last stage)."""
    root = sch.get_sblock("root")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    return names[:names.index("mix")]


def schedule_hash(func, tokens: int, emulate: bool = False, threads: int = DEFAULT_THREADS,
                  tile: int | None = None):
    """Schedule the hash PrimFunc for CUDA for ``tokens`` tokens (see the module docstring)."""
    g = GpuSchedule.of(specialize_tokens(func, tokens), emulate)
    sch = g.sch
    chain = _chain(sch)
    dims = sch.get(sch.get_sblock(chain[-1])).iter_vars[1:4]  # (n,) R, D/BS, BS
    reps, nb, bs = (int(v.dom.extent) for v in dims)
    tile = tile or hash_tile(nb * bs, reps)
    if tokens % tile:
        raise LookupcInputError(f"tokens={tokens} must be a multiple of the tile {tile}")
    # Phase 1: the zero padding is inlined into its two readers (first matmul and mix).
    sch.compute_inline(sch.get_sblock("pad"))
    chain = chain[1:]
    # Phase 2: anchor = mix (the soft code); token tiles -> blockIdx.x. The code/score
    # side follows per tile, the chain precedes it.
    i = sch.get_loops(sch.get_sblock("mix"))[0]
    io, _ = sch.split(i, [None, tile])
    g.bind(io, "blockIdx.x")
    for name in _OUTPUT_SIDE[1:]:
        sch.reverse_compute_at(sch.get_sblock(name), io)
    for name in reversed(chain):
        sch.compute_at(sch.get_sblock(name), io, preserve_unit_loops=True)
    for name in chain + ["mix", "sabs", "den"]:
        g.set_scope(sch.get_sblock(name), "shared")
    # Phase 3: threads over each stage's elements; block matmuls get their own schedule.
    for name in chain + list(_OUTPUT_SIDE):
        blk = sch.get_sblock(name)
        if name.startswith("bmm"):
            _schedule_bmm(g, blk, threads, stage_weights=tile * reps * nb * bs
                          + 2 * bs * bs < SHARED_FLOATS)
        else:
            g.bind_threads(blk, 1, threads)
            _, red = g.split_loops(blk, 1)
            if red:  # init outside the reduction loop: no branch around the barriers
                sch.decompose_reduction(blk, red[0])
    return g.mod


def _schedule_bmm(g: GpuSchedule, blk, threads: int, stage_weights: bool) -> None:
    """Block matmul under the tile loop: loops (tile loop, i, r, b, o, k)."""
    sch = g.sch
    _, i, r, b, o, _ = sch.get_loops(blk)
    sch.reorder(r, b, i, o)
    if stage_weights:  # (the stage buffer and two weight blocks fit in 48 KiB)
        w_cache = g.cache_read(blk, "weight", "shared")
        sch.compute_at(w_cache, b)
        g.bind_threads(w_cache, g.depth_below(w_cache, b), threads)
    _, tx = sch.split(g.fuse([i, o]), [None, threads])
    g.bind(tx, "threadIdx.x")
    acc = sch.cache_write(blk, 0, "global" if g.emulate else "local")
    sch.reverse_compute_at(acc, tx)
    sch.decompose_reduction(blk, sch.get_loops(blk)[-1])
