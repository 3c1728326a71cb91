"""Test setup: without a GPU every kernel test runs the real Triton kernel under the interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set here,
before flashfuse is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# On the GPU machine, FLASHFUSE_TEST_DEVICE=cuda reruns the pass tests with every tensor on the GPU
if os.environ.get("FLASHFUSE_TEST_DEVICE"):
    torch.set_default_device(os.environ["FLASHFUSE_TEST_DEVICE"])


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
