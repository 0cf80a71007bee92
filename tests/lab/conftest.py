"""Fixtures for the lab tests: skip without root / usable `ip netns`, unique lab names, teardown.

Every lab a test brings up gets a unique name ("t" + 6 hex digits) and is taken down when the
test (or module) ends, whatever happened; a session finalizer downs any name still left.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import labutil  # noqa: E402
from appliance.lab import Lab  # noqa: E402


@pytest.fixture(scope="session")
def netns_ok():
    reason = labutil.netns_unusable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def make_lab(netns_ok):
    """make_lab(**Lab kwargs) -> a running Lab, taken down after the test."""
    stack = contextlib.ExitStack()
    with stack:
        yield lambda **kw: stack.enter_context(labutil.running_lab(**kw))


@pytest.fixture(scope="session", autouse=True)
def _down_leftovers():
    yield
    if os.geteuid() == 0:
        for name in sorted(labutil.NAMES):
            try:
                Lab.down_by_name(name)
            except Exception as exc:  # noqa: BLE001
                print(f"could not down lab {name}: {exc}", file=sys.stderr)
