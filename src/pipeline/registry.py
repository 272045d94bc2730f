"""Name-keyed registries of functions, discoverable without importing them.

A registry is filled by a decorator (``@register_model("mlp")``), timm-style. Snakemake needs the
names (for config validation and wildcard constraints) while it parses the workflow, where
importing torch would cost seconds. So every registry can also *read* its entries from the source
files with :mod:`ast`: names, parameter names and defaults (code fingerprints read them the same
way: :mod:`pipeline.fingerprint`). The real function is imported only when it is used.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import importlib
import pickle
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pipeline import io

PACKAGE_ROOT = Path(__file__).resolve().parent
#: This module's own bytes: cached registrations (see :func:`_registrations`) of another version
#: are not used.
_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    """What the source says about one registered function."""

    name: str
    module: str  # dotted module path, e.g. "pipeline.models.small"
    function: str
    params: tuple[str, ...]  # keyword parameters (after the positional-only/required ones)
    defaults: dict
    doc: str
    meta: dict  # the decorator's keyword arguments, e.g. needs=("history",)


class Registry:
    """A table ``name -> function`` for one kind of thing (model, dataset, metric...).

    ``decorator`` is the name the decorator is bound to in the source files, and ``packages`` the
    sub-packages of ``pipeline`` (as dotted names relative to it) whose modules may register.
    """

    def __init__(self, kind: str, decorator: str, packages: tuple[str, ...] = ("",), skip: int = 0):
        self.kind = kind
        self.decorator = decorator
        self.packages = packages
        self.skip = skip  # leading positional parameters supplied by the caller, not the config
        self._loaded: dict[str, object] = {}

    # -- registration (runs when a module is imported) -------------------------------------
    def __call__(self, name: str, **meta):
        """Register the decorated function as ``name``; ``meta`` keywords must be literals
        (they are read from the source without importing it, see :attr:`Entry.meta`)."""

        def wrap(fn):
            if name in self._loaded and self._loaded[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._loaded[name] = fn
            return fn

        return wrap

    # -- discovery (no import) ------------------------------------------------------------
    def entries(self) -> dict[str, Entry]:
        return _scan(self.decorator, self.packages, self.skip)

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self.entries() if fnmatch.fnmatch(n, pattern))

    def entry(self, name: str) -> Entry:
        entries = self.entries()
        if name not in entries:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(entries))}")
        return entries[name]

    def get(self, name: str):
        """The registered function itself (imports its module)."""
        entry = self.entry(name)
        if name not in self._loaded:
            importlib.import_module(entry.module)
        return self._loaded[name]


def _module_path(module: str) -> Path:
    rel = module.split(".")[1:]
    path = PACKAGE_ROOT.joinpath(*rel)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


_PARSED: dict[str, ast.Module] = {}


def _parse(module: str) -> ast.Module:
    tree = _PARSED.get(module)
    if tree is None:
        path = _module_path(module)
        tree = _PARSED[module] = ast.parse(path.read_text(), filename=str(path))
    return tree


def forget(modules=None) -> None:
    """Forget the parsed sources (of ``modules`` only, if given) and every scan: after the
    sources changed under this process."""
    if modules is None:
        _PARSED.clear()
        _REGISTERED.clear()
    for module in modules or ():
        _PARSED.pop(module, None)
        _REGISTERED.pop(module, None)
    _scan.cache_clear()


_REGISTERED: dict[str, list] = {}


def _registrations(module: str) -> list[tuple]:
    """``(decorator, name, function node's fields)`` of every top-level function of ``module``
    decorated as ``@decorator(name, ...)`` (the fields: function name, positional and keyword-only
    parameters, defaults, docstring, the decorator's keywords), through a cache in the module's
    ``__pycache__`` keyed by its bytes: a job reads its registries without parsing every module
    of the package (about 0.5 s)."""
    if module in _REGISTERED:
        return _REGISTERED[module]
    path = _module_path(module)
    data = path.read_bytes()
    key = f"{_VERSION}:{hashlib.sha256(data).hexdigest()}"
    cached = path.parent / "__pycache__" / f"{path.stem}.{sys.implementation.cache_tag}.reg.pickle"
    try:
        stored = pickle.loads(cached.read_bytes())
        if stored["key"] == key and stored["module"] == module:
            _REGISTERED[module] = stored["registrations"]
            return stored["registrations"]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError):
        pass
    found = []
    for node in _parse(module).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if (
                isinstance(dec, ast.Call)
                and isinstance(dec.func, ast.Name)
                and dec.args
                and isinstance(dec.args[0], ast.Constant)
            ):
                found.append((dec.func.id, dec.args[0].value, _fields(node, dec.keywords)))
    _REGISTERED[module] = found
    try:
        with io.atomic_path(cached) as tmp:
            tmp.write_bytes(pickle.dumps({"key": key, "module": module, "registrations": found}))
    except OSError:
        pass  # a read-only checkout: parse again next time
    return found


def _modules_in(package: str) -> list[str]:
    base = PACKAGE_ROOT.joinpath(*package.split(".")) if package else PACKAGE_ROOT
    if base.with_suffix(".py").is_file():
        return [f"pipeline.{package}"]
    mods = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(PACKAGE_ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        mods.append(".".join(["pipeline", *parts]))
    return mods


@cache
def _scan(decorator: str, packages: tuple[str, ...], skip: int) -> dict[str, Entry]:
    found: dict[str, Entry] = {}
    for package in packages:
        for module in _modules_in(package):
            for used, name, fields in _registrations(module):
                if used != decorator:
                    continue
                if name in found:
                    raise ValueError(f"{decorator}({name!r}) appears twice")
                function, positional, kwonly, defaults, doc, meta = fields
                params = tuple(positional[skip:] + kwonly)
                found[name] = Entry(name, module, function, params, dict(defaults), doc, dict(meta))
    return found


def _fields(fn: ast.FunctionDef, keywords) -> tuple:
    """A registered function's name, positional and keyword-only parameter names, literal
    defaults, docstring, and its decorator's literal keywords."""
    args = fn.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    defaults: dict = {}
    pos_defaults = args.defaults
    for arg, default in zip(
        positional[len(positional) - len(pos_defaults) :], pos_defaults, strict=True
    ):
        defaults[arg] = _literal(default)
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        if default is not None:
            defaults[arg.arg] = _literal(default)
    meta = {k.arg: _literal(k.value) for k in keywords if k.arg}
    kwonly = [a.arg for a in args.kwonlyargs]
    return fn.name, positional, kwonly, defaults, ast.get_docstring(fn) or "", meta


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


# -- source constants -------------------------------------------------------------------------
def source_constant(module: str, name: str):
    """The literal value of a module-level constant, read from the source without importing
    it (Snakemake's parser needs, e.g., a science's table names without importing torch)."""
    for node in _parse(module).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise KeyError(f"{module} defines no constant {name}")
