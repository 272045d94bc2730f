"""The clustering rules of Expand-and-Cluster: the published rule against a plain reference
implementation of the paper's algorithm, close teacher neurons held by every student, the
presets and their switches."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import average, fcluster
from scipy.spatial.distance import pdist
from strategies import examples

from pipeline.config import ConfigError
from pipeline.recovery.cluster import (
    ADDITIONS,
    DEEP_FINETUNE,
    ClusterHparams,
    cluster_layer,
    converged_students,
    preset,
    symmetry_of,
    without,
)

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def default_cluster() -> ClusterHparams:
    """The cluster settings of the embedded default's recovery study."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    return ClusterHparams.from_dict(config["studies"]["recovery"]["cluster"])


def planted(gen, centres, students, noise, activation, missing=0.0, leftovers=(10, 20)):
    """Pooled neurons of ``students`` students: each holds a noisy copy of every centre
    (rescaled where scaling is a symmetry, sign-flipped where a flip is), except with
    probability ``missing``, plus a random number of random leftover neurons."""
    sym = symmetry_of(activation)
    vectors, owner = [], []
    for s in range(students):
        for c in centres:
            if float(torch.rand(1, generator=gen)) < missing:
                continue
            v = c + noise * torch.randn(len(c), generator=gen, dtype=F64)
            if sym.scale:
                v = v * (0.5 + 1.5 * torch.rand(1, generator=gen, dtype=F64))
            if sym.sign_invariant and float(torch.rand(1, generator=gen)) < 0.5:
                v = -v
            vectors.append(v)
            owner.append(s)
        extra = int(torch.randint(leftovers[0], leftovers[1] + 1, (1,), generator=gen))
        for _ in range(extra):
            vectors.append(torch.randn(len(centres[0]), generator=gen, dtype=F64))
            owner.append(s)
    return torch.stack(vectors), np.array(owner)


def close_pair(gen, dim, angle):
    """Four unit directions: the first two ``angle`` degrees apart, every other pair >= 30."""
    while True:
        d = torch.nn.functional.normalize(torch.randn(4, dim, generator=gen, dtype=F64), dim=1)
        p = torch.nn.functional.normalize(d[1] - (d[1] @ d[0]) * d[0], dim=0)
        d[1] = math.cos(math.radians(angle)) * d[0] + math.sin(math.radians(angle)) * p
        cos = (d @ d.T).abs().fill_diagonal_(0.0)
        cos[0, 1] = cos[1, 0] = 0.0
        if cos.max() < math.cos(math.radians(30)):
            return d


def found_directions(clusters, v, directions):
    """Per planted direction, the largest |cos| with a kept cluster's mean direction."""
    unit = torch.nn.functional.normalize(v, dim=1)
    centres = torch.stack([(clusters.sign[m, None] * unit[m]).mean(0) for m in clusters.members])
    cos = torch.nn.functional.normalize(centres, dim=1) @ directions.T
    return cos.abs()


@settings(max_examples=examples(ci=40, thorough=400), deadline=None)
@given(seed=st.integers(0, 2**31 - 1), activation=st.sampled_from(["relu", "tanh"]))
def test_close_neurons_that_every_student_holds_stay_two(seed, activation):
    """Ten students each hold four unit directions (noise 1e-3), two of them 8-12 degrees
    apart, plus 10-20 random leftovers (for tanh, no scale symmetry: of norm 2-3 in 5-10
    dimensions, against the neurons' 1): at the default config's cluster settings all four
    are found, each once. Without the distinct-neurons rule the close pair is one cluster."""
    gen = torch.Generator().manual_seed(seed)
    dim = int(torch.randint(5, 11, (1,), generator=gen))
    angle = 8 + 4 * float(torch.rand(1, generator=gen))
    directions = close_pair(gen, dim, angle)
    v, owner = planted(gen, directions, 10, 1e-3, activation)
    rank = torch.randperm(10, generator=gen).numpy()
    h = default_cluster()
    clusters = cluster_layer(v, owner, rank, symmetry_of(activation), 10, h, "fc1")
    cos = found_directions(clusters, v, directions)
    assert cos.shape == (4, 4), clusters.table[clusters.table.status != "dropped_small"]
    assert sorted(cos.argmax(dim=1).tolist()) == [0, 1, 2, 3]
    assert (cos.max(dim=1).values > 1 - 1e-5).all()
    # every student contributes one neuron to each kept cluster
    for members in clusters.members:
        assert sorted(owner[members].tolist()) == list(range(10))
    merged = cluster_layer(
        v, owner, rank, symmetry_of(activation), 10, replace(h, distinct=False), "fc1"
    )
    assert len(merged.members) < 4


def published_reference(v, owner, rank, gamma, beta, students, scale, sign):
    """The paper's clustering of one layer, written plainly (spec section 2.3-2.4): canonical
    orientation by the first coordinate's sign, unit norm where relu-like, Euclidean distances,
    average linkage, the last cut of the first run of heights with the most clusters of >=
    floor(gamma N) members, then the size filter, the median-cosine filter and the winner
    among the five best students. Returns ``[(members, winner, centre)]``."""
    w = v.numpy().copy()
    if scale:
        w = w / np.linalg.norm(w, axis=1, keepdims=True)
    if sign:
        flip = np.sign(w[:, 0])
        flip[flip == 0] = 1
        w = w * flip[:, None]
    min_size = int(gamma * students)
    tree = average(pdist(w))
    counts = []
    for height in tree[:, 2]:
        _, sizes = np.unique(fcluster(tree, height, "distance"), return_counts=True)
        counts.append(int((sizes >= min_size).sum()))
    i = counts.index(max(counts))
    while i + 1 < len(counts) and counts[i + 1] == counts[i]:
        i += 1
    labels = fcluster(tree, tree[i, 2], "distance")
    out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < min_size:
            continue
        if np.median(pdist(w[members], "cosine")) > 1 - math.cos(math.radians(beta)):
            continue
        owners = [s for s in rank[:5] if s in set(owner[members].tolist())]
        if not owners:
            continue
        mine = members[owner[members] == owners[0]]
        out.append((sorted(members.tolist()), owners[0], w[mine].mean(0)))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_published_rule_is_the_papers(seed):
    """On planted sets (some directions missing from some students, leftovers, random ranks),
    ``rule: published`` keeps the clusters, winners and directions of the plain reference."""
    gen = torch.Generator().manual_seed(seed)
    activation = ("relu", "tanh", "sigmoid")[seed % 3]
    dim = int(torch.randint(4, 9, (1,), generator=gen))
    count = int(torch.randint(3, 7, (1,), generator=gen))
    centres = torch.randn(count, dim, generator=gen, dtype=F64)
    noise = (1e-3, 3e-2)[seed % 2]
    v, owner = planted(gen, centres, 10, noise, activation, missing=0.2, leftovers=(2, 8))
    rank = torch.randperm(10, generator=gen).numpy()
    sym = symmetry_of(activation)
    h = preset("published")
    ours = cluster_layer(v, owner, rank, sym, 10, h, "fc1")
    ref = published_reference(v, owner, rank, h.gamma, h.beta, 10, sym.scale, sym.sign_invariant)
    assert ref  # something is kept
    assert sorted(sorted(m.tolist()) for m in ours.members) == sorted(m for m, _, _ in ref)
    by_members = {tuple(m): (w, c) for m, w, c in ref}
    u = torch.nn.functional.normalize(v, dim=1) if sym.scale else v
    for members, winner in zip(ours.members, ours.winner, strict=True):
        ref_winner, ref_centre = by_members[tuple(sorted(members.tolist()))]
        assert winner == ref_winner
        mine = members[owner[members] == winner]
        centre = (ours.sign[mine, None] * u[mine]).mean(0).numpy()
        np.testing.assert_allclose(centre, ref_centre, rtol=0, atol=1e-12)
    statuses = set(ours.table.status)
    assert statuses <= {"kept", "dropped_small", "dropped_spread", "dropped_unowned"}


def test_presets_and_switches():
    pipeline = ClusterHparams.from_dict({"gamma": 0.5})
    assert pipeline == ClusterHparams() and pipeline.rule == "pipeline"
    published = ClusterHparams.from_dict({"rule": "published", "beta": 20})
    assert published == replace(preset("published"), beta=20)
    # every difference between the presets (but the fits' and the rule's name) is an addition
    differing = {
        k
        for k in ClusterHparams.__dataclass_fields__
        if getattr(pipeline, k) != getattr(preset("published"), k)
    }
    switched = set().union(*(off.keys() for off, _ in ADDITIONS.values()))
    assert differing - {"rule"} == switched
    for name, (off, rationale) in ADDITIONS.items():
        assert without(name) != pipeline and rationale
        assert all(getattr(without(name), k) == getattr(preset("published"), k) for k in off)
    with pytest.raises(ValueError, match="cluster.rule"):
        ClusterHparams.from_dict({"rule": "paper"})
    with pytest.raises(ValueError, match="cluster.cut"):
        ClusterHparams.from_dict({"cut": "lowest"})
    with pytest.raises(ConfigError, match=r"cluster\.tight: unknown key"):
        ClusterHparams.from_dict({"tight": True})


def test_the_schema_documents_the_defaults():
    """One default for every cluster key, the deep finetune (the students' refit between
    layers) included: the dataclass's, documented in the config schema, used by the workflow
    (the embedded default sets no finetune) and by the tests (which read that config)."""
    schema = yaml.safe_load((ROOT / "config" / "schema" / "config.schema.yaml").read_text())
    keys = schema["$defs"]["recovery_cluster"]["properties"]
    assert set(keys) == set(ClusterHparams.__dataclass_fields__)
    default = ClusterHparams()
    for key, spec in keys.items():
        if key == "polish":
            fit = spec["default"]
            assert getattr(default, key) == replace(type(DEEP_FINETUNE)(), **fit), key
        elif key in ("finetune", "final"):
            fit = spec["default"]
            assert getattr(default, key) == replace(type(DEEP_FINETUNE)(), **fit), key
        else:
            assert spec["default"] == getattr(default, key), key
    assert default.finetune == DEEP_FINETUNE
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert "finetune" not in config["studies"]["recovery"]["cluster"]


@settings(max_examples=examples(ci=30, thorough=300), deadline=None)
@given(
    exponents=st.lists(st.floats(-30, 0), min_size=4, max_size=20),
    diverged=st.integers(0, 2),
    gamma=st.floats(0.1, 1.0),
    factor=st.one_of(st.none(), st.floats(1.0, 1e6)),
)
def test_the_converged_students_are_those_near_the_best(exponents, diverged, gamma, factor):
    """Step 0: the students within ``converged`` x the best loss, in their order, and never
    fewer than the best n with floor(gamma n) >= 2 (diverged ones, NaN, last); all with None."""
    loss = torch.tensor([10.0**e for e in exponents] + [math.nan] * diverged, dtype=F64)
    h = replace(ClusterHparams(), gamma=gamma, converged=factor)
    chosen = converged_students(loss, h).tolist()
    n = len(loss)
    assert chosen == sorted(set(chosen)) and all(0 <= i < n for i in chosen)
    if factor is None:
        assert chosen == list(range(n))
        return
    best = float(loss.nan_to_num(math.inf).min())
    within = {i for i in range(n) if float(loss[i]) <= factor * best}
    assert within <= set(chosen)
    least = next((k for k in range(2, n + 1) if math.floor(gamma * k) >= 2), n)
    assert len(chosen) == max(len(within), least)
    # what is added beyond the factor is the next best, never a diverged one before a finite one
    ranked = sorted(range(n), key=lambda i: (math.isnan(float(loss[i])), float(loss[i])))
    assert set(chosen) == set(ranked[: len(chosen)])
