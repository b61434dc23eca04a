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


# The slowest files, slowest first (seconds of one xdist worker, measured with --durations). xdist hands whole files
# to the two workers in collection order; starting with the long ones keeps one worker from running a 5-minute file
# alone at the end while the other idles.
SLOWEST_FIRST = ("test_pipeline.py", "test_random_programs.py", "test_zoo.py", "test_job_submit.py",
                 "test_profiler.py", "test_finetune_tune.py", "test_run_folder.py", "test_hessian_actors.py",
                 "test_gpu_check.py", "test_quant_exact.py", "test_evidence.py", "test_distill.py",
                 "test_deploy_transformer.py", "test_export_onnx.py", "test_profiler_cluster.py", "test_stage_keys.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: the rest keep their order


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core machine, two spinning threads per process are several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
