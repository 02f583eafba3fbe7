"""What code a step runs, as one hash for its cache key.

A step's code is the module that defines it plus every module it imports, transitively,
from the packages it follows (Loopline's own and the step's package; a user's architecture
package for the steps that build the user's model) and from any module that is not
installed code, i.e. whose file lies outside the standard library and every
``site-packages``: a user's project module next to their architecture (``from layers import
Block``) is hashed, torch and numpy are not. Imports are found by reading source with
``ast``, function-local ones included, and modules are located without importing them, so
hashing the train step does not import torch. The installed Loopline version is hashed too.

Every file is read and hashed each time (cheap); only the parse of its imports is cached
per process, by the content's hash, so any edit is seen whatever its size or timestamp.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from functools import cache
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

from loopline.digest import sha256_bytes

Imports = tuple[tuple[str, tuple[str, ...]], ...]

# (sha256 of the source, module name, is a package) -> the names the source imports
_PARSED: dict[tuple[str, str, bool], Imports] = {}


def module_spec(name: str) -> ModuleSpec | None:
    """Find module ``name`` without executing it or its parent packages (None if absent)."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return getattr(loaded, "__spec__", None)
    parts = name.split(".")
    try:
        spec = importlib.util.find_spec(parts[0]) if len(parts) == 1 else module_spec(parts[0])
    except (ImportError, ValueError):
        return None
    for i in range(1, len(parts)):
        locations = spec.submodule_search_locations if spec is not None else None
        if not locations:
            return None
        full = ".".join(parts[: i + 1])
        loaded = sys.modules.get(full)
        if loaded is not None:
            spec = getattr(loaded, "__spec__", None)
            continue
        spec = PathFinder.find_spec(full, list(locations))
    return spec


def module_file(name: str) -> Path | None:
    """The ``.py`` source file of module ``name``, found without importing it."""
    spec = module_spec(name)
    origin = spec.origin if spec is not None else None
    if origin is None:  # a script run as __main__ has no spec, only a file
        origin = getattr(sys.modules.get(name), "__file__", None)
    if not origin or not origin.endswith(".py"):
        return None
    return Path(origin)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (never run)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(
    tree: ast.AST, module: str, is_package: bool
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(module, names) per import: ``import a.b`` gives ('a.b', ()), ``from a import b, c``
    gives ('a', ('b', 'c')); relative imports are made absolute."""
    found: list[tuple[str, tuple[str, ...]]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in _nodes(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                if node.level - 1 > len(anchor) or not package:
                    continue
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base:
                found.append((base, tuple(a.name for a in node.names if a.name != "*")))
    return tuple(sorted(set(found)))


def _parse(path: Path, module: str) -> tuple[str, Imports]:
    """(sha256 of the file's bytes, what it imports)."""
    source = path.read_bytes()
    digest = sha256_bytes(source)
    key = (digest, module, path.name == "__init__.py")
    imports = _PARSED.get(key)
    if imports is None:
        try:
            imports = _imports(ast.parse(source, filename=str(path)), module, key[2])
        except SyntaxError:
            imports = ()  # the step fails when it runs; its hash still follows the bytes
        _PARSED[key] = imports
    return digest, imports


@cache
def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib") if key in paths})


def is_installed_file(path: str | Path) -> bool:
    """Whether ``path`` is installed code: in the standard library or a ``site-packages``
    (``dist-packages`` on Debian) folder, as opposed to a project's own source."""
    real = os.path.realpath(path)
    if any(real == d or real.startswith(d + os.sep) for d in _stdlib_dirs()):
        return True
    return any(part in ("site-packages", "dist-packages") for part in Path(real).parts)


def _is_local(top: str) -> bool:
    """Whether top-level module ``top`` is found outside installed code (see above)."""
    spec = module_spec(top)
    if spec is None:
        return False
    if spec.origin and spec.has_location:
        where: str | None = spec.origin
    else:  # a namespace package has folders, not a file; a built-in module has neither
        where = next(iter(spec.submodule_search_locations or ()), None)
    return where is not None and not is_installed_file(where)


def closure(seeds: Iterable[str], follow: Iterable[str]) -> dict[str, str]:
    """Module name -> sha256 of its source for ``seeds`` and what they import, transitively,
    from the top-level packages in ``follow`` and from any module that is not installed code
    (``is_installed_file``). A seed without a source file maps to ''.

    ``from pkg import name`` counts ``pkg.name`` when that is a module, else ``pkg`` itself.
    A parent package's ``__init__`` is not counted for importing a submodule: it runs, but
    what it defines is only used through an import that names it.
    """
    roots = set(follow)
    local: dict[str, bool] = {}  # top-level name -> followed though not in ``follow``
    out: dict[str, str] = {}
    todo = list(seeds)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        path = module_file(name)
        if path is None:
            out[name] = ""
            continue
        digest, imports = _parse(path, name)
        out[name] = digest
        for base, names in imports:
            top = base.split(".")[0]
            if top not in roots:
                if top not in local:
                    local[top] = _is_local(top)
                if not local[top]:
                    continue
            plain = not names
            for n in names:
                sub = f"{base}.{n}"
                if module_file(sub) is not None:
                    todo.append(sub)
                else:
                    plain = True
            if plain and module_file(base) is not None:
                todo.append(base)
    return out


def code_digest(seeds: Iterable[str], follow: Iterable[str], *parts: str) -> str:
    """One sha256 over the closure of ``seeds`` (see ``closure``) and ``parts``."""
    text = "".join(f"{part}\0" for part in parts) + "".join(
        f"{name}={digest}\n" for name, digest in sorted(closure(seeds, follow).items())
    )
    return sha256_bytes(text.encode())
