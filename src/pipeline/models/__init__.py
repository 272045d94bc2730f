"""Model registry. A builder takes ``(input_shape, num_classes, **options)`` and returns a module.

The options are the builder's keyword parameters (checked against the config before any job runs).
Every model's neuron structure is derived from its forward graph by
:func:`pipeline.models.derivation.derive`, so adding a model is one builder function.
"""

from __future__ import annotations

from pipeline.registry import Registry

register_model = Registry("model", "register_model", skip=2)


def build(
    name: str, input_shape, num_classes: int, options: dict | None = None, seed: int = 0, dtype=None
):
    """Build model ``name``, weights initialised from ``seed`` (torch's global RNG untouched)."""
    import torch

    from pipeline import seeding

    fn = register_model.get(name)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seeding.derive(seed, "init"))
        model = fn(tuple(input_shape), num_classes, **(options or {}))
    finally:
        torch.random.set_rng_state(state)
    return model.to(dtype) if dtype is not None else model


def neuron_structure(model, input_shape):
    """The model's :class:`~pipeline.models.structure.NeuronStructure` (cached on the module).

    (Not called ``structure``: that name is the submodule.)
    """
    from pipeline.models.derivation import derive

    cached = getattr(model, "_neuron_structure", None)
    if cached is None:
        cached = derive(model, tuple(input_shape))
        object.__setattr__(model, "_neuron_structure", cached)
    return cached
