"""Tests never touch the user's cache: the whole session, and every process a test launches,
sees ``EVLGEN_CACHE`` pointing at a test-only directory.

That directory is ``$EVLGEN_TEST_CACHE`` when set (persistent: what the tests build, such as the
converted ViT, is reused by the next run; CI sets it), else a fresh temporary directory that is
removed when the session ends.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_session = {}


def pytest_configure(config):
    # Configure time, not a fixture: lavis_evlgen.runners reads the cache root when it is imported
    # (LAVIS's registry path), and test modules import it while being collected.
    persistent = os.environ.get("EVLGEN_TEST_CACHE")
    if persistent:
        cache = Path(persistent).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
    else:
        cache = Path(tempfile.mkdtemp(prefix="evlgen-test-cache-"))
    _session.update(cache=cache, temporary=not persistent, user_cache=os.environ.get("EVLGEN_CACHE"))
    os.environ["EVLGEN_CACHE"] = str(cache)


def pytest_unconfigure(config):
    if _session["user_cache"] is None:
        os.environ.pop("EVLGEN_CACHE", None)
    else:
        os.environ["EVLGEN_CACHE"] = _session["user_cache"]
    if _session["temporary"]:
        shutil.rmtree(_session["cache"], ignore_errors=True)


@pytest.fixture(scope="session")
def test_cache() -> Path:
    """The session's test-only cache (for tests that replace EVLGEN_CACHE but want built assets kept)."""
    return _session["cache"]
