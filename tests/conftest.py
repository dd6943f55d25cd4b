"Shared pytest fixtures."
import pytest

from robust_attr.data import fashion_mnist_path

@pytest.fixture(scope='session')
def fashion_mnist():
    "Directory with the four Fashion-MNIST IDX files; skips the test when none is installed."
    path = fashion_mnist_path()
    if path is None:
        pytest.skip("Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist` "
                    "or pass its directory with `path=`")
    return path
