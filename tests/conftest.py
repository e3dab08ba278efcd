"""Session setup shared by every test module.

Triton decides between compiling and interpreting when each @triton.jit function is defined, i.e. when
kernels/*.py is imported, so TRITON_INTERPRET must be in the environment before any test module
imports them; a conftest is loaded before test modules are collected.

Forced, not setdefault: on a machine without CUDA the interpreter is the only way a Triton kernel can
run, and an inherited TRITON_INTERPRET=0 would only make tests/test_kernels.py fail to launch (and a
setdefault would buy nothing else). With CUDA we leave the variable alone: the kernels are compiled
for the GPU, unless someone deliberately set TRITON_INTERPRET=1 to debug them there.

Child processes (trainer runs) inherit the variable; that is harmless, because the kernels' default
path only runs on CUDA tensors (kernels/__init__.py), so CPU trainer runs use the PyTorch references.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): extra
    OpenMP threads only add synchronisation, and on a busy machine their spinning costs more than the
    work (up to 100x here; trainer runs use OMP_NUM_THREADS=1 likewise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # pytest resets warning filters per test; golf/ttt.py's own filter for this one (its adapters'
    # gradients are strided views of one flat buffer, by design) has to be repeated here
    config.addinivalue_line("filterwarnings", "ignore:grad and param do not obey the gradient layout contract")
