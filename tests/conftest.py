from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import FAMILIES, SHARED, SHARED_MISSING_REASON, STORIES260K, local_tokenizer, tiny_model

# Each xdist worker gets one core's worth of threads; tiny models gain nothing from more.
torch.set_num_threads(int(os.environ.get("HF_OPTIM_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokenizer():
    return local_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(SHARED_MISSING_REASON)
    return SHARED


@pytest.fixture
def stories260k_dir():
    if not STORIES260K.is_dir():
        pytest.skip(SHARED_MISSING_REASON)
    return STORIES260K
