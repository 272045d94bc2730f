"""Property: the exact discrete conservation laws (Kunin et al.; :mod:`pipeline.mechanics.theory`)
hold to 1e-11 relative in float64 on random architectures from the model registry, under random
SGD hyperparameters (lr up to 0.1, momentum, dampening, Nesterov, weight decay) and both losses.

Each case trains a few steps the way :func:`pipeline.train.loop.train_run` does (forward,
backward, :class:`~pipeline.train.trace.MechanicsTrace` around ``optimizer.step``), keeps the
parameters of every step, and hands them with the trace to every metric registered in
:mod:`pipeline.mechanics.metrics` (translation, scale, rescale, and any added later) through a
:class:`~pipeline.mechanics.artifacts.RunArtifacts` filled in memory. Where a metric gives a
prediction (empty note) its exact discrete prediction must match the empirical quantity to 1e-11
of the size of its terms (:func:`pipeline.mechanics.cache.deviations`); where it gives none
(Nesterov; translation under MSE) the note says why and no number is written.

BatchNorms get eps 1e-20: eps breaks the scale law at eps / variance (test_mechanics measures it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from strategies import (
    AFFORDABLE,
    cases,
    describe,
    examples,
    inputs,
    sgd_hparams,
    train_options,
)

from pipeline.config import TrainHparams
from pipeline.mechanics.artifacts import RunArtifacts
from pipeline.mechanics.cache import deviations
from pipeline.metric_registry import register_metric
from pipeline.models import neuron_structure
from pipeline.train.optim import loss_fn, make_optimizer
from pipeline.train.trace import MechanicsTrace

MODELS = AFFORDABLE
#: The conservation metrics: every metric of the mechanics module that reads the trace.
METRICS = tuple(
    name
    for name, entry in register_metric.entries().items()
    if entry.module == "pipeline.mechanics.metrics" and "trace" in entry.meta.get("needs", ())
)
#: Relative deviation allowed from the exact discrete prediction: the laws are identities of
#: the iteration, so only rounding separates them (the largest measured in 80 thorough examples:
#: 2.7e-14); issue 11 asks for 1e-6.
EXACT = 1e-11


#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def train_in_memory(arch, h: TrainHparams, steps: int, seed: int) -> RunArtifacts:
    """Train ``steps`` SGD steps on random batches; the run's artifacts, in memory."""
    gen = torch.Generator().manual_seed(seed)
    model = arch.build(seed).train()
    structure = neuron_structure(model, arch.input_shape)
    optimizer = make_optimizer(model.named_parameters(), h)
    trace = MechanicsTrace(model, structure, optimizer, h)
    loss = loss_fn(h.loss)
    named = dict(model.named_parameters())
    snapshots = [{n: p.detach().clone() for n, p in named.items()}]
    losses = []
    for k in range(steps):
        x = inputs(arch, 8, gen)
        y = torch.randint(0, arch.num_classes, (8,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        with torch.random.fork_rng():
            torch.manual_seed(k)
            value = loss(model(x), y)
        value.backward()
        trace.before_step()
        optimizer.step()
        trace.after_step(h.lr)
        snapshots.append({n: p.detach().clone() for n, p in named.items()})
        losses.append(value.item())
    run = RunArtifacts("property", "unused")
    run.__dict__.update(
        hparams={"seed": seed},
        train=h,
        structure=structure,
        steps=np.arange(steps + 1),
        history=pd.DataFrame(
            {
                "step": np.arange(steps),
                "split": "train",
                "loss": losses,
                "accuracy": np.nan,
                "lr": h.lr,
            }
        ),
        trace={
            **trace.flush(),
            "layout": {e["key"]: e for e in trace.layout()},
            "update": trace.kind,
            "steps": steps,
        },
    )
    run._params = {n: np.stack([s[n].numpy() for s in snapshots]) for n in named}
    return run


def _hparams(h: dict, loss: str, extra: dict) -> TrainHparams:
    return TrainHparams(
        lr=h["lr"],
        momentum=h["momentum"],
        dampening=h["dampening"],
        nesterov=h["nesterov"],
        wd=h["weight_decay"],
        loss=loss,
        dtype="float64",
        mechanics=True,
        **extra,
    )


def check_conservation(arch, h, loss, extra, steps, seed):
    hp = _hparams(h, loss, extra)
    note(f"hyperparameters: {describe(h)}, loss={loss}, {extra}")
    run = train_in_memory(arch, hp, steps, seed)
    # a network whose activations overflow (a deep ResNet without BatchNorm) has no laws to check
    assume(all(np.isfinite(v).all() for v in run._params.values()))
    tables = [register_metric.get(m)(run) for m in METRICS]
    table = pd.concat([t for t in tables if len(t)], ignore_index=True)
    if table.empty:
        return
    assert np.isfinite(table.empirical).all()
    laws = table[~table.note.str.startswith("empirical only")]  # gradient norms: no law
    predicted = laws[laws.note == ""]
    silent = laws[laws.note != ""]
    assert silent.theory_discrete.isna().all(), "no number where no prediction applies"
    if h["nesterov"]:
        assert predicted.empty and silent.note.str.contains("Nesterov").all()
    if loss != "ce":
        assert not (predicted.quantity == "translation").any()
    # The class sum of the cross-entropy logit gradient (p - onehot, entries bounded by 1) is zero
    # only up to the rounding of its terms, so a translation quantity drifts by up to ~eps * lr
    # per class and step in absolute terms, even where its own magnitude is far smaller (a
    # zero-initialised bias after one step on a balanced batch: 4e-18 against a magnitude 2e-8).
    drift = (predicted.empirical - predicted.theory_discrete).abs()
    floor = (predicted.quantity == "translation") * (
        4 * arch.num_classes * np.finfo(np.float64).eps * h["lr"] * predicted.step
    )
    summary = deviations(predicted[drift > floor])
    note(summary.sort_values("max_rel_dev_discrete").tail(3).to_string())
    worst = summary.max_rel_dev_discrete.max() if len(summary) else 0.0
    assert worst < EXACT, f"exact discrete law off by {worst:.3e} (relative)"


HPARAMS = dict(
    h=sgd_hparams(),
    loss=st.sampled_from(["ce", "mse"]),
    extra=st.fixed_dictionaries(train_options()),
    steps=st.integers(3, 12),
    seed=st.integers(0, 2**31 - 1),
)
ARCH = {"overrides": {"bn_eps": st.just(1e-20)}}


@pytest.mark.parametrize("model", MODELS)
@settings(max_examples=examples(ci=3, thorough=20))
@given(data=st.data())
def test_exact_discrete_conservation_laws(model, data):
    case = data.draw(cases(model, arch=ARCH, **HPARAMS), label="case")
    check_conservation(case.arch, case.h, case.loss, case.extra, case.steps, case.seed)
