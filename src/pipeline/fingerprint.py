"""Code fingerprints: a hash of the ``pipeline`` code a job's output depends on.

Every rule passes ``code_fingerprint(entry, ...)`` as its ``code`` param, so Snakemake re-runs a
job (and, through its inputs, everything downstream) exactly when that code changes. The rule:

- **Closure.** From the entry (the job's script, or a ``pipeline.module:name``), follow every name
  the code uses that resolves into ``pipeline``: same-module definitions, ``from pipeline... import
  name``, ``module.name`` and ``package.module.name`` through imported modules, imports inside
  functions, decorators, base classes and module-level constants. A class counts whole (its methods
  too), so a method called on an instance is covered when the class is reached by name. A module
  reached counts with what importing it runs (its module-level statements that call code, and
  the code its decorators call). This module itself never counts: it changes no result.
- **Registries.** ``registry.get(name)`` reaches the entries the job's configuration selects: for
  each registry, the entries named by the rule (e.g. the cache rule's metric), else the entries
  whose names appear as strings in the job's configuration (a run's hyperparameters, a study's
  block) or as string constants in the closure's code (a default like ``spec.get("dataset",
  "digits")``). The registered functions' modules count like any other.
- **Code, not text.** Each definition is hashed as :func:`ast.unparse` of its syntax tree with
  docstrings and other bare string statements removed: comments, docstrings and formatting do
  not count.
- **Hyperparameter defaults.** In a ``@dataclass`` whose name ends in ``Hparams``, field
  declarations are not part of the class's hash; a field's declaration (type and default, not its
  help text) counts only in the fingerprint of code that names the field (as ``x.field``,
  ``"field"`` or ``field=``). Adding a field with a default changes no fingerprint; changing a
  default re-runs every job whose code reads that field.
- **Errors.** A name that the code imports from ``pipeline`` (or reaches as ``module.name``) and
  that does not exist raises :class:`CodeError` naming the module and the name, as does an
  unknown entry or a configured registry name that is not registered.

Parsing is cheap and never imports the code (nor torch): each module's analysis is cached in its
``__pycache__`` directory, keyed by a hash of the file's bytes.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from pipeline import io
from pipeline import registry as _registry

SELF = "pipeline.fingerprint"  # this module: never part of a closure
#: The analysis below, by its own bytes: cached analyses of another version are not used.
ANALYSER = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
_NAMELIKE = re.compile(r"[A-Za-z_][\w.\-]{0,63}")


class CodeError(LookupError):
    """A fingerprint names code that does not exist; the message names module and name."""


class Untracked:
    """A rule param Snakemake passes to the job but neither records nor compares (it is not a
    builtin type): the code fingerprint of training that does not re-run on code changes, or the
    fingerprints (a tuple) a training job records in its runs' summaries."""

    def __init__(self, value: str | tuple[str, ...]):
        self.value = value

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return f"Untracked({self.value!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Untracked) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


# -- one module's analysis (cached on disk) ------------------------------------------------------
_BODIES = tuple(
    getattr(ast, kind)
    for kind in (
        "Module",
        "FunctionDef",
        "AsyncFunctionDef",
        "ClassDef",
        "If",
        "For",
        "AsyncFor",
        "While",
        "With",
        "AsyncWith",
        "Try",
        "TryStar",
        "ExceptHandler",
        "match_case",
    )
    if hasattr(ast, kind)
)


def _strip_strings(tree: ast.AST) -> None:
    """Remove docstrings and other bare string statements (no-ops) from every body, in place."""
    for node in ast.walk(tree):
        if not isinstance(node, _BODIES):
            continue
        for attr in ("body", "orelse", "finalbody"):
            body = getattr(node, attr, None)
            if not body:
                continue
            kept = [
                s
                for s in body
                if not (
                    isinstance(s, ast.Expr)
                    and isinstance(s.value, ast.Constant)
                    and isinstance(s.value.value, str)
                )
            ]
            if len(kept) != len(body):
                setattr(node, attr, kept or [ast.Pass()])


def _import_targets(node, package: str) -> list[tuple[str, list]]:
    """``(local name, target)`` bound by an import statement. Targets: ``["mod", module]``,
    ``["from", module, name]`` for ``pipeline`` code, ``["ext"]`` for anything else."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            internal = alias.name == "pipeline" or alias.name.startswith("pipeline.")
            if alias.asname:
                out.append((alias.asname, ["mod", alias.name] if internal else ["ext"]))
            else:
                top = alias.name.split(".")[0]
                out.append((top, ["mod", top] if internal else ["ext"]))
        return out
    if node.level:
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        src = ".".join(base + ([node.module] if node.module else []))
    else:
        src = node.module or ""
    internal = src == "pipeline" or src.startswith("pipeline.")
    for alias in node.names:
        if alias.name == "*":
            if internal:
                raise CodeError(f"{package}: 'from {src} import *' cannot be fingerprinted")
            continue
        out.append((alias.asname or alias.name, ["from", src, alias.name] if internal else ["ext"]))
    return out


def _chain(node: ast.Attribute) -> list[str] | None:
    parts = [node.attr]
    value = node.value
    while isinstance(value, ast.Attribute):
        parts.append(value.attr)
        value = value.value
    if not isinstance(value, ast.Name):
        return None
    parts.append(value.id)
    return parts[::-1]


def _is_hparams(node) -> bool:
    if not (isinstance(node, ast.ClassDef) and node.name.endswith("Hparams")):
        return False
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def _field_declaration(stmt: ast.AnnAssign) -> str:
    """A dataclass field's type and default, without its help text or other metadata."""
    text = ast.unparse(stmt.annotation)
    value = stmt.value
    if isinstance(value, ast.Call):
        for kw in value.keywords:
            if kw.arg in ("default", "default_factory"):
                return f"{text} {kw.arg}={ast.unparse(kw.value)}"
        return text
    return f"{text} = {ast.unparse(value)}" if value is not None else text


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unit(nodes: list[ast.AST], package: str) -> dict:
    """Hash, references, bound names and identifiers of one top-level name's definition(s).

    ``ids``: attribute and keyword names and string constants (a hyperparameter field is *named*
    by code that mentions it so); ``strs``: the name-like string constants alone (they select
    registry entries, e.g. a default dataset name).
    """
    texts, refs, ids, strs, bound, local, fields = [], set(), set(), set(), set(), {}, {}
    for node in nodes:
        walked = [node]
        if _is_hparams(node):
            declared = [
                s
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            ]
            fields.update({s.target.id: _digest(_field_declaration(s)) for s in declared})
            node = copy.copy(node)
            node.body = [s for s in node.body if s not in declared] or [ast.Pass()]
            walked = [node]
            for s in declared:  # what the declarations call, and default names, still count
                if s.value is not None:
                    refs.update((k, tuple(r) if k == "c" else r) for k, r in _refs(s.value))
                    strs.update(
                        c.value
                        for c in ast.walk(s.value)
                        if isinstance(c, ast.Constant)
                        and isinstance(c.value, str)
                        and _NAMELIKE.fullmatch(c.value)
                    )
        texts.append(ast.unparse(node))
        for sub in (x for w in walked for x in ast.walk(w)):
            kind = type(sub)
            if kind is ast.Name:
                refs.add(("n", sub.id))
                if type(sub.ctx) is not ast.Load:
                    bound.add(sub.id)
            elif kind is ast.Attribute:
                ids.add(sub.attr)
                chain = _chain(sub)
                if chain is not None:
                    refs.add(("c", tuple(chain)))
            elif kind is ast.Constant:
                if type(sub.value) is str and _NAMELIKE.fullmatch(sub.value):
                    strs.add(sub.value)
            elif kind is ast.keyword:
                if sub.arg:
                    ids.add(sub.arg)
            elif kind is ast.arg:
                bound.add(sub.arg)
            elif kind is ast.Import or kind is ast.ImportFrom:
                local.update(_import_targets(sub, package))
            elif kind is ast.ExceptHandler and sub.name:
                bound.add(sub.name)
    return {
        "hash": _digest("\n".join(texts)),
        "refs": sorted([kind, list(ref) if kind == "c" else ref] for kind, ref in refs),
        "ids": sorted(ids),
        "strs": sorted(strs),
        "bound": sorted(bound),
        "local": local,
        "fields": fields,
    }


def _refs(node: ast.AST) -> list[list]:
    """Names (``["n", name]``) and attribute chains (``["c", [name, attr, ...]]``) used."""
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.append(["n", sub.id])
        elif isinstance(sub, ast.Attribute):
            chain = _chain(sub)
            if chain is not None:
                out.append(["c", chain])
    return out


def _registry_call(value) -> tuple[str, list[str]] | None:
    """``Registry(kind, decorator, packages, ...)`` -> ``(decorator, packages)``."""
    if not (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Registry"):
        return None
    args = {i: a for i, a in enumerate(value.args)}
    args.update(
        {{"kind": 0, "decorator": 1, "packages": 2}.get(k.arg, -1): k.value for k in value.keywords}
    )
    try:
        decorator = ast.literal_eval(args[1])
        packages = list(ast.literal_eval(args[2])) if 2 in args else [""]
    except (KeyError, ValueError) as err:
        raise CodeError(f"Registry(...) arguments must be literals: {ast.unparse(value)}") from err
    return decorator, packages


def analyse(source: str, module: str, package: str) -> dict:
    """What fingerprints need of one module's source: its top-level definitions (as units), its
    module-level imports, its import-time statements, its registries and registered entries."""
    tree = ast.parse(source)
    _strip_strings(tree)
    defs: dict[str, list[ast.AST]] = {}
    imports: dict[str, list] = {}
    effects: list[ast.stmt] = []
    decorators: list[ast.expr] = []
    registries: dict[str, list] = {}
    registered: list[list[str]] = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defs.setdefault(node.name, []).append(node)
                decorators.extend(node.decorator_list)
                for dec in node.decorator_list:
                    if (
                        isinstance(node, ast.FunctionDef)
                        and isinstance(dec, ast.Call)
                        and isinstance(dec.func, ast.Name)
                        and dec.args
                        and isinstance(dec.args[0], ast.Constant)
                    ):
                        registered.append([dec.func.id, str(dec.args[0].value), node.name])
            elif isinstance(node, ast.Import | ast.ImportFrom):
                if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                    imports.update(_import_targets(node, package))
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            defs.setdefault(name.id, []).append(node)
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    reg = _registry_call(node.value)
                    if reg and isinstance(node.targets[0], ast.Name):
                        registries[node.targets[0].id] = list(reg)
                if node.value is not None and any(
                    isinstance(c, ast.Call) for c in ast.walk(node.value)
                ):
                    effects.append(node)  # runs code at import
            elif isinstance(node, ast.If | ast.Try):
                # conditional definitions count as definitions; the statement itself as an effect
                effects.append(node)
                for part in ("body", "orelse", "finalbody"):
                    visit(getattr(node, part, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif not isinstance(node, ast.Pass):
                effects.append(node)

    visit(tree.body)
    on_import = None
    if effects or decorators:
        # what importing the module runs: its statements, and the code its decorators call (the
        # decorators' arguments count in their function's own definition)
        on_import = _unit(effects, package)
        on_import["refs"] += [r for d in decorators for r in _refs(d) if r not in on_import["refs"]]
    return {
        "units": {name: _unit(nodes, package) for name, nodes in defs.items()},
        "imports": imports,
        "effects": on_import,
        "registries": registries,
        "registered": registered,
    }


_ANALYSES: dict[tuple[str, str], dict] = {}  # (bytes key, module) -> analysis, this process


def _load(path: Path, module: str, package: str) -> dict:
    """:func:`analyse` of a file, through a cache in its ``__pycache__`` keyed by its bytes."""
    data = path.read_bytes()
    key = f"{ANALYSER}:{hashlib.sha256(data).hexdigest()}"
    if (key, module) in _ANALYSES:
        return _ANALYSES[(key, module)]
    tag = f"{sys.implementation.cache_tag}"
    cached = path.parent / "__pycache__" / f"{path.stem}.{tag}.code.json"
    try:
        stored = json.loads(cached.read_text())
        if stored.get("key") == key and stored.get("module") == module:
            _ANALYSES[(key, module)] = stored["analysis"]
            return stored["analysis"]
    except (OSError, ValueError):
        pass
    try:
        result = analyse(data.decode(), module, package)
    except SyntaxError as err:
        raise CodeError(f"{path}: {err}") from None
    _ANALYSES[(key, module)] = result
    try:
        with io.atomic_path(cached) as tmp:
            tmp.write_text(json.dumps({"key": key, "module": module, "analysis": result}))
    except OSError:
        pass  # a read-only checkout: analyse again next time
    return result


# -- modules of the package -----------------------------------------------------------------------
@cache
def _module_file(module: str) -> Path | None:
    """The source file of a ``pipeline`` module, or None if there is none."""
    parts = module.split(".")
    if parts[0] != "pipeline":
        return None
    path = _registry.PACKAGE_ROOT.joinpath(*parts[1:])
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.is_dir():
        return path  # a namespace package: no code of its own
    file = path.with_suffix(".py")
    return file if file.is_file() else None


_MODULES: dict[str, dict] = {}  # module -> analysis, for this process


def _module(module: str) -> dict:
    if module in _MODULES:
        return _MODULES[module]
    if module.startswith("script:"):
        path = Path(module[len("script:") :])
        info = _load(path, module, "pipeline")
    else:
        path = _module_file(module)
        if path is None:
            raise CodeError(f"no module {module} (no file under {_registry.PACKAGE_ROOT})")
        if path.is_dir():
            info = {"units": {}, "imports": {}, "effects": None, "registries": {}, "registered": []}
        else:
            package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            info = _load(path, module, package)
    _MODULES[module] = info
    return info


def registry_entries(decorator: str, packages: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """``entry name -> (module, function)`` of a registry (:mod:`pipeline.registry`'s scan of
    the sources, shared with config validation)."""
    entries = _registry._scan(decorator, tuple(packages), 0)
    return {name: (entry.module, entry.function) for name, entry in entries.items()}


# -- resolution -----------------------------------------------------------------------------------
@cache
def _resolve_from(module: str, name: str) -> tuple:
    """What ``from module import name`` binds: ``("unit", module, name)`` or ``("mod", m)``."""
    return _resolve(module, name, ())


def _resolve(module: str, name: str, seen: tuple) -> tuple:
    if (module, name) in seen:
        raise CodeError(f"{module}: import cycle for {name!r}")
    if _module_file(module) is None:
        raise CodeError(f"no module {module} (needed for {name!r})")
    info = _module(module)
    if name in info["units"]:
        return ("unit", module, name)
    if name in info["imports"]:
        return _target(info["imports"][name], (*seen, (module, name)))
    if _module_file(f"{module}.{name}") is not None:
        return ("mod", f"{module}.{name}")
    raise CodeError(f"{module} has no name {name!r}")


def _target(spec: list, seen=()) -> tuple | None:
    kind = spec[0]
    if kind == "ext":
        return None
    if kind == "mod":
        if _module_file(spec[1]) is None:
            raise CodeError(f"no module {spec[1]}")
        return ("mod", spec[1])
    return _resolve(spec[1], spec[2], seen) if seen else _resolve_from(spec[1], spec[2])


def _where(module: str) -> str:
    return module.removeprefix("script:")


def _resolve_name(module: str, local: dict, name: str) -> tuple | None:
    """What ``name`` means in a definition of ``module`` with function-local imports ``local``:
    a unit, a module, or None (a local variable, a parameter, a builtin, outside code)."""
    info = _module(module)
    spec = local.get(name) or (None if name in info["units"] else info["imports"].get(name))
    if spec is None:
        return ("unit", module, name) if name in info["units"] else None
    try:
        return _target(spec)
    except CodeError as err:
        raise CodeError(f"{_where(module)}: import of {name!r}: {err}") from None


@cache
def _edges(module: str, name: str) -> tuple[tuple, ...]:
    """Everything one definition reaches directly: ``("unit", m, n)``, ``("mod", m)`` (a module
    used, whose import-time code runs) and ``("get", m, variable)`` (a registry looked up)."""
    info = _module(module)
    unit = info["effects"] if name == "<effects>" else info["units"][name]
    local, out = unit["local"], {}
    for ref in unit["refs"]:
        if ref[0] == "n":
            if ref[1] != name:
                target = _resolve_name(module, local, ref[1])
                if target is not None:
                    out[target] = None
            continue
        chain = ref[1]
        target = _resolve_name(module, local, chain[0])
        i = 1
        while target is not None and target[0] == "mod" and i < len(chain):
            out[target] = None
            try:
                target = _resolve_from(target[1], chain[i])
            except CodeError:
                if chain[0] in unit["bound"] and chain[0] not in local:
                    target = None  # a local variable that shadows a module's name
                    break
                raise CodeError(
                    f"{_where(module)}: {'.'.join(chain[: i + 1])}: "
                    f"module {target[1]} has no name {chain[i]!r}"
                ) from None
            i += 1
        if target is None:
            continue
        out[target] = None
        if chain[-1] == "get" and i == len(chain) - 1 and target[0] == "unit":
            if target[2] in _module(target[1])["registries"]:
                out[("get", target[1], target[2])] = None
    return tuple(out)


@cache
def _module_edges(module: str) -> tuple[tuple, ...]:
    """What importing a module runs: its import-time statements (checking its imports)."""
    info = _module(module)
    for name, spec in info["imports"].items():
        try:
            _target(spec)
        except CodeError as err:
            raise CodeError(f"{_where(module)}: import of {name!r}: {err}") from None
    return (("unit", module, "<effects>"),) if info["effects"] is not None else ()


class _Closure:
    """The units reached from one entry, for one choice of registry entries."""

    def __init__(self, names: frozenset[str], explicit: Mapping[str, frozenset[str]]):
        self.names = names  # strings of the job's configuration
        self.explicit = explicit  # registry decorator -> chosen entry names
        self.units: dict[tuple[str, str], dict] = {}
        self.modules: set[str] = set()
        self.gets: set[tuple[str, str]] = set()  # registries looked up (module, variable)
        self.stack: list[tuple] = []

    def add_unit(self, module: str, name: str) -> None:
        self.stack.append(("unit", module, name))

    def add_module(self, module: str) -> None:
        self.stack.append(("mod", module))

    def run(self) -> None:
        units, modules, stack = self.units, self.modules, self.stack
        while stack:
            item = stack.pop()
            kind, module = item[0], item[1]
            if module == SELF:
                continue  # computing fingerprints changes no result
            if kind == "unit":
                key = (module, item[2])
                if key in units:
                    continue
                info = _module(module)
                units[key] = info["effects"] if key[1] == "<effects>" else info["units"][key[1]]
                stack.extend(_edges(*key))
                item = ("mod", module)
            if item[0] == "mod":
                if module not in modules:
                    modules.add(module)
                    stack.extend(_module_edges(module))
            elif kind == "get":
                self.gets.add((module, item[2]))

    def constants(self) -> set[str]:
        """The name-like string constants of the code reached so far."""
        return {i for unit in self.units.values() for i in unit["strs"]}

    def expand_registries(self) -> bool:
        """Add the chosen entries of every registry looked up; True if anything was added."""
        before = len(self.units)
        consts = None
        for module, variable in sorted(self.gets):
            decorator, packages = _module(module)["registries"][variable]
            entries = registry_entries(decorator, tuple(packages))
            if decorator in self.explicit:
                chosen = self.explicit[decorator]
                unknown = sorted(set(chosen) - set(entries))
                if unknown:
                    raise CodeError(
                        f"{module}.{variable}: no entry {', '.join(map(repr, unknown))}; "
                        f"registered: {', '.join(sorted(entries))}"
                    )
            else:
                consts = self.constants() if consts is None else consts
                chosen = [n for n in entries if n in self.names or n in consts]
            for entry in chosen:
                self.add_unit(*entries[entry])
        self.run()
        return len(self.units) > before

    def lines(self) -> list[str]:
        """``module:name hash`` per definition (and per named hyperparameter field), sorted."""
        ids = self.constants() | {i for unit in self.units.values() for i in unit["ids"]}
        out = []
        for (module, name), unit in sorted(self.units.items()):
            if module.startswith("script:"):  # a script by its name: the checkout may move
                module = f"script:{Path(module).name}"
            out.append(f"{module}:{name} {unit['hash']}")
            for field, decl in sorted(unit["fields"].items()):
                if field in ids:
                    out.append(f"{module}:{name}.{field} {decl}")
        return sorted(out)


def _entry(target: str) -> tuple[str, str]:
    """``"pipeline.module:name"`` or a script's path -> the unit to start from."""
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise CodeError(f"no script {target}")
        return f"script:{path}", "<effects>"
    module, sep, name = target.partition(":")
    if not sep or not name:
        raise CodeError(f"code target {target!r}: expected 'pipeline.module:name' or a script path")
    if module == SELF:
        raise CodeError(f"code target {target!r}: {SELF} is never part of a fingerprint")
    if _module_file(module) is None:
        raise CodeError(f"no module {module} (code target {target!r})")
    found = _resolve_from(module, name)
    if found[0] != "unit":
        raise CodeError(f"{module}.{name} is a module, not a function or class")
    return found[1], found[2]


@cache
def _closure(target: str, names: frozenset[str], explicit: tuple) -> _Closure:
    closure = _Closure(names, {k: frozenset(v) for k, v in explicit})
    module, name = _entry(target)
    if name == "<effects>":
        closure.add_module(module)
    else:
        closure.add_unit(module, name)
    closure.run()
    if (module, name) not in closure.units:
        raise CodeError(f"script {target} does nothing")
    while closure.expand_registries():
        pass
    closure.text = "".join(line + "\n" for line in closure.lines())
    closure.hash = _digest(closure.text)
    return closure


_RECORDED: set[tuple[str, str]] = set()


def clear_caches(modules: Iterable[str] | None = None) -> None:
    """Forget what this process knows of the sources (of ``modules`` only, if given: the ones
    that changed; ``script:<path>`` for a script) and every fingerprint."""
    if modules is None:
        _MODULES.clear()
    for module in modules or ():
        _MODULES.pop(module, None)
    for fn in (_module_file, _resolve_from, _edges, _module_edges, _closure, _registry_names):
        fn.cache_clear()
    _registry.forget(None if modules is None else [m for m in modules if "script:" not in m])


@cache
def _registry_names() -> frozenset[str]:
    """The names of every entry of every registry (first arguments of decorator calls), to
    shrink a job's configuration strings to the ones that can select code."""
    names: set[str] = set()
    for module in _registry._modules_in(""):
        for node in _registry._parse(module).body:
            for dec in getattr(node, "decorator_list", []):
                if isinstance(dec, ast.Call) and dec.args and isinstance(dec.args[0], ast.Constant):
                    names.add(str(dec.args[0].value))
    return frozenset(names)


_SCALARS = (int, float, bool, type(None))
_SEQUENCES = (list, tuple, set, frozenset)


def strings(value) -> set[str]:
    """Every string (dict keys included) in a nested configuration value."""
    out: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:  # the common case first: a parsed YAML/JSON value
            for key, sub in item.items():
                if type(key) is str:
                    out.add(key)
                if type(sub) is str:
                    out.add(sub)
                elif type(sub) not in _SCALARS:
                    stack.append(sub)
        elif kind in _SEQUENCES:
            for sub in item:
                if type(sub) is str:
                    out.add(sub)
                elif type(sub) not in _SCALARS:
                    stack.append(sub)
        elif isinstance(item, str):
            out.add(item)
        elif isinstance(item, Mapping):
            out.update(k for k in item if isinstance(k, str))
            stack.extend(item.values())
        elif isinstance(item, Iterable) and not isinstance(item, bytes):
            stack.extend(item)
    return out


def _key(target, config, choose) -> tuple:
    if config is None:
        names = frozenset()
    elif isinstance(config, frozenset):  # already strings (e.g. a study's, computed once)
        names = config & _registry_names()
    else:
        names = frozenset(strings(config) & _registry_names())
    explicit = tuple(
        sorted(
            (reg, tuple(sorted([value] if isinstance(value, str) else value)))
            for reg, value in choose.items()
        )
    )
    return str(target), names, explicit


def code_fingerprint(target: str, config=None, record: str | Path | None = None, **choose) -> str:
    """The fingerprint of the code reached from ``target`` (see the module docstring).

    ``target``: ``"pipeline.module:name"`` or the path of a workflow script. ``config``: the job's
    configuration (any nested value); its strings select the entries of registries looked up
    with ``.get``. ``choose``: registry (its decorator's name, e.g. ``register_metric``) -> the
    entry name(s) this job uses, overriding ``config`` for that registry. ``record``: a directory
    where the closure is written as ``<fingerprint>.txt`` (one ``module:name hash`` line per
    definition), so two fingerprints can be compared with ``diff``.
    """
    closure = _closure(*_key(target, config, choose))
    if record is not None and (str(record), closure.hash) not in _RECORDED:
        _RECORDED.add((str(record), closure.hash))
        path = Path(record) / f"{closure.hash}.txt"
        if not path.exists():
            try:
                with io.atomic_path(path) as tmp:
                    tmp.write_text(closure.text)
            except OSError:
                pass  # a read-only working directory: nothing to compare later, nothing lost
    return closure.hash


def code_closure(target: str, config=None, **choose) -> list[str]:
    """What :func:`code_fingerprint` hashes: ``module:name`` per definition (``<effects>``: a
    module's import-time statements, a script's code; ``module:Class.field``: a hyperparameter
    field's declaration), sorted."""
    closure = _closure(*_key(target, config, choose))
    return [line.split(" ")[0] for line in closure.text.splitlines()]


def record_code(summary: dict, path, target: str, config, code: str | None = None) -> dict:
    """Write ``summary`` to ``path`` (JSON) with ``code``: the fingerprint of the code that made
    it (:mod:`pipeline.stale` compares it with today's). ``code``: the one the workflow computed
    while it built the job graph; ``None``: computed here (``code_fingerprint(target, config)``,
    about 0.5 s)."""
    if code is None:
        code = code_fingerprint(target, config)
    summary["code"] = str(code)
    io.write_json(path, summary)
    return summary
