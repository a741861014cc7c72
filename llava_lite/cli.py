"""The ``llava-lite`` command. Each module that offers a sub-command defines
``register_cli(subparsers)``, adding its parser with ``set_defaults(func=...)``; this file only
collects them."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# modules offering sub-commands, in the order the tutorial uses them
COMMAND_MODULES = [
    "llava_lite.world",
    "llava_lite.teachers.instruct",
    "llava_lite.validate",
    "llava_lite.backbones",
    "llava_lite.features",
    "llava_lite.pipeline",
    "llava_lite.tutorial",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-lite", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a module not written yet: its command is simply absent
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logging.getLogger("llava_lite").error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
