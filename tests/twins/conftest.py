"""The `backend` fixture: each test here runs once per twin, through its adapter
(tests/support/twin_adapters.py), as transformers' ModelTesterMixin runs per model."""

from __future__ import annotations

import pytest
from twin_adapters import TWINS, Twin


@pytest.fixture(params=list(TWINS))
def backend(request: pytest.FixtureRequest, torch_one_thread: None) -> Twin:
    return TWINS[request.param]()
