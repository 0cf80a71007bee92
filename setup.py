"""Build the compiled packet engine, or fall back to the pure-Python twin.

APPLIANCE_PUREPYTHON=1 skips the extension; APPLIANCE_REQUIRE_EXTENSION=1 turns a failed
build (no compiler, no Cython) into an error instead of a pure-Python install.
"""

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PURE = bool(os.environ.get("APPLIANCE_PUREPYTHON")) or platform.python_implementation() != "CPython"
REQUIRE = bool(os.environ.get("APPLIANCE_REQUIRE_EXTENSION"))


class OptionalBuildExt(build_ext):
    """Swallow compiler failures (a pure build still works) unless the extension is required."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001  any toolchain failure
            self._fallback(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fallback(exc)

    def _fallback(self, exc):
        if REQUIRE:
            raise
        print(f"*** _fastpath: the compiled build failed ({exc}); installing the pure-Python build ***",
              file=sys.stderr)


def extensions():
    if PURE:
        print("*** _fastpath: pure-Python build ***", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE:
            raise
        print("*** _fastpath: Cython missing; pure-Python build ***", file=sys.stderr)
        return []
    print("*** _fastpath: accelerated build ***", file=sys.stderr)
    flags = ["-O3", "-Wno-unused-function"]
    exts = [
        # libcrypto: the sync's HMAC-SHA256 (OpenSSL's low-level SHA-256, deprecated in 3.0 but
        # the only API without a provider lookup per call)
        Extension("_fastpath._cengine", ["_fastpath/_cengine.pyx"], libraries=["crypto"],
                  extra_compile_args=flags + ["-Wno-deprecated-declarations"]),
        # the inline bridge's forwarding loop; cimports the engine's C core
        Extension("appliance._bridge", ["appliance/_bridge.pyx"], extra_compile_args=flags),
    ]
    return cythonize(exts, compiler_directives={"language_level": 3}, include_path=["."], quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
