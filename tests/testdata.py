"""Files that `make setup` places with tests/fetch_data.sh (all from PyPI packages)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("EDGERT_TEST_DATA") or Path.home() / ".cache" / "edgert-test-data")


def data_file(name: str) -> Path:
    """`name` under $EDGERT_TEST_DATA (default ~/.cache/edgert-test-data); a missing file fails
    the test, it never skips it."""
    path = ROOT / name
    if not path.is_file():
        pytest.fail(f"test data {path} is missing: run tests/fetch_data.sh (part of make setup)")
    return path
