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


@pytest.fixture(autouse=True)
def _no_stream_handler_outlives_its_test():
    """A test that runs a command in-process (``node.cli.main``) lets its ``setup_logging`` point the
    root logger at that test's captured stderr; once the capture is closed, every later log record
    would print "--- Logging error ---". Remove such handlers (and restore the root level) afterwards."""
    import logging

    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler and h not in before:
            root.removeHandler(h)
    root.setLevel(level)
