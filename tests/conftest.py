"""Fixtures shared by test modules."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes on two cores: one thread each, or spinning thread pools (OpenMP in torch, TVM's
    # runtime) oversubscribe the cores and slow every test several times over.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ.setdefault(var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core machine, two spinning threads per process are several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
