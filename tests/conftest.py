"""Test tiers: the CPU tier always runs; `@pytest.mark.gpu` tests skip without CUDA.

Environment set here, before anything imports triton or the hub clients:
- HF_HUB_OFFLINE=1: nothing downloads; tiny models are built in-process.
- TRITON_INTERPRET=1 when there is no GPU, so the Triton kernels run under the interpreter
  (it must be set before any @triton.jit decorator executes).
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
