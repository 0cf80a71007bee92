"""The packet engine: parse, checksum, rewrite and build TCP/IP frames, and a flow table.

Two builds with one API: the compiled `_cengine` (Cython, the per-frame path in C) and the
pure-Python `_pyengine`. APPLIANCE_PUREPYTHON=1 forces the pure build; without it the
compiled build is loaded when present, and APPLIANCE_REQUIRE_EXTENSION=1 makes its absence
an error. BUILD says which one is loaded ("c" or "py").
"""

import os as _os

from ._common import *  # noqa: F401,F403  constants, encoders, crypto, sequence arithmetic
from ._common import ENGINE_API as _ENGINE_API

if _os.environ.get("APPLIANCE_PUREPYTHON"):
    from . import _pyengine as engine
else:
    try:
        from . import _cengine as engine
    except ImportError:
        if _os.environ.get("APPLIANCE_REQUIRE_EXTENSION"):
            raise
        from . import _pyengine as engine

globals().update({_name: getattr(engine, _name) for _name in _ENGINE_API})
