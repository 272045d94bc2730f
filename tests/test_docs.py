"""What the documentation names exists: every dotted reference to a ``pipeline`` module or
attribute (``pipeline.train.loop.train_run``, ``pipeline.jobs:run_step``, a Sphinx role such as
``:func:`pipeline.io.read_json```) in the package's docstrings, comments and strings, the thin
scripts, README.md and the config schema's descriptions resolves in ``src/pipeline`` (as does a path
``src/pipeline/...``): the module
is a ``.py`` file or a package there, and a named attribute is defined in it (read with
:mod:`ast`, nothing imported). Roles without the ``pipeline.`` prefix in a module's docstrings
(``:func:`train```) name something that module defines or imports.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "pipeline"

#: ``pipeline.a.b``, ``pipeline.a.b.name``, ``pipeline.a.b:name`` (a code target)
DOTTED = re.compile(r"(?<![\w./-])pipeline(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?")
#: ``:func:`name```, ``:class:`~a.b.C```, ``:mod:`a.b``` (Sphinx roles), target without ``~``
ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|obj|exc):`~?([A-Za-z_][\w.]*)`")
#: ``src/pipeline/a/b.py``, ``src/pipeline/a/`` (a path in the tree)
PATH = re.compile(r"src/pipeline(?:/[A-Za-z_]\w*)+(?:\.py)?")
#: placeholders that stand for any module, not a reference
PLACEHOLDERS = {"pipeline.module", "pipeline.module:name"}


def _module_file(module: str) -> Path | None:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _names(body) -> dict[str, ast.AST]:
    """Names a module or class body binds: definitions, assignments, imports."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out[name.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                out[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, ast.If | ast.Try):  # e.g. a guarded import
            out.update(_names(node.body))
    return out


@cache
def _bound_anywhere(path: Path) -> frozenset[str]:
    """Every name a module binds at any depth: definitions (methods too), imports (those inside
    functions too), assignments at module or class level."""
    out = set(_names(_tree(path).body))
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
            if isinstance(node, ast.ClassDef):
                out.update(_names(node.body))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(out)


def resolves(reference: str) -> bool:
    """Whether ``pipeline.a.b[.name[.attr]]`` or ``pipeline.a.b:name`` exists in the sources."""
    dotted, _, target = reference.partition(":")
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
        file = _module_file(".".join(parts[:cut]))
        if file is not None:
            break
    else:
        return False
    rest = parts[cut:] + (target.split(".") if target else [])
    body = _tree(file).body
    for depth, name in enumerate(rest):
        names = _names(body)
        if name not in names:
            return False
        node = names[name]
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            return resolves(".".join([node.module, name, *rest[depth + 1 :]]))
        if not isinstance(node, ast.ClassDef):
            return True  # an attribute of a function or a value: not followed
        body = node.body
    return True


def _py_texts(path: Path):
    """``(line, text)`` of each comment and string literal of a Python file."""
    source = path.read_text()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            yield tok.start[0], tok.string
        elif tok.type == getattr(tokenize, "FSTRING_MIDDLE", None):
            yield tok.start[0], tok.string


def _schema_descriptions(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                yield ".".join(map(str, path)), value
            else:
                yield from _schema_descriptions(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schema_descriptions(value, (*path, i))


def _sources():
    yield from sorted(PACKAGE.rglob("*.py"))
    yield from sorted((ROOT / "workflow" / "scripts").glob("*.py"))


def stale_references() -> list[str]:
    found = []

    def check(where, text, module=None):
        for match in DOTTED.finditer(text):
            ref = match.group(0)
            if ref not in PLACEHOLDERS and not resolves(ref):
                found.append(f"{where}: {ref}")
        for match in PATH.finditer(text):
            if not (ROOT / match.group(0)).exists():
                found.append(f"{where}: {match.group(0)} does not exist")
        for match in ROLE.finditer(text):
            ref = match.group(1).rstrip(".")
            if "." in ref:
                continue  # pipeline.*: checked above; another package's (scipy.linalg.eigh)
            if module is not None and ref not in _bound_anywhere(module):
                found.append(f"{where}: {ref} is neither defined nor imported in {module.name}")

    for path in _sources():
        module = path if PACKAGE in path.parents else None
        for line, text in _py_texts(path):
            check(f"{path.relative_to(ROOT)}:{line}", text, module)
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        check(f"README.md:{number}", line)
    schema = yaml.safe_load((ROOT / "config" / "schema" / "config.schema.yaml").read_text())
    for where, text in _schema_descriptions(schema):
        check(f"config.schema.yaml {where}", text)
    return found


def test_every_reference_in_the_documentation_resolves():
    stale = stale_references()
    assert not stale, "references to code that is not there:\n" + "\n".join(stale)


@pytest.mark.parametrize(
    "reference, exists",
    [
        ("pipeline.io", True),
        ("pipeline.train", True),  # a package
        ("pipeline.train.loop.train_run", True),
        ("pipeline.jobs:run_step", True),
        ("pipeline.config.TrainHparams.lr", True),  # a dataclass field
        ("pipeline.config.TrainHparams.lrate", False),
        ("pipeline.train.loop.no_such_function", False),
        ("pipeline.no_such_module", False),
        ("pipeline.jobs:no_such_function", False),
    ],
)
def test_the_resolver(reference, exists):
    assert resolves(reference) is exists


def test_the_patterns_find_references_in_prose():
    text = "see pipeline.jobs.run_step. Or :func:`~pipeline.io.read_json`, and src/pipeline/io.py"
    found = ["pipeline.jobs.run_step", "pipeline.io.read_json"]  # not the path's pipeline/io
    assert [m.group(0) for m in DOTTED.finditer(text)] == found
    assert [m.group(1) for m in ROLE.finditer(text)] == ["pipeline.io.read_json"]
    assert [m.group(0) for m in PATH.finditer(text)] == ["src/pipeline/io.py"]
