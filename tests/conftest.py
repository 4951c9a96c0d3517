"""Fixtures shared by the unit, integration and interop tests."""

from __future__ import annotations

import pydicom
import pytest

import node.catalogue  # noqa: F401  (the node installs the model specs' codes into reports.codes; so do the tests)
from tests.unit.report_sources import phantom_headers


@pytest.fixture(scope="module")
def headers() -> list[pydicom.Dataset]:
    """The 28 real headers of the shared 5 mm phantom series (sorted by z, no PixelData)."""
    return phantom_headers()
