"""The protocol core is sans-IO: no module of ``sealmq`` may import
a socket, an MQTT client, asyncio, a clock or a random source, nor any app package (the apps
depend on the core, never the reverse). Checked on the source's AST, so a function-level import
cannot hide."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "sealmq"
IO_MODULES = {
    "socket", "asyncio", "ssl", "select", "selectors", "threading", "subprocess",
    "time", "random", "secrets", "uuid", "paho", "amqtt", "sqlite3", "logging",
}
APP_PACKAGES = {"pki", "broker", "device", "backend", "runtime", "bench", "app"}
FORBIDDEN_MODULES = IO_MODULES | APP_PACKAGES
FORBIDDEN_NAMES = {("os", "urandom"), ("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today")}


def core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_is_sans_io(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in FORBIDDEN_MODULES, f"{path}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in FORBIDDEN_MODULES, f"{path}: from {node.module}"
            assert node.module != "os" or all(a.name != "urandom" for a in node.names), path
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in FORBIDDEN_NAMES, f"{path}: {node.value.id}.{node.attr}"


def test_relative_imports_stay_inside_the_core() -> None:
    """``from .. import x`` cannot climb out of ``sealmq`` to reach an app package either."""
    for path in core_files():
        depth = len(path.relative_to(CORE).parts) - 1  # 0 for sealmq/x.py
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= depth + 1, f"{path}: relative import above sealmq"


def test_the_check_sees_the_core() -> None:
    names = {p.name for p in core_files()}
    assert {"cbor.py", "errors.py", "kdf.py", "topics.py", "identity.py"} <= names
    assert "cli.py" not in {p.name for p in core_files() if p.parent == CORE}


def test_the_compiled_part_of_the_core_is_sans_io_too() -> None:
    """``sealmq/_speedups.c`` (the record path's framing) includes only Python's and C's string
    headers, and calls no import, clock, random source or file: everything it uses comes in as an
    argument (the AEAD object among them)."""
    sources = sorted(CORE.rglob("*.c"))
    assert [p.name for p in sources] == ["_speedups.c"]
    text = re.sub(r"/\*.*?\*/", "", sources[0].read_text(), flags=re.DOTALL)  # the code, not its comments
    assert re.findall(r"#include\s*[<\"]([^>\"]+)", text) == ["Python.h", "string.h"]
    for call in ("PyImport_", "time(", "clock", "rand", "getrandom", "fopen", "open(", "socket", "PyRun_"):
        assert call not in text.replace("open_hot(", "").replace("_open_hot", ""), call
