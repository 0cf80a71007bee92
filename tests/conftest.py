"""The `engine` fixture: every engine test runs on the compiled (`c`) and pure (`py`) builds.

APPLIANCE_PUREPYTHON set: only `py` runs (`c` is skipped with a reason). Otherwise `c` runs
too; if `_fastpath._cengine` does not import, that is a failure under
APPLIANCE_REQUIRE_EXTENSION and a skip without it.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
pytest.register_assert_rewrite("helpers")

import helpers  # noqa: E402


@pytest.fixture(params=["c", "py"])
def engine(request):
    """The engine module of one build."""
    if request.param == "c":
        yield helpers.load_cengine()
    else:
        yield helpers.load_pyengine()
