"""The two builds expose one API, and the `engine` fixture selects builds as documented."""

import os
import sys

import pytest

import _fastpath
import helpers
from _fastpath import _common as C


def test_engine_provides_the_api(engine, request):
    """Every ENGINE_API name exists in the build, and the fixture id names the build."""
    missing = [name for name in C.ENGINE_API if not hasattr(engine, name)]
    assert missing == []
    assert engine.BUILD == request.node.callspec.params["engine"]


def test_frame_error_is_value_error():
    """FrameError is a ValueError carrying the Err kind."""
    exc = C.FrameError(C.Err.BAD_IHL)
    assert isinstance(exc, ValueError) and exc.error is C.Err.BAD_IHL and "BAD_IHL" in str(exc)


def test_package_loads_the_selected_build():
    """_fastpath re-exports the build that the environment selects."""
    if os.environ.get("APPLIANCE_PUREPYTHON"):
        assert _fastpath.BUILD == "py"
    assert _fastpath.parse is _fastpath.engine.parse
    assert _fastpath.BUILD == _fastpath.engine.BUILD


def _forget_cengine(monkeypatch):
    """Make `from _fastpath import _cengine` fail with ImportError for this test."""
    monkeypatch.delattr(_fastpath, "_cengine", raising=False)
    monkeypatch.setitem(sys.modules, "_fastpath._cengine", None)


def test_loader_skips_c_under_purepython(monkeypatch):
    """APPLIANCE_PUREPYTHON set: the c build is skipped with a reason."""
    monkeypatch.setenv("APPLIANCE_PUREPYTHON", "1")
    with pytest.raises(pytest.skip.Exception, match="APPLIANCE_PUREPYTHON"):
        helpers.load_cengine()


def test_loader_skips_missing_extension(monkeypatch):
    """No compiled build and no APPLIANCE_REQUIRE_EXTENSION: c is skipped."""
    monkeypatch.delenv("APPLIANCE_PUREPYTHON", raising=False)
    monkeypatch.delenv("APPLIANCE_REQUIRE_EXTENSION", raising=False)
    _forget_cengine(monkeypatch)
    with pytest.raises(pytest.skip.Exception, match="not available"):
        helpers.load_cengine()


def test_loader_fails_when_extension_required(monkeypatch):
    """No compiled build under APPLIANCE_REQUIRE_EXTENSION: a failure, not a skip."""
    monkeypatch.delenv("APPLIANCE_PUREPYTHON", raising=False)
    monkeypatch.setenv("APPLIANCE_REQUIRE_EXTENSION", "1")
    _forget_cengine(monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="APPLIANCE_REQUIRE_EXTENSION"):
        helpers.load_cengine()


def test_loader_returns_the_compiled_build(monkeypatch):
    """Without APPLIANCE_PUREPYTHON the loader gives the compiled module when it imports."""
    monkeypatch.delenv("APPLIANCE_PUREPYTHON", raising=False)
    try:
        from _fastpath import _cengine
    except ImportError:
        pytest.skip("the compiled build is not available")
    assert helpers.load_cengine() is _cengine and _cengine.BUILD == "c"
