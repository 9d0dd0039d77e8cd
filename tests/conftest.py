import os

import pytest
import torch

# Small tensors are far faster on one thread, and a fixed count keeps results reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Kept teachers and converted models go to a per-session temporary cache, never ~/.cache."""
    if "POTSTILL_TEST_CACHE" not in os.environ:
        os.environ["POTSTILL_TEST_CACHE"] = str(tmp_path_factory.getbasetemp() / "potstill-cache")
    monkeypatch.setenv("POTSTILL_CACHE_DIR", os.environ["POTSTILL_TEST_CACHE"])
