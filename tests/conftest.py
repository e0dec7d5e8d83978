import os

# Idle OpenMP threads sleep instead of spinning (an explicit OMP_WAIT_POLICY wins). At 2 threads
# on a 2-core machine that another process keeps busy, a spinning thread holds the core that its
# partner needs to finish the parallel region: test_recorded's Lite0 ran in 131-196 s spinning and
# 26-29 s passive, under the same load. How idle threads wait does not change how the work is
# split, so results are the same bit for bit. Set before torch loads its OpenMP runtime (which
# reads it once), and inherited by the tests' child processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from omse.runtime import tune_allocator

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
tune_allocator()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small models: they gain nothing from two, and on a shared
    2-core machine two spinning threads per process make the module many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def two_threads():
    """Two torch threads for one test (work shared by torch's threads; the process settings a
    recording was made with)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _has(pkg: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(pkg) is not None


needs_models = pytest.mark.skipif(
    not (_has("efficientnet_lite_pytorch") and _has("foolbox")),
    reason="model packages not installed (make test installs them)",
)


@pytest.fixture(scope="session")
def fmnist_split():
    """Normalized Fashion-MNIST ``(first 256 training images, first 1000 test images)``:
    calibration and evaluation data that never overlap (skips when the data set is missing)."""
    from omse.errors import OmseError
    from omse.zoo.fmnist import load_fmnist, normalize

    try:
        train, _ = load_fmnist("train")
        test, _ = load_fmnist("test")
    except OmseError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")
    return normalize(train[:256]), normalize(test[:1000])
