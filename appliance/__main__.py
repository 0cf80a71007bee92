"""The `appliance` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="show the version and which packet-engine build is loaded")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "info"):
        import _fastpath

        print(f"appliance {__version__}, packet engine build: {_fastpath.BUILD}")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
