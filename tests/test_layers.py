"""The layering contract (docs/architecture.md): which package may import which.

    app                                  the top floor: the sealmq command, the demo, bootstrap
    pki   broker   device   backend      the parts; device and backend may use pki, nothing else sideways
    runtime                              I/O shared by the parts (MQTT link, audit, driver, files, config)
    sealmq                               the sans-IO protocol core

A package imports only packages below it, plus the sideways arrows listed in ``SIDEWAYS``.
``tests``, ``bench`` and ``fuzz`` stand outside the building: they may import anything, and no layered
package imports them. Checked on every module's AST, so a function-level import or an
``importlib.import_module("...")`` with a literal name cannot hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"sealmq": 0, "runtime": 1, "pki": 2, "broker": 2, "device": 2, "backend": 2, "app": 3}
OUTSIDE = {"tests", "bench", "fuzz"}
SIDEWAYS = {("device", "pki"), ("backend", "pki")}  # an agent and a service load their identities


def imported_modules(source: str, name: str) -> list[str]:
    """Every absolute module name the source imports, wherever the import statement is."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def violations(package: str, sources: list[tuple[str, str]]) -> list[str]:
    """Arrows out of ``package`` that break the contract; ``sources`` are (path from ROOT, text)."""
    found = []
    for rel, source in sources:
        for module in imported_modules(source, rel):
            target = module.split(".")[0]
            if target == package:
                continue
            if target in OUTSIDE:
                found.append(f"{rel}: imports {module} (tests and bench are not part of the product)")
            elif target in LAYER and LAYER[target] >= LAYER[package] and (package, target) not in SIDEWAYS:
                found.append(f"{rel}: imports {module} ({package} is not above {target})")
    return found


def package_sources(package: str) -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize("package", sorted(LAYER))
def test_package_imports_only_downwards(package: str) -> None:
    assert violations(package, package_sources(package)) == []


def test_the_check_sees_every_package_and_catches_a_wrong_arrow() -> None:
    assert {rel.split("/")[0] for package in LAYER for rel, _ in package_sources(package)} == set(LAYER)
    assert "app/cli.py" in dict(package_sources("app"))
    cases = {
        "runtime": "from app import demo\n",
        "pki": "import device.agent\n",
        "device": "def f():\n    from backend.service import BackendService\n",
        "backend": "import importlib\nimportlib.import_module('device.agent')\n",
        "broker": "from tests.brokers import free_port\n",
        "sealmq": "from runtime import mqtt\n",
    }
    for package, source in cases.items():
        assert len(violations(package, [(f"{package}/_probe.py", source)])) == 1, package
    # the allowed arrows stay allowed
    assert violations("device", [("device/_probe.py", "from pki import layout\nfrom runtime import mqtt\n")]) == []
    assert violations("app", [("app/_probe.py", "import backend.service\nimport device.agent\n")]) == []
