"""Hypothesis strategies for the property tests: architectures drawn from the model registry,
symmetry-test inputs and SGD hyperparameters.

An architecture is a registered model name, options for each of its builder's keyword parameters
(drawn by *parameter name* from :data:`OPTIONS`, so a new model needs no test code unless it
brings an option name not seen before: :func:`test_every_model_option_has_a_strategy` in
``test_properties_symmetry.py`` then says which), the smallest input size it accepts (found on
the meta device), a class count and a dtype. A builder that refuses a drawn combination with a
ValueError (a stem it does not have, an odd option-A channel increase) makes Hypothesis draw
again.

Every property runs once per registered model (a pytest parameter, so each CI run covers every
model) and draws the rest with :func:`cases`. Two sizes, chosen by the Hypothesis profile
(``tests/conftest.py``): ``ci`` (the default, used by ``make test``) draws a few small examples
of the models under :data:`PARAM_BUDGET` parameters (the CIFAR ResNet-56/110 and torchvision's
ResNets are left to ``thorough``); ``thorough`` (``make test-thorough``) draws many, wider and
deeper, of every registered model.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch
from hypothesis import assume, note
from hypothesis import strategies as st

from pipeline.models import build, register_model
from pipeline.models.activations import NAMES

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
THOROUGH = PROFILE == "thorough"
#: Largest model (parameters at the drawn options) each profile draws.
PARAM_BUDGET = 30_000_000 if THOROUGH else 500_000
#: Input sizes tried, smallest first (the ci profile uses the smallest the model accepts).
SPATIAL = (4, 8, 16, 32)
#: Stems a builder may offer (a builder refuses the others with a ValueError).
STEMS = ("imagenet", "cifar", "cifar_maxpool")


def examples(ci: int, thorough: int) -> int:
    """The example count of a property in the current profile."""
    return thorough if THOROUGH else ci


def _off(default):
    return False if isinstance(default, bool) else 0.0


def _dropout(default, big):
    """Off or on (0.25, or True for a boolean option)."""
    return st.sampled_from([_off(default), True if isinstance(default, bool) else 0.25])


def _width(default, big):
    """A float width multiplies channel counts (1/32 .. 1/8); an int width of 1 is a multiplier
    of fixed stage widths (ResNets: 16k/32k/64k); a larger int one is a base width (Myrtle)."""
    if isinstance(default, float):
        return st.sampled_from([1 / 32, 1 / 16] + ([1 / 8, 1 / 4] if big else []))
    if default == 1:
        return st.integers(1, 2 if big else 1)
    return st.integers(1, 8 if big else 3)


def _ints(ci_max, thorough_max, low=1):
    return lambda default, big: st.integers(low, thorough_max if big else ci_max)


#: option name -> ``fn(default, big) -> strategy``. ``bn_eps`` and ``dropout`` are usually set by
#: the property (a BatchNorm's eps breaks its scale symmetry at eps / variance; dropout masks do
#: not follow a permutation).
OPTIONS = {
    "widths": lambda d, big: st.lists(
        st.integers(1, 24 if big else 8), min_size=1, max_size=4 if big else 3
    ),
    "channels": _ints(6, 16),
    "layers": _ints(2, 3),
    "width": _width,
    "hidden": _ints(8, 32),
    "pool_size": _ints(2, 3),
    "growth_rate": _ints(3, 6),
    "block_config": lambda d, big: st.lists(
        st.integers(1, 3 if big else 2), min_size=1, max_size=3 if big else 2
    ).map(tuple),
    "num_init_features": _ints(4, 8),
    "bn_size": _ints(2, 4),
    "stem": lambda d, big: st.sampled_from(STEMS),
    "activation": lambda d, big: st.sampled_from(sorted(NAMES)),
    "batch_norm": lambda d, big: st.booleans(),
    "bias": lambda d, big: st.booleans(),
    "constant_width": lambda d, big: st.booleans(),
    "pool": lambda d, big: st.booleans(),
    "bn_eps": lambda d, big: st.sampled_from([1e-5, 1e-3]),
    "dropout": _dropout,
}


def missing_options() -> dict[str, list[str]]:
    """``model -> option names`` that :data:`OPTIONS` has no strategy for."""
    out = {}
    for name, entry in register_model.entries().items():
        unknown = [p for p in entry.params if p not in OPTIONS]
        if unknown:
            out[name] = unknown
    return out


@dataclass(frozen=True)
class Arch:
    """A drawn architecture (its repr is what a falsifying example prints)."""

    name: str
    input_shape: tuple
    num_classes: int
    options: dict = field(hash=False)
    dtype: torch.dtype = torch.float64

    def __repr__(self) -> str:
        return (
            f"Arch({self.name!r}, input_shape={self.input_shape}, classes={self.num_classes}, "
            f"options={self.options}, dtype={self.dtype})"
        )

    def build(self, seed: int = 0, dtype=None) -> torch.nn.Module:
        dtype = dtype or self.dtype
        return build(self.name, self.input_shape, self.num_classes, self.options, seed, dtype)

    @property
    def uses_dropout(self) -> bool:
        return bool(self.options.get("dropout"))


def _key(options: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


@functools.cache
def _fits(name, channels, classes, options_key) -> tuple[int, int] | None:
    """(smallest accepted spatial size, parameter count), or None: the builder refuses the
    options at every size, or the model has more than :data:`PARAM_BUDGET` parameters."""
    options = {k: list(v) if k == "widths" else v for k, v in options_key}
    fn = register_model.get(name)
    for size in SPATIAL:
        shape = (channels, size, size)
        try:
            with torch.random.fork_rng():
                model = fn(shape, classes, **options)
        except ValueError:  # refused (maybe only at this size: VGG needs 32x32)
            continue
        count = sum(p.numel() for p in model.parameters())
        if count > PARAM_BUDGET:
            return None
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(2, *shape))
        except (RuntimeError, ValueError):  # too small for its pools
            continue
        return size, count
    return None


#: Option values no smaller than any drawn value, for a lower bound of a model's size.
SMALLEST = {
    "widths": [1],
    "channels": 1,
    "layers": 1,
    "hidden": 1,
    "pool_size": 1,
    "growth_rate": 1,
    "block_config": (1,),
    "num_init_features": 1,
    "bn_size": 1,
}


def _lower_bound(name: str) -> int | None:
    """Parameters of the model at its smallest options (on the meta device: no memory, no
    initialisation), at the smallest input it builds for."""
    entry = register_model.entry(name)
    options = {p: SMALLEST[p] for p in entry.params if p in SMALLEST}
    if "width" in entry.params:
        options["width"] = 1 / 32 if isinstance(entry.defaults["width"], float) else 1
    fn = register_model.get(name)
    for size in SPATIAL:
        try:
            with torch.device("meta"):
                model = fn((1, size, size), 2, **options)
        except ValueError:
            continue
        return sum(p.numel() for p in model.parameters())
    return None


@functools.cache
def affordable_models() -> tuple[str, ...]:
    """Registered models whose smallest configuration fits :data:`PARAM_BUDGET`."""
    out = []
    for name in register_model.names():
        count = _lower_bound(name)
        if count is not None and count <= PARAM_BUDGET:
            out.append(name)
    return tuple(out)


AFFORDABLE = affordable_models()


@st.composite
def architectures(
    draw,
    *,
    models=None,
    dtypes=(torch.float64,),
    overrides: dict | None = None,
):
    """A registered model with drawn options. ``overrides``: option name -> strategy, replacing
    :data:`OPTIONS` for this property (e.g. ``bn_eps``); ``models``: restrict the names."""
    names = [n for n in AFFORDABLE if models is None or n in models]
    name = draw(st.sampled_from(names))
    entry = register_model.entry(name)
    overrides = overrides or {}
    options = {}
    for p in entry.params:
        default = entry.defaults.get(p)
        if p in overrides:
            strategy = overrides[p]
            strategy = strategy(default) if callable(strategy) else strategy
        else:
            strategy = OPTIONS[p](default, THOROUGH)
        options[p] = draw(strategy)
    channels = draw(st.sampled_from([1, 3]))
    classes = draw(st.integers(2, 10 if THOROUGH else 5))
    fit = _fits(name, channels, classes, _key(options))
    assume(fit is not None)
    size = fit[0]
    if THOROUGH:
        size = draw(st.sampled_from([s for s in SPATIAL if size <= s <= max(size, 2 * size)]))
    dtype = draw(st.sampled_from(dtypes))
    return Arch(name, (channels, size, size), classes, options, dtype)


class Case(dict):
    """The values a property drew, by name (also as attributes); printed one per line."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return "Case(\n" + "".join(f"    {k}={v!r},\n" for k, v in self.items()) + ")"


@st.composite
def cases(draw, model: str, arch: dict | None = None, **parts):
    """A :class:`Case`: an architecture of registered ``model`` (``arch``: keywords of
    :func:`architectures`), then a value from each of ``parts`` (name -> strategy). The
    architecture comes first, so the draws after it differ from model to model even where
    Hypothesis starts every parametrization of a test from the same seed (``derandomize``)."""
    out = Case(arch=draw(architectures(models=(model,), **(arch or {}))))
    for name, strategy in parts.items():
        out[name] = draw(strategy)
    return out


def off(default):
    """Dropout switched off, whatever the option's type (for ``overrides``)."""
    return st.just(_off(default))


# -- helpers shared by the property tests ---------------------------------------------------------
@torch.no_grad()
def randomise_bn_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random running statistics and affine parameters in every BatchNorm (a fresh model's are
    0/1, which would hide a statistic or affine parameter left untransformed)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for t, lo, hi in (
                (m.running_mean, -1.0, 1.0),
                (m.running_var, 0.5, 2.0),
                (m.weight, 0.5, 1.5),
                (m.bias, -0.5, 0.5),
            ):
                if t is not None:
                    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=t.dtype))


def inputs(arch: Arch, n: int, gen: torch.Generator, dtype=None) -> torch.Tensor:
    x = torch.randn(n, *arch.input_shape, generator=gen, dtype=torch.float64)
    return x.to(dtype or arch.dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def forward(model: torch.nn.Module, x: torch.Tensor, train: bool, seed: int = 0):
    """The output in train or eval mode, with fixed dropout masks; in train mode the BatchNorm
    statistics of ``model`` are left as they were (a copy runs)."""
    import copy

    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        if train:
            return copy.deepcopy(model).train()(x)
        return model.eval()(x)


#: Machine epsilon per dtype.
EPS = {dt: torch.finfo(dt).eps for dt in (torch.float32, torch.float64)}
#: Smallest tolerance per dtype: for a well-conditioned network the symmetries and teleports
#: only rescale and reorder the terms of each sum, so the outputs differ by a few rounding
#: errors per layer: below 1e-10 in float64 (eps 2.2e-16) and 1e-5 in float32 (eps 1.2e-7).
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5}
#: Rounding differences allowed, in units of the network's own rounding error (two computations
#: with independent rounding differ by about sqrt(2) times it).
SAFETY = 10.0


#: Float32 output error beyond which a network is too sensitive to rounding to be compared: its
#: float32 error no longer grows in proportion to eps (it saturates), so it no longer predicts
#: the float64 one. Such a network (a deep one whose train-mode BatchNorms see a batch of
#: nearly equal values) is compared in the other mode only.
CHAOTIC = 1e-3


def condition(model: torch.nn.Module, x: torch.Tensor, train: bool, seed: int = 0) -> float:
    """The network's sensitivity to rounding: the relative error of its float32 output against
    its float64 output, in units of float32's eps (``model`` and ``x`` in float64); infinite
    when the float32 output overflows. A network whose float64 output overflows is not drawn."""
    import copy

    high = forward(model, x, train, seed)
    assume(bool(torch.isfinite(high).all()))
    low = forward(copy.deepcopy(model).float(), x.float(), train, seed).double()
    if not bool(torch.isfinite(low).all()):
        return math.inf
    return rel(low, high) / EPS[torch.float32]


def tolerance(dtype: torch.dtype, cond: float) -> float | None:
    """Near-roundoff bound for comparing two computations of a network of condition ``cond``;
    None where the network is too sensitive to rounding (:data:`CHAOTIC`)."""
    if not cond * EPS[torch.float32] <= CHAOTIC:
        return None
    return max(FLOOR[dtype], SAFETY * cond * EPS[dtype])


def checked_dtype(arch: Arch, cond: float) -> torch.dtype:
    """The drawn dtype; float64 instead where float32 rounding alone moves the output by more
    than 1e-4 (a comparison in float32 would then say little)."""
    if arch.dtype == torch.float32 and not SAFETY * cond * EPS[torch.float32] <= 1e-4:
        note(f"float32 rounding error {cond * EPS[torch.float32]:.2e}: checked in float64")
        return torch.float64
    return arch.dtype


def compare(a: torch.Tensor, b: torch.Tensor, dtype, cond: float, what: str) -> None:
    """Assert ``a`` equals ``b`` to :func:`tolerance`; say so where the network is too sensitive
    to rounding to compare."""
    tol = tolerance(dtype, cond)
    if tol is None:
        note(f"{what}: not compared (float32 rounding error {cond * EPS[torch.float32]:.2e})")
        return
    err = rel(a, b)
    assert err < tol, f"{what}: relative difference {err:.3e} (allowed {tol:.1e})"


#: The SGD variants torch offers (Nesterov needs momentum and no dampening).
SGD_KINDS = ("plain", "heavy_ball", "dampened", "nesterov")


@st.composite
def sgd_hparams(draw, kinds=SGD_KINDS):
    """SGD hyperparameters (torch.optim.SGD's keywords): lr in [1e-3, 0.1], the variant drawn
    from ``kinds`` (plain; heavy ball with momentum in [0.1, 0.99]; the same with dampening in
    [0.1, 0.9]; Nesterov), coupled weight decay 0 or in [1e-4, 0.1]."""
    kind = draw(st.sampled_from(kinds))
    momentum = 0.0 if kind == "plain" else draw(st.floats(0.1, 0.99))
    return {
        "lr": draw(st.floats(1e-3, 0.1)),
        "momentum": momentum,
        "dampening": draw(st.floats(0.1, 0.9)) if kind == "dampened" else 0.0,
        "nesterov": kind == "nesterov",
        "weight_decay": draw(st.just(0.0) | st.floats(1e-4, 0.1)),
    }


#: TrainHparams fields a property sets itself (never drawn by :func:`train_options`).
TRAIN_FIXED = ("optimizer", "loss", "dtype", "schedule", "plateau_metric", "on_nan")


def train_options() -> dict:
    """Strategies for the string options of :class:`~pipeline.config.TrainHparams` beyond
    :func:`sgd_hparams` whose allowed values are a tuple constant of :mod:`pipeline.train.optim`
    holding the default: an option added there (say, which parameters weight decay acts on) is
    drawn without editing the tests."""
    from dataclasses import fields

    import pipeline.train.optim as optim
    from pipeline.config import TrainHparams

    constants = [
        v
        for v in vars(optim).values()
        if isinstance(v, tuple) and len(v) > 1 and all(isinstance(x, str) for x in v)
    ]
    out = {}
    for f in fields(TrainHparams):
        if f.name in TRAIN_FIXED or not isinstance(f.default, str):
            continue
        allowed = next((c for c in constants if f.default in c), None)
        if allowed:
            out[f.name] = st.sampled_from(allowed)
    return out


def describe(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
