import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_clean_stack():
    torch.manual_seed(0)
    random.seed(0)
    yield
    from ftrans._C import levels

    assert levels.current_stack() == [], "a transform leaked a level onto the stack"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FTRANS_FULL"):
        return
    skip = pytest.mark.skip(reason="full sweep: set FTRANS_FULL=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
