"""Shared test set-up. The shared builders are plain functions in tests/helpers.py (a method on a tiny CNN, a
TrainBatch of random images); pytest discourages importing from a conftest, and tests/benchmarks has its own.

tests/ is not a package: in pytest's default (prepend) import mode only tests/ itself lands on sys.path, so
`from tests.helpers import ...` would work only when the repository root is there too (`python -m pytest`
from the root, or PYTHONPATH). Putting the root first makes it work however pytest is started.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
