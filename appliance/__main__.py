"""The `appliance` command line: lab, client and server appliances."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# Each module defines register(subparsers), adding its sub-command with set_defaults(func=...);
# func(args) returns the exit status.
COMMAND_MODULES = ("appliance.demo", "appliance.lab", "appliance.client", "appliance.server", "appliance.control", "appliance.top")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show the version and which packet-engine build is loaded")
    info.set_defaults(func=_info)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # not written yet
        module.register(sub)
    return parser


def _info(args) -> int:
    import _fastpath

    print(f"appliance {__version__}, packet engine build: {_fastpath.BUILD}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        return _info(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
