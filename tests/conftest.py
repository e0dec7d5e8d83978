import os

import pytest
import torch

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
