"""Only the compat modules touch the internals of pynetdicom, transformers and uvicorn.

A walk over the source (AST) of cxrnode/, model/ and worker/: outside
cxrnode/compat/pynetdicom.py, cxrnode/compat/uvicorn.py and model/compat.py, no module
imports a private name or module of those libraries, reads or writes a private attribute
through them, overrides or reads a private member of a class derived from theirs, or uses
the few public-looking internals we know of (``to_user_queue``). In a module that imports one
of the libraries, a private attribute of any object other than ``self``/``cls`` of its own
classes counts too (its type is unknown to the walk: it may be the library's).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("pynetdicom", "transformers", "uvicorn")
COMPAT = {
    Path("cxrnode/compat/pynetdicom.py"),
    Path("cxrnode/compat/uvicorn.py"),
    Path("model/compat.py"),
}
#: Library internals without a leading underscore.
INTERNAL_NAMES = frozenset({"to_user_queue"})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _from_library(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in LIBRARIES


def violations(path: Path) -> list[str]:
    """Each use of a library internal in ``path``, as ``file:line: what``."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(REPO)
    found: list[str] = []
    library_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _from_library(alias.name):
                    library_names.add((alias.asname or alias.name).split(".")[0])
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"{where}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and _from_library(node.module):
            if any(_private(part) for part in (node.module or "").split(".")):
                found.append(f"{where}:{node.lineno}: imports from {node.module}")
            for alias in node.names:
                library_names.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"{where}:{node.lineno}: imports {node.module}.{alias.name}")
    if not library_names:
        return found
    derived = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(
            isinstance(base, ast.Name | ast.Attribute)
            and (ast.unparse(base).split(".")[0] in library_names)
            for base in node.bases
        )
    }

    def visit(node: ast.AST, owner: str | None) -> None:
        if isinstance(node, ast.ClassDef):
            owner = node.name
            if owner in derived:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and _private(
                        item.name
                    ):
                        found.append(
                            f"{where}:{item.lineno}: overrides {owner}.{item.name} "
                            "of a library class"
                        )
        if isinstance(node, ast.Attribute):
            receiver = node.value
            own = isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")
            if node.attr in INTERNAL_NAMES:
                found.append(f"{where}:{node.lineno}: uses internal {ast.unparse(node)}")
            elif _private(node.attr) and (not own or owner in derived):
                found.append(f"{where}:{node.lineno}: private attribute {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, owner)

    visit(tree, None)
    return found


def sources() -> list[Path]:
    return sorted(
        path
        for package in ("cxrnode", "model", "worker")
        for path in (REPO / package).rglob("*.py")
        if "migrations" not in path.parts
    )


def test_no_module_but_the_compat_modules_touches_library_internals() -> None:
    outside = [p for p in sources() if p.relative_to(REPO) not in COMPAT]
    assert len(outside) > 50  # the walk found the packages
    found = [line for path in outside for line in violations(path)]
    assert found == [], "move these into a compat module:\n" + "\n".join(found)


def test_the_walk_sees_the_internals_the_compat_modules_use() -> None:
    """The checker can fail: run on the compat modules, it finds what they exist for."""
    found = {str(p): violations(REPO / p) for p in COMPAT}
    pynetdicom_uses = "\n".join(found["cxrnode/compat/pynetdicom.py"])
    assert "_create_association" in pynetdicom_uses
    assert "to_user_queue" in pynetdicom_uses
    assert "imports pynetdicom._config" in pynetdicom_uses
    assert "_run_loop_delay" in pynetdicom_uses
    assert "_attn_implementation" in "\n".join(found["model/compat.py"])
    assert "main_loop" not in "\n".join(found["cxrnode/compat/uvicorn.py"])  # public names
    assert "_exit" in "\n".join(found["cxrnode/compat/uvicorn.py"])
