"""Registries read from the source: a job reads its entries from a cache in ``__pycache__``,
which is used only while the module's bytes are the ones it was made from."""

from __future__ import annotations

import shutil
import sys

import pytest

from pipeline import registry


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A copy of the package without caches, as the registries' root."""
    src = tmp_path / "pipeline"
    shutil.copytree(
        registry.PACKAGE_ROOT, src, ignore=shutil.ignore_patterns("__pycache__", "*.pickle")
    )
    monkeypatch.setattr(registry, "PACKAGE_ROOT", src)
    registry.forget()
    yield src
    registry.forget()


def _every_registry() -> dict:
    decorators = {
        decorator
        for module in registry._modules_in("")
        for decorator, _, _ in registry._registrations(module)
    }
    return {d: registry._scan(d, ("",), 0) for d in sorted(decorators)}


def test_the_cached_registrations_are_the_parsed_ones_until_the_source_changes(package):
    parsed = _every_registry()  # parses every module and writes the caches
    assert {"register_model", "register_dataset", "register_section"} <= set(parsed)
    assert "mlp" in parsed["register_model"] and "digits" in parsed["register_dataset"]
    caches = sorted(package.rglob("*.reg.pickle"))
    assert len(caches) == len(registry._modules_in(""))

    registry.forget()  # a new job: every registration comes from the caches
    assert _every_registry() == parsed

    mlp = package / "models" / "small.py"
    mlp.write_text(
        mlp.read_text()
        + '\n\n@register_model("extra")\ndef extra(input_shape, num_classes, width: int = 3):\n'
        + '    """An added model."""\n'
    )
    tag = sys.implementation.cache_tag
    (package / "models" / "__pycache__" / f"densenet.{tag}.reg.pickle").write_bytes(b"junk")
    registry.forget()
    now = _every_registry()
    extra = now["register_model"].pop("extra")
    assert extra.module == "pipeline.models.small" and extra.defaults == {"width": 3}
    assert extra.params == ("input_shape", "num_classes", "width")
    assert extra.doc == "An added model."
    assert now == parsed  # the rest unchanged, the corrupt cache of densenet replaced
