"""Test set-up: on a machine without CUDA, run the Triton kernels in Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection
time, before any test module imports ptkernels' kernels. On a GPU machine the kernels are compiled.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh inductor / AOTAutograd cache per test session: torch's cache key covers the forward graph
# but not the Python backward registered for a custom op, so a cache left by an older checkout on the
# same machine can replay an outdated backward call (seen when a backward argument was added).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ptkernels-inductor-"))

# Under pytest-xdist (the README's `-n auto`) on the CPU, one torch thread per worker: with one
# worker per core, several OpenMP threads each oversubscribe the cores, and their spin-waits made
# the Hugging Face tests 1.6x slower than in one process.
if not torch.cuda.is_available() and os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)
