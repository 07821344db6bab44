"""The ``sealmq`` console script: one entry point for every part of the product.

This module is the only one in the ``sealmq`` package allowed to do I/O: it only wires the
subcommands of ``pki``, ``broker``, ``device`` and ``backend`` together. Each of those
packages exposes ``register(subparsers)`` in its own ``cli`` module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sealmq import __version__
from sealmq.errors import SealmqError

# (module, attribute): each registers one top-level subcommand (or several).
_SUBCOMMANDS = (
    "pki.cli",
    "broker.cli",
    "backend.cli",
    "device.cli",
    "runtime.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sealmq",
        description="End-to-end sealed messaging between IoT devices and a backend over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"sealmq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a part not built yet must not break the others
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        result = func(args)
    except SealmqError as exc:
        print(f"sealmq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
