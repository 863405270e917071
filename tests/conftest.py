"""Shared test fixtures. Tests that need ../shared (the read-only data beside the checkout) skip cleanly without it.

Run from the repository root (`python -m pytest ...`): `tests` is a package there, so tests import `tests.harness.*`
and worker processes run as `python -m tests.…` with the repository root as working directory."""
import os
from pathlib import Path

import pytest

from tests.harness import distributed

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYLLM_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data not present at {SHARED}")
    return SHARED / "data"


@pytest.fixture(scope="session")
def chatglm3_tokenizer_model(shared_dir) -> Path:
    p = shared_dir / "tokenizers" / "chatglm3" / "tokenizer.model"
    if not p.is_file():
        pytest.skip(f"{p} missing")
    return p


def pytest_runtest_setup(item):
    """Tell the harness whether this test may start ranks (it refuses for a test without the marker)."""
    distributed.current_test_is_marked = item.get_closest_marker("distributed") is not None
