"""Shared inputs for the planner unit tests: one small manifest and observations built in code."""

from __future__ import annotations

import pytest
from plandata import MANIFEST, observed_dict

from nephele import manifest
from nephele.model import Desired, Observed


@pytest.fixture
def desired() -> Desired:
    return manifest.loads(MANIFEST, "test.yaml")


@pytest.fixture
def observed() -> Observed:
    return Observed.from_dict(observed_dict())
