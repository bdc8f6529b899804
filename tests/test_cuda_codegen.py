"""CUDA code generation of every lookupc training kernel, on any machine (no GPU needed).

TVM builds CUDA targets without a GPU: the device module is a fallback module that
holds the CUDA C++ source. Checked here: each kernel yields a ``__global__`` kernel with
thread bindings for sm_80 and sm_90, stays within the static shared-memory and
thread limits, and (where nvcc is installed) compiles to PTX for both arches.
"""

import re
import shutil

import pytest

tvm = pytest.importorskip("tvm")

from lookupc.errors import LookupcError  # noqa: E402
from lookupc.kernels.shapes import KernelShapes  # noqa: E402
from lookupc.runtime.cuda import cuda_source, kernel_catalogue  # noqa: E402
from lookupc.runtime.cuda_training import TirTrainingKernels  # noqa: E402

ARCHES = ("sm_80", "sm_90")
# Small shapes with two repeats; the paper config is checked for resource limits below.
SMALL = KernelShapes(d_in=48, d_out=40, tables=12, bits=8, block_size=16, repeats=2)
PAPER = KernelShapes(d_in=512, d_out=512, tables=128, bits=8, block_size=64, repeats=2)
KERNELS = sorted(kernel_catalogue(SMALL))
SHARED_LIMIT = 48 * 1024  # static __shared__ per block


def _cuda_codegen_available() -> bool:
    try:
        cuda_source("column_sum", SMALL, "sm_90")
    except Exception:  # noqa: BLE001
        return False
    return True


pytestmark = pytest.mark.skipif(not _cuda_codegen_available(),
                                reason="this TVM build cannot generate CUDA code")


def _kernels(src: str) -> list[str]:
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(', src)


def _shared_bytes(src: str) -> int:
    sizes = re.findall(r"__shared__ (?:alignas\(\d+\) )?(float|int) \w+\[(\d+)\]", src)
    return sum(4 * int(n) for _, n in sizes)


@pytest.fixture(scope="module")
def sources():
    return {(name, arch): cuda_source(name, SMALL, arch) for name in KERNELS for arch in ARCHES}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_generates_cuda_with_thread_bindings(sources, name, arch):
    src = sources[name, arch]
    kernels = _kernels(src)
    assert kernels, f"{name}: no __global__ kernel in the source"
    for bound, kname in kernels:
        assert kname.endswith("_kernel") or "_kernel_" in kname
        assert bound and 1 <= int(bound) <= 1024, f"{kname}: launch bounds {bound!r}"
    assert "threadIdx.x" in src  # (blockIdx vanishes where the grid is a single block)


def test_kernel_specific_features(sources):
    assert "atomicAdd" in sources["table_grad_atomic", "sm_90"]
    assert "atomicAdd" not in sources["table_grad_segment", "sm_90"]
    # kernels that stage data in shared memory (and synchronise on it)
    for name in ("hash", "gather", "round_fwd", "round_bwd", "fwht_scaled", "weight_grad",
                 "gather_score_grad", "score_grad"):
        src = sources[name, "sm_90"]
        assert "__shared__" in src and "__syncthreads" in src, name
    # the d_out dot products of the score gradient reduce across a warp
    assert "__shfl" in sources["gather_score_grad", "sm_90"]
    # a BH4 round kernel contains the matmul and every butterfly stage (log2 D = 6 here)
    assert sources["round_bwd", "sm_90"].count("__syncthreads") >= 6


WIDE = KernelShapes(d_in=4096, d_out=64, tables=256, bits=8, block_size=64, repeats=1)


@pytest.mark.parametrize("shapes,name", [(PAPER, "hash"), (PAPER, "round_bwd"),
                                         (PAPER, "weight_grad"), (WIDE, "hash"),
                                         (WIDE, "round_fwd")], ids=lambda v: getattr(v, "key", v))
def test_kernels_fit_static_shared_memory(shapes, name):
    src = cuda_source(name, shapes, "sm_90")
    assert 0 < _shared_bytes(src) <= SHARED_LIMIT


def test_unbound_kernel_is_refused_not_run_on_host():
    """A PrimFunc without thread bindings compiles for cuda as host code: must raise."""
    kernels = TirTrainingKernels("cuda", arch="sm_90")
    make, _ = kernel_catalogue(SMALL)["column_sum"]
    with pytest.raises(LookupcError, match="without a CUDA device module"):
        kernels.kernel(("unbound",), make, lambda f, emulate=False: f)


def test_bad_arch_is_rejected():
    with pytest.raises(ValueError, match="sm_90"):
        cuda_source("gather", SMALL, "hopper")


def _ptx(src: str, arch: str) -> str:
    from tvm.support import nvcc

    from lookupc.schedules.cuda.util import cuda_target

    with cuda_target(arch):
        ptx = nvcc.compile_cuda(src, target_format="ptx", arch=arch, compiler="nvcc")
    return bytes(ptx).decode()


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", ["hash", "round_bwd"])
def test_ptx_compiles(sources, name, arch):
    ptx = _ptx(sources[name, arch], arch)
    assert f".target {arch}" in ptx
    assert ".entry" in ptx and "bar.sync" in ptx


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", KERNELS)
def test_ptx_compiles_every_kernel(sources, name, arch):
    ptx = _ptx(sources[name, arch], arch)
    assert f".target {arch}" in ptx and ".entry" in ptx
