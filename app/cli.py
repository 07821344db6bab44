"""The ``sealmq`` console script: one entry point for every part of the product.

It only wires the subcommands of ``pki``, ``broker``, ``device``, ``backend`` and the demo
together; each of those modules exposes ``register(subparsers)``. The imports are plain and
static: a part that fails to import fails the command loudly, it is never skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import backend.cli
import broker.cli
import device.cli
import pki.cli
from app import config, demo, workers
from runtime import exits
from sealmq import __version__
from sealmq.errors import SealmqError

# each registers one top-level subcommand (or several), in this order in --help
_SUBCOMMANDS = (pki.cli, broker.cli, backend.cli, device.cli, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sealmq",
        description="End-to-end sealed messaging between IoT devices and a backend over MQTT.",
        epilog="exit codes: 0 done; 1 ran but did not finish what was asked; 2 usage or configuration error; "
               "3 broker unreachable (--connect-timeout); 4 broker refused the credentials; 130 interrupted. "
               f"With ${config.ENV}=DIR/sealmq.toml (written by `sealmq bootstrap`), commands take their paths "
               "(--pki, --data, --state, --passwd) from it; flags win.",
    )
    from sealmq import record

    framing = "compiled" if record.speedups is not None else "Python (built without a C compiler)"
    parser.add_argument("--version", action="version", version=f"sealmq {__version__} (record framing: {framing})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        module.register(sub)
    workers.register(parser)  # scale-out (issue 14): backend run --workers N
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    paths = None
    try:
        if os.environ.get(config.ENV):
            paths = config.load(Path(os.environ[config.ENV]))
            config.apply(parser, paths)
    except SealmqError as exc:
        print(f"sealmq: error: {exc}", file=sys.stderr)
        return exits.code_for(exc)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the supervisor's workers repeat it (app/workers.py)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return exits.USAGE
    if paths is not None:
        config.complete(args, paths)
    try:
        result = func(args)
    except SealmqError as exc:
        print(f"sealmq: error: {exc}", file=sys.stderr)
        return exits.code_for(exc)
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
