"""The kernels never read or write outside their buffers.

Every input and output of the hash and the gather is placed against a ``PROT_NONE``
guard page (``guarded_memory``), once ending at it and once starting right after it, and
the raw TVM functions run on those tensors in a subprocess: an access one element past
either edge is a SIGSEGV there, a test failure here. (TVM's bundled LLVM has no address
sanitizer runtime for JIT-built modules, so guard pages are the check.) Shapes keep every
buffer a multiple of 64 bytes so the placements stay 64-byte aligned, as TVM's
vectorised code requires; one has repeats > 1 and 8-bit codes.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
import lookupc
from guarded_memory import guarded
from test_kernels import check_hash
from lookupc.kernels.shapes import KernelShapes
from lookupc.runtime import build as K

checked = 0
for d_in, d_out, h, tau, bs in ((48, 32, 16, 4, 16), (32, 16, 16, 8, 8)):
    torch.manual_seed(0)
    m = lookupc.LookupFFN(d_in, d_out, lookupc.LookupConfig(tables=h, bits=tau, block_size=bs))
    with torch.no_grad():
        m.hash_bias.normal_(0.0, 0.1)
        m.tables.normal_()
    for schedule in ("naive", "cpu"):
        k = K.build(KernelShapes.of(m), schedule=schedule)
        for n in (1, 4, 20):
            rows = -(-n // k.token_tile) * k.token_tile
            x0 = torch.randn(n, d_in)
            for side in ("end", "start"):
                x = guarded(x0, side)
                w = guarded(k.prepare_weight(m.bh4_weight.detach()), side)
                hb = guarded(m.hash_bias.detach(), side)
                codes = guarded(torch.zeros(rows, h, dtype=torch.int32), side)
                scores = guarded(torch.zeros(rows, h), side)
                k.hash_fn(x, w, hb, 0.7, codes, scores)
                check_hash(m, x0, codes[:n].clone(), scores[:n].clone())
                y = guarded(torch.zeros(n, d_out), side)
                k.gather_fn(guarded(codes[:n], side), guarded(scores[:n], side),
                            guarded(m.tables.detach(), side), guarded(m.bias.detach(), side), y)
                expect = lookupc.reference.gather_forward(codes[:n].clone(), scores[:n].clone(),
                                                          m.tables.detach(), m.bias.detach())
                torch.testing.assert_close(y.clone(), expect, rtol=1e-4, atol=1e-5)
                checked += 1
print(f"checked {checked}")
"""


def test_kernels_stay_inside_their_buffers(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, LOOKUPC_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", SCRIPT, tests], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (
        f"exit {r.returncode} (negative: killed by that signal; -11 = an access past a "
        f"buffer edge)\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    assert "checked 24" in r.stdout, r.stdout


def test_the_guard_page_really_faults(tmp_path):
    """The check can fail: reading one element past a guarded tensor kills the process."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import torch, ctypes\n"
            "from guarded_memory import guarded\n"
            "t = guarded(torch.ones(16), 'end')\n"
            "ctypes.c_float.from_address(t.data_ptr() + 64).value\n")
    r = subprocess.run([sys.executable, "-c", code, tests], capture_output=True, timeout=120)
    assert r.returncode == -11, (r.returncode, r.stderr[-2000:])
