"""Imports flow one way (docs/design.md §1, "The parts"): every import statement in
src/replicad, read with ast, goes to a module at its own layer or below; and the two roles
meet only over the wire: nothing in primary/ imports replica/, nor the other way round.

A module that is in no layer fails too: a new module is placed in a layer here and in
docs/design.md before it lands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Highest first. A name is a package (everything under it) or a module. The same table is
# docs/design.md §1.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("replicad.cli", "replicad.demo")),
    ("api", ("replicad.api", "replicad.daemon")),
    ("roles", ("replicad.primary", "replicad.replica", "replicad.reverse", "replicad.split_brain", "replicad.host")),
    ("transport", ("replicad.transport",)),
    ("wire/tracking", ("replicad.wire", "replicad.tracking", "replicad.auth")),
    ("state", ("replicad", "replicad.catalog", "replicad.model", "replicad.errors", "replicad.config",
               "replicad.units", "replicad.times", "replicad.log", "replicad.events", "replicad.health",
               "replicad.replication_states", "replicad.replication_schedule", "replicad.resync_policy",
               "replicad.windows",
               "replicad.monitoring", "replicad.metrics", "replicad.fsutil", "replicad.workers",
               "replicad.hooks", "replicad.images", "replicad.notify", "replicad.ownership",
               "replicad.server_settings", "replicad.retention")),
]
# Packages whose members must not import each other's.
APART = ("replicad.primary", "replicad.replica")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "replicad").rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> int | None:
    """The index in LAYERS of the most specific entry that holds ``name``."""
    best: tuple[int, int] | None = None  # (length of the matching entry, layer)
    for level, (_, names) in enumerate(LAYERS):
        for n in names:
            if (n == "replicad" and name == n) or (n != "replicad" and _within(name, n)):
                if best is None or len(n) > best[0]:
                    best = (len(n), level)
    return None if best is None else best[1]


def imports(path: Path, name: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every replicad module ``path`` imports, at any depth in the file
    (functions, TYPE_CHECKING blocks included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if _within(a.name, "replicad")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not _within(target, "replicad"):
                continue
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if sub in known else target))
    return out


def violations(root: Path) -> list[str]:
    mods = modules(root)
    known = set(mods)
    problems = []
    for name, path in mods.items():
        where = path.relative_to(root)
        src = layer_of(name)
        if src is None:
            problems.append(f"{where}: {name} is in no layer (tests/unit/test_layers.py LAYERS, docs/design.md §1)")
            continue
        for line, target in imports(path, name, known):
            dst = layer_of(target)
            if dst is None:
                problems.append(f"{where}:{line}: imports {target}, which is in no layer")
            elif dst < src:
                problems.append(f"{where}:{line}: {name} ({LAYERS[src][0]}) -> {target} ({LAYERS[dst][0]}): "
                                "imports a higher layer")
            for a, b in (APART, APART[::-1]):
                if _within(name, a) and _within(target, b):
                    problems.append(f"{where}:{line}: {name} -> {target}: {a.rpartition('.')[2]}/ imports "
                                    f"{b.rpartition('.')[2]}/ (the roles meet only over the wire)")
    return problems


def test_imports_flow_one_way() -> None:
    problems = violations(SRC)
    assert not problems, "imports against the documented order:\n" + "\n".join(problems)


@pytest.mark.parametrize("body, line, expected", [
    ("from .api.context import Host\n", 2, "replicad.catalog (state) -> replicad.api.context (api)"),
    ("from .auth.authorize import Grant\n", 2, "replicad.catalog (state) -> replicad.auth.authorize (wire/tracking)"),
    ("import replicad.transport.client\n", 2, "replicad.catalog (state) -> replicad.transport.client (transport)"),
    ("def later():\n    from .api import context\n", 3, "replicad.catalog (state) -> replicad.api.context (api)"),
])
def test_an_upward_import_is_named(tmp_path: Path, body: str, line: int, expected: str) -> None:
    """The check itself: a made-up tree with one upward edge fails, naming the file, the
    line and the edge; downward and same-layer imports pass."""
    pkg = tmp_path / "replicad"
    for d in ("api", "auth", "transport"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "api" / "context.py").write_text("from ..catalog import Catalog\nfrom ..transport import client\n")
    (pkg / "auth" / "authorize.py").write_text("from .. import model\n")
    (pkg / "transport" / "client.py").write_text("from ..auth.authorize import Grant\n")
    (pkg / "model.py").write_text("")
    (pkg / "catalog.py").write_text('"""doc"""\n' + body + "from . import model\n")
    problems = violations(tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"replicad/catalog.py:{line}: {expected}"), problems


def test_the_roles_meet_only_over_the_wire(tmp_path: Path) -> None:
    pkg = tmp_path / "replicad"
    for d in ("primary", "replica"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "primary" / "engine.py").write_text("from ..replica import service\n")
    (pkg / "replica" / "service.py").write_text("")
    assert violations(tmp_path) == [
        "replicad/primary/engine.py:1: replicad.primary.engine -> replicad.replica.service: "
        "primary/ imports replica/ (the roles meet only over the wire)"]


def test_a_module_in_no_layer_is_named(tmp_path: Path) -> None:
    pkg = tmp_path / "replicad"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "gadget.py").write_text("")
    problems = violations(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("replicad/gadget.py: replicad.gadget is in no layer")
