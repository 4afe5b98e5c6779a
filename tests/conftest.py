import os
import sys

import pytest
import torch

from cachepass.metrics import relative_l1  # noqa: F401  (re-exported for the tests)

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache entries leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees the once-per-cause warnings (``cachepass._logging.warn_once``) afresh."""
    from cachepass._logging import reset_warnings

    reset_warnings()
    yield




def count_attention_calls(fn) -> int:
    """How many scaled-dot-product attentions ran inside ``fn()``: block executions, seen by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::scaled_dot_product_attention")
