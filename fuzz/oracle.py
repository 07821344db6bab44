"""The fuzzing oracle: which exceptions are the project's own (a rejection) and which are a crash.

Every entry point must answer bad input with an error of the project's hierarchy
(:class:`sealmq.errors.SealmqError`, which the PKI's ``PkiError``/``CertificateError``/``CsrError``/
``KeyFileError`` and the broker's ``ConfigError`` derive from) or, for the broker's CONNECT parser, its
module-local :class:`broker.framing.ConnectParseError`. Anything else (``KeyError``, ``ValueError``, a
cryptography or cbor2 exception, an ``AssertionError`` from a harness invariant) is a crash.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from broker.framing import ConnectParseError
from sealmq.errors import SealmqError

PROJECT_ERRORS: tuple[type[BaseException], ...] = (SealmqError, ConnectParseError)


class InvariantViolated(AssertionError):
    """A harness invariant failed (e.g. a legitimate session stopped working after garbage)."""


def run_one(harness: Callable[[bytes], object], data: bytes) -> BaseException | None:
    """Feed one input; return the project error it was rejected with (None if accepted).

    A non-project exception propagates: under atheris that is a crash, libFuzzer saves the input.
    """
    try:
        harness(data)
    except PROJECT_ERRORS as err:
        return err
    return None


def is_crash(exc: BaseException) -> bool:
    return not isinstance(exc, PROJECT_ERRORS)


INJECT_MARKER = b"\xde\xad\xbe\xef"


def inject_crash(spec: str) -> Callable[[], None]:
    """Self-test of the oracle: make ``module:function`` raise ``KeyError`` for any bytes argument holding
    :data:`INJECT_MARKER` (a bug planted where the harness cannot see it). Returns the undo."""
    module_name, attr = spec.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attr)

    def injected(*args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, (bytes, bytearray)) and INJECT_MARKER in a for a in args):
            raise KeyError("injected by the oracle self-test")
        return original(*args, **kwargs)

    setattr(module, attr, injected)
    return lambda: setattr(module, attr, original)
