import os
import sys

# TVM's runtime pins the calling thread to core 0 when it sizes its pool unless told
# not to; set before anything imports TVM so torch's threads are never pinned.
os.environ.setdefault("TVM_BIND_THREADS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use small tensors: one torch thread is as fast and, unlike two OpenMP threads
# spinning at barriers, does not slow down 50x when the machine is oversubscribed.
_TEST_THREADS = int(os.environ.get("LOOKUPC_TEST_THREADS", "1"))
torch.set_num_threads(_TEST_THREADS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # in-process CLI commands (compare, run) set torch to all cores; undo that per test
    torch.set_num_threads(_TEST_THREADS)
    torch.manual_seed(0)
