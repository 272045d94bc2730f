"""Cluster one hidden layer of N trained students (Expand-and-Cluster, steps 1-4).

0. *Converged students* (ours, ``converged``): the students whose training loss is within
   ``converged`` x the best student's (and at least the best ``n`` with ``floor(gamma n) >=
   2``, so that a cluster still needs two students: four at gamma 0.5). A student at the
   teacher's function holds every teacher neuron (exactly, up to its symmetries, duplicates
   and leftover neurons that cancel); one stuck orders of magnitude above the best is at
   another point of the loss surface, whose neurons approximate the teacher's at best.
   Counted as evidence, such students can outvote the few that converged: their
   approximations spread the real clusters and their shared local-minimum neurons make
   spurious ones (measured on three-layer tanh teachers: 3 of 10 students at 1e-7 of the loss
   and 7 at 1e-4; layer 1 is wrong from all ten, every layer at round-off from the best four).
   But two or three converged students are weak evidence too (relu teachers, where a stuck
   student still holds most neurons well), so they are clustered only where all the students'
   reconstruction does not fit the data to round-off, and the data decide between the two
   (:func:`pipeline.recovery.collapse.reconstruct`).
   Published: every student, once.

Per hidden layer, with ``v_i = [w_i; b_i]`` the incoming vector of neuron ``i`` (all N
students' neurons pooled, ``M = N x width``) and ``a_i`` its outgoing vector:

1. *Canonicalise* by the activation's symmetry (:data:`SYMMETRIES`): where positive scaling is
   a symmetry (relu, leaky_relu, identity) ``u_i = v_i / |v_i|`` and ``|v_i|`` moves into
   ``a_i``; elsewhere ``u_i = v_i``. Where a sign flip is a symmetry up to a known correction
   (odd: tanh, identity; odd-constant: sigmoid; even-linear: relu, leaky_relu, softplus, gelu,
   silu) the sign is quotiented out by the distance itself, ``d(u, u') = min(|u - u'|,
   |u + u'|)`` (``sign: distance``), instead of a canonical coordinate's sign (``sign:
   coordinate``, published; it flips erratically when that coordinate is near zero); each kept
   cluster is then oriented along its winner's member.
2. *Distances* by matrix products (``|u|^2 + |u'|^2 - 2|u.u'|``), in row blocks straight into
   scipy's condensed vector (near-duplicate pairs, where that form cancels, recomputed
   directly); *average-linkage* (UPGMA) hierarchical clustering.
3. *Cut* where the number of clusters with support ``>= s = floor(gamma N)`` is largest: one
   pass over the linkage (each merge changes the count by ``[a+b >= s] - [a >= s] - [b >=
   s]``), merges of equal height grouped (a cut at height t applies all of them). Our rule
   (``rule: pipeline``) differs from the published one in four switches:

   - ``support: students``: support is the number of distinct students among the members (a
     neuron and its duplicates in one student are one observation; published: members);
   - ``tight_count``: a cluster counts only if it formed below the spread limit's height,
     ``chord(beta)`` x its vectors' mean norm (vectors of norm r within beta of each other are
     at most ``r chord(beta)`` apart). With 4x wider students most neurons are leftovers
     (linear terms, dead units), and high in the tree their loose unions gain enough students
     to outnumber the real neurons, which would set the cut there and merge real neurons
     away; the cut is then made in the run of that count which holds longest below the limit
     (a short spike low in the tree, with a neuron still in two fragments, no longer wins),
     a run's stretch measured only up to the largest limit among the clusters it counts
     (vectors without a scale symmetry have mixed norms: a count of tight clusters of small
     vectors is no evidence at the heights where only the large vectors' unions form);
   - ``distinct``: a merge whose two sides each hold neurons of the same ``s`` students is
     never made (nor any above it). A student network holds each teacher neuron once, or as
     duplicates with one incoming vector (splitting a neuron into copies is an exact symmetry
     of the student, so its copies are one point up to the fit's noise); two sides that as many
     students each hold as make a cluster real are therefore two distinct neurons those
     students each hold, however close their directions (the published cut merges teacher
     neurons 10-15 degrees apart);
   - ``cut: gap``: within the chosen run, the cut followed by the largest gap in merge height
     (the most stable partition; published: the highest cut of the run, ``cut: highest``,
     where stray neurons join the big clusters and spoil them).
4. *Filters*: keep clusters of support ``>= s``; drop those whose median pairwise cosine
   distance (``1 - |cos|`` with a sign symmetry, else ``1 - cos``) exceeds ``1 - cos(beta)``;
   with ``winners: k`` (published: 5) drop those none of the k best students owns
   (``dropped_unowned``). Ours also merges kept clusters whose mean directions are within
   ``merge_angle`` (``fragments``: a student holding two slightly different copies of a neuron
   makes two clusters, since ``distinct`` keeps them apart; below ``merge_angle`` they are one
   neuron, the resolution limit). Every cluster, kept, merged or dropped and why, is a row of
   the cluster table.

The presets are :func:`preset` (``pipeline``, ``published``); each of our additions is one
entry of :data:`ADDITIONS` (the settings that switch it off, and why it is there), so that the
benchmark can run ours minus each of them on the same students. Collapsing the kept clusters
into a network is :mod:`pipeline.recovery.collapse`.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from pipeline.config import checked_block, from_block
from pipeline.models import activations
from pipeline.recovery.students import FitHparams


@dataclass(frozen=True)
class Symmetry:
    scale: bool  # positive scaling: sigma(a z) = a sigma(z), a > 0
    sign: str | None  # odd | odd_constant | even_linear | None

    @property
    def sign_invariant(self) -> bool:
        return self.sign is not None


#: from the activation table: positive scaling where it is homogeneous, its sign class
SYMMETRIES = {name: Symmetry(a.homogeneous, a.sign) for name, a in activations.TABLE.items()}


def symmetry_of(activation: str) -> Symmetry:
    if activation not in SYMMETRIES:
        raise ValueError(
            f"no Expand-and-Cluster symmetry for activation {activation!r}; "
            f"known: {', '.join(SYMMETRIES)}"
        )
    return SYMMETRIES[activation]


RULES = ("pipeline", "published")

# The published algorithm (spec: ../shared/specs/modelsym-expand-and-cluster-modules.md, section 2),
# as ``rule: published``; each value cites the step it reproduces.
PUBLISHED = {
    "sign": "coordinate",  # 2.3: flip each vector so its canonical coordinate is positive
    "support": "members",  # 2.4 steps 3-4: a cluster is big with >= floor(gamma N) members
    "tight_count": False,  # 2.4 step 3: every big cluster counts ...
    "cut": "highest",  # ... and the tree is cut at the last height of the first maximal run
    "distinct": False,  # 2.4 step 3: any two clusters may merge
    "fragments": False,  # 2.4 steps 5-6: kept clusters are collapsed as they are
    "converged": None,  # 2.4 step 4: every student's neurons are pooled
    "winners": 5,  # 2.4 step 6: the best of the 5 best students owning a member (else dropped)
    "twins": False,  # 2.4 steps 9-10: the finetuned net is the result ...
    "min_nonlinearity": 0.0,  # ... no neuron is pruned after clustering
    "prune_rounds": 0,
    "redundant_trials": 0,
    "layer_correction": False,  # 2.4 steps 8-9: no correction between layers, one at the end
    "freeze": False,  # 2.4 step 8: all the students' weights are finetuned between layers
    "refit_as_students": False,  # 2.4 step 8: ... by Adam, however the students were fitted
    "polish": None,  # 2.4 step 10: the final fit (Adam) ends the reconstruction
}
# 2.4 step 8: finetune between layers, and steps 9-10: the final fit (the affine correction's
# weights at 10x the rate), Adam with the students' plateau schedule at lr 1e-4, 5000 epochs
PUBLISHED_FIT = FitHparams(lr=1e-4, max_epochs=5000, batch_size=512)

# Our additions to the published rule: name -> (the settings that switch it off, rationale).
ADDITIONS = {
    "converged_students": (
        {"converged": None},
        "a student stuck far above the best holds approximations, not the teacher's neurons; "
        "counted, they blur and outvote the converged students' clusters",
    ),
    "sign_by_distance": (
        {"sign": "coordinate"},
        "min(|u-u'|, |u+u'|) quotients the sign out; a canonical coordinate near 0 flips copies "
        "of one neuron apart",
    ),
    "support_by_students": (
        {"support": "members"},
        "copies of a neuron inside one student are one piece of evidence, not several",
    ),
    "tight_count": (
        {"tight_count": False},
        "loose unions of leftover neurons high in the tree outnumber the real neurons and would "
        "set the cut",
    ),
    "gap_cut": (
        {"cut": "highest"},
        "the most stable partition of the best run; at the highest cut strays join and spoil "
        "the big clusters",
    ),
    "distinct_neurons": (
        {"distinct": False},
        "two sides both held by gamma N students are two neurons those students each hold, "
        "however close",
    ),
    "fragment_merge": (
        {"fragments": False},
        "kept clusters within merge_angle are fragments of one neuron (two slightly different "
        "copies in the students)",
    ),
    "any_winner": (
        {"winners": 5},
        "no kept cluster is lost because none of the five best students owns a member",
    ),
    "twin_folding": (
        {"twins": False},
        "the final fit can split one neuron into two copies pointing the same way (a saddle)",
    ),
    "linear_pruning": (
        {"min_nonlinearity": 0.0},
        "students carry linear terms in neurons affine on the data; they are not identifiable",
    ),
    "weak_pruning": (
        {"prune_rounds": 0},
        "neurons contributing almost nothing after the final fit are not the teacher's",
    ),
    "redundant_pruning": (
        {"redundant_trials": 0},
        "the teacher is the smallest network with its function: a neuron the refit does "
        "without is excess",
    ),
    "layer_correction": (
        {"layer_correction": False},
        "a flipped neuron leaves a linear term in its own input space; fit it per layer, not "
        "from the inputs at the end",
    ),
    "frozen_layers": (
        {"freeze": False},
        "the students keep the recovered layers fixed, so the next layer's vectors share one basis",
    ),
    "polished_refit": (
        {"refit_as_students": False},
        "students polished to round-off are refitted between layers by their own polish: an Adam "
        "refit leaves them at the collapse's error and the next layer's vectors with it",
    ),
    "lm_polish": (
        {"polish": None},
        "at the teacher the residual is zero: Gauss-Newton (Levenberg-Marquardt) converges there "
        "where L-BFGS stalls along nearly linear neurons; the redundancy test compares converged "
        "losses",
    ),
    "lbfgs_fits": (
        {"finetune": PUBLISHED_FIT, "final": replace(PUBLISHED_FIT, skip_lr_factor=10.0)},
        "full-batch L-BFGS polishes the small reconstruction to round-off, where Adam stalls",
    ),
}


@dataclass(frozen=True)
class ClusterHparams:
    """How the students are clustered, collapsed and refitted. ``rule`` names the preset the
    other keys start from: ``pipeline`` (these defaults) or ``published`` (:data:`PUBLISHED`);
    every key differing between the two is one of :data:`ADDITIONS`."""

    rule: str = "pipeline"
    gamma: float = 0.5
    beta: float = 30.0  # degrees
    converged: float | None = 100.0  # cluster students within this factor of the best loss
    sign: str = "distance"  # distance (sign-invariant distance) | coordinate (published)
    support: str = "students"  # students (distinct owners) | members (the published count)
    tight_count: bool = True  # the cut counts only clusters formed below beta (unit vectors)
    cut: str = "gap"  # gap (most stable cut of the best run) | highest (the published rule)
    distinct: bool = True  # never merge two sides that gamma N students both hold
    fragments: bool = True  # merge kept clusters closer than merge_angle
    merge_angle: float = 2.0  # degrees: the resolution of the fragment merge and twin folding
    winners: int = 0  # collapse onto the best of this many best students (0: any owner)
    twins: bool = True  # fold twin neurons of the final fit
    min_nonlinearity: float = 0.02  # drop neurons this close to linear (x a unit neuron's)
    min_contribution: float = 0.01  # after finetuning, drop neurons below this x the largest
    prune_rounds: int = 3  # rounds of dropping unneeded neurons and finetuning again
    redundant_trials: int = 3  # weakest neurons tried for removal per round (0: never)
    redundant_factor: float = 10.0  # a removal stands if the refit loss is within this factor
    layer_correction: bool = True  # correct each collapsed layer in its own input space
    freeze: bool = True  # keep recovered layers fixed while the students are refitted
    refit_as_students: bool = True  # polished students (expand.polish) refit by that polish
    mask_inputs: bool = True
    finetune: FitHparams = field(default_factory=lambda: DEEP_FINETUNE)
    final: FitHparams = field(default_factory=lambda: FINAL_FIT)
    polish: FitHparams | None = field(default_factory=lambda: LM_POLISH)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "cluster") -> ClusterHparams:
        raw = dict(raw)
        checked_block(cls, raw, where)
        fits = {
            k: from_block(FitHparams, raw.pop(k), f"{where}.{k}")
            for k in ("finetune", "final", "polish")
            if raw.get(k) is not None
        }
        return replace(preset(raw.pop("rule", "pipeline"), where), **raw, **fits).checked(where)

    def checked(self, where: str = "cluster") -> ClusterHparams:
        for key, allowed in (
            ("rule", RULES),
            ("sign", ("distance", "coordinate")),
            ("support", ("students", "members")),
            ("cut", ("gap", "highest")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{where}.{key}: {getattr(self, key)!r} not allowed; allowed: "
                    f"{', '.join(allowed)}"
                )
        if self.winners < 0:
            raise ValueError(f"{where}.winners: {self.winners} < 0")
        if self.converged is not None and not self.converged >= 1:
            raise ValueError(f"{where}.converged: {self.converged} < 1 (null: every student)")
        return self


# the students' refit after each collapsed hidden layer (below the last): full batch, from a
# tenth of the students' rate, the recovered layers fixed; the deep tests use this default too.
# Students that were polished (expand.polish) are refitted by that polish instead
# (``refit_as_students``; pipeline.recovery.collapse.reconstruct)
DEEP_FINETUNE = FitHparams(
    lr=1e-3,
    batch_size=0,
    max_epochs=1500,
    plateau_patience=50,
    plateau_cooldown=50,
    min_lr=1e-6,
    log_every=500,
)
FINAL_FIT = FitHparams(optimizer="lbfgs", lr=1.0, max_epochs=200, log_every=50)
# Levenberg-Marquardt (at most 200 residual evaluations) from where an L-BFGS fit of the
# reconstruction ended: the redundancy test's network and trials, and the result
# (pipeline.recovery.collapse). The teacher is a zero of the residuals, where Gauss-Newton
# converges quadratically however ill-conditioned the problem; L-BFGS stalls near 1e-7 of
# mean(y^2) with neurons 5e-3..3e-2 off (1 - |cos|) where nearly linear neurons
# (|z| << 1 on the data: tanh ~ z - z^3 / 3) leave only a weak curvature to tell them apart
# (two-input teachers), and a stalled loss lets the redundancy test drop a needed neuron
LM_POLISH = FitHparams(optimizer="lm", max_epochs=200, log_every=1)


def preset(rule: str, where: str = "cluster") -> ClusterHparams:
    """The settings of ``rule``: ``pipeline`` (ours) or ``published``."""
    if rule == "pipeline":
        return ClusterHparams()
    if rule == "published":
        return ClusterHparams(
            rule="published",
            finetune=PUBLISHED_FIT,
            final=replace(PUBLISHED_FIT, skip_lr_factor=10.0),
            **PUBLISHED,
        )
    raise ValueError(f"{where}.rule: {rule!r} not allowed; allowed: {', '.join(RULES)}")


def without(addition: str, base: ClusterHparams | None = None) -> ClusterHparams:
    """``base`` (default: the pipeline rule) with one of :data:`ADDITIONS` switched off."""
    if addition not in ADDITIONS:
        raise ValueError(f"unknown addition {addition!r}; known: {', '.join(ADDITIONS)}")
    return replace(base or ClusterHparams(), **ADDITIONS[addition][0])


def converged_students(train_loss: torch.Tensor, h: ClusterHparams) -> np.ndarray:
    """Step 0: the students to cluster, as indices into ``train_loss [N]`` in their order:
    those within ``h.converged`` x the best loss (every one with ``converged: None``), and at
    least the best ``n`` (diverged ones last) with ``floor(gamma n) >= 2``."""
    loss = torch.nan_to_num(train_loss.detach().double().cpu(), nan=math.inf)
    n = len(loss)
    if h.converged is None:
        return np.arange(n)
    rank = torch.argsort(loss, stable=True)
    within = int((loss <= h.converged * loss[rank[0]]).sum())
    least = next((k for k in range(2, n + 1) if math.floor(h.gamma * k) >= 2), n)
    return np.sort(rank[: max(within, least)].numpy())


# -- canonicalisation and distances -----------------------------------------------------------
def canonical(v: torch.Tensor, symmetry: Symmetry) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, scale)``: ``v = scale * u`` with ``|u| = 1`` where scaling is a symmetry, else
    ``u = v`` and ``scale = 1``. ``v: [M, k]``."""
    if symmetry.scale:
        scale = v.norm(dim=1)
        return v / scale.clamp_min(torch.finfo(v.dtype).tiny)[:, None], scale
    return v, torch.ones(len(v), dtype=v.dtype, device=v.device)


def condensed_distances(u: np.ndarray, sign_invariant: bool, block: int = 1024) -> np.ndarray:
    """scipy's condensed distance vector of the rows of ``u [M, k]``, ``|u_i - u_j|`` or, with
    ``sign_invariant``, ``min(|u_i - u_j|, |u_i + u_j|)``, by blocked matrix products."""
    u = np.ascontiguousarray(u, dtype=np.float64)
    m = len(u)
    out = np.empty(m * (m - 1) // 2)
    sq = np.einsum("ij,ij->i", u, u)
    for start in range(0, m, block):
        stop = min(start + block, m)
        gram = u[start:stop] @ u[start:].T
        if sign_invariant:
            np.abs(gram, out=gram)
        scale = sq[start:stop, None] + sq[None, start:]
        d2 = scale - 2 * gram
        # near-duplicates: the Gram form cancels to round-off (~1e-8 after the square root);
        # recompute those few pairs directly, copies equal to round-off at distance 0
        rows, cols = np.nonzero(d2 < 1e-8 * scale)
        if len(rows):
            a, b = u[start + rows], u[start + cols]
            close = np.einsum("ij,ij->i", a - b, a - b)
            if sign_invariant:
                close = np.minimum(close, np.einsum("ij,ij->i", a + b, a + b))
            d2[rows, cols] = np.where(close < 1e-24 * scale[rows, cols], 0.0, close)
        np.sqrt(np.maximum(d2, 0.0, out=d2), out=d2)
        for r in range(stop - start):
            i = start + r
            offset = i * m - i * (i + 1) // 2
            out[offset : offset + m - i - 1] = d2[r, r + 1 :]
    return out


def cosine_distances(u: torch.Tensor, w: torch.Tensor, sign_invariant: bool) -> torch.Tensor:
    """``[len(u), len(w)]`` matrix of ``1 - cos`` (``1 - |cos|`` with ``sign_invariant``)."""
    tiny = torch.finfo(u.dtype).tiny
    un = u / u.norm(dim=1, keepdim=True).clamp_min(tiny)
    wn = w / w.norm(dim=1, keepdim=True).clamp_min(tiny)
    cos = un @ wn.T
    return (1 - (cos.abs() if sign_invariant else cos)).clamp_min(0.0)


def chord(degrees: float) -> float:
    """Distance ``|u - u'| = 2 sin(angle / 2)`` of two unit vectors ``degrees`` apart."""
    return 2 * math.sin(math.radians(degrees) / 2)


def cut(
    link: np.ndarray,
    min_support: int,
    owner: np.ndarray | None = None,
    rule: str = "gap",
    max_height: float | np.ndarray | None = None,
    run: str = "max",
    distinct: bool = False,
    by_owner: bool = True,
) -> tuple[np.ndarray, float, int]:
    """Flat cluster labels (1-based) where the number of clusters with support ``>=
    min_support`` is largest: ``(labels, height, count)``; see the module docstring (step 3).

    ``max_height``: a cluster formed by a merge above it (a scalar, or one limit per merge)
    does not count (average linkage: its members' mean pairwise distance is at most its merge
    height, so one formed below a height that stands for the spread limit is tight enough to
    be kept; loose unions of leftover neurons, which can outnumber the real neurons high up the
    tree, no longer set the cut).
    ``run``: ``max``, the first run of cuts attaining the largest count (the published rule), or
    ``stable`` (needs ``max_height``), the run of a nonzero count that holds over the longest
    stretch of merge height, each cut's stretch counted up to the largest ``max_height`` among
    the clusters it counts (:func:`_counted_reach`), and within it the gap of the ``gap`` rule
    likewise: a spike of the count low in the tree (one neuron still in two fragments while
    another's looser copies have not joined yet) loses to the plateau where every neuron is one
    cluster.

    ``distinct`` (needs ``owner``): a merge whose two sides share ``>= min_support`` owners is
    never made, nor any merge above it; both sides stay clusters at every height. A student
    network holds a teacher neuron once, or as duplicates with one incoming vector (splitting a
    neuron into copies is a symmetry of the student, so its copies are one point up to the
    fit's noise); two sides that as many students each hold as make a cluster real are two
    neurons those students each hold, however close their directions are.

    Support is the number of members, or with ``owner`` (the student of every leaf) and
    ``by_owner`` the number of distinct students among the members (several copies of a neuron
    inside one student are one piece of evidence, not several), tracked as a bit set per
    cluster. Among the cuts of the
    first run attaining the maximum, ``rule`` picks the ``highest`` (the published choice: it
    lets the big clusters swallow every stray neuron below the next merge) or the one followed
    by the largest ``gap`` in merge height (the most stable partition).
    """
    if rule not in ("gap", "highest"):
        raise ValueError(f"cluster.cut: {rule!r} not allowed; allowed: gap, highest")
    if distinct and owner is None:
        raise ValueError("cut: distinct needs the owner of every leaf")
    m = len(link) + 1
    a, b = link[:, 0].astype(np.int64), link[:, 1].astype(np.int64)
    valid = np.ones(2 * m - 1, dtype=bool)
    if owner is None:
        support = np.concatenate([np.ones(m), link[:, 3]])
    else:
        sets = [1 << int(o) for o in owner]
        for i in range(m - 1):
            sets.append(sets[a[i]] | sets[b[i]])
            if distinct:
                shared = (sets[a[i]] & sets[b[i]]).bit_count()
                valid[m + i] = valid[a[i]] and valid[b[i]] and shared < min_support
        support = np.fromiter((s.bit_count() for s in sets), dtype=np.int64, count=2 * m - 1)
        if not by_owner:
            support = np.concatenate([np.ones(m), link[:, 3]])
    big = support >= min_support
    if max_height is not None:
        big[m:] &= link[:, 2] <= max_height
    # a blocked merge changes nothing: its sides stay clusters (and so above it)
    delta = np.where(valid[m:], big[m:].astype(np.int64) - big[a] - big[b], 0)
    count = np.cumsum(delta)
    heights = link[:, 2]
    ends = np.flatnonzero(np.append(heights[1:] != heights[:-1], True))  # last merge of each tie
    at_ends = count[ends]
    best = at_ends.max()
    first = int(np.argmax(at_ends == best))
    below = np.flatnonzero(at_ends[first:] < best)
    last = first + (int(below[0]) - 1 if len(below) else len(at_ends) - 1 - first)
    reach = None
    if run == "stable" and max_height is not None:
        reach = _counted_reach(link, big, valid, max_height)[ends]
        h_end = heights[ends]
        top = np.append(h_end[1:], h_end[-1])
        span = np.maximum(np.minimum(top, reach) - h_end, 0.0)
        starts = np.append(0, np.flatnonzero(np.diff(at_ends)) + 1)
        stops = np.append(starts[1:], len(at_ends))
        runs = [(span[a:b].sum(), at_ends[a], a, b - 1) for a, b in zip(starts, stops, strict=True)]
        runs = [r for r in runs if r[1] > 0]
        if runs:
            _, best, first, last = max(runs)
    elif run != "max":
        raise ValueError(f"cut run: {run!r} not allowed; allowed: max, stable")
    if rule == "highest":
        chosen = last
    else:
        after = np.append(heights, heights[-1])[ends[first : last + 1] + 1]
        if reach is not None:  # a gap counts up to where the counted clusters' limits end
            after = np.minimum(after, reach[first : last + 1])
        chosen = first + int(np.argmax(after - heights[ends[first : last + 1]]))
    height = float(heights[ends[chosen]])
    if not distinct:
        return fcluster(link, t=height, criterion="distance"), height, int(best)
    return _flat_labels(link, valid[m:] & (heights <= height)), height, int(best)


def _counted_reach(
    link: np.ndarray, big: np.ndarray, valid: np.ndarray, max_height: float | np.ndarray
) -> np.ndarray:
    """Per merge ``[m - 1]``: the largest spread limit (``max_height`` of the merge that formed
    it) among the clusters that count once the merges up to it are made (0 when none counts).

    A count is evidence of a stable partition only up to the limits of the clusters it counts:
    past the largest of them, every cluster counted would be too loose were it formed there,
    so the stretch above says nothing about them. With one limit for all (unit vectors) this is
    that limit; with vectors of mixed norms (no scale symmetry) it keeps a count of tight
    clusters of small vectors from being carried to the heights of the large ones (random
    leftover neurons of norm 2-3 against teacher neurons of norm 1: the run where the leftovers'
    loose unions no longer count, with a teacher neuron lost to them, would win)."""
    m = len(link) + 1
    limit = np.broadcast_to(np.asarray(max_height, dtype=np.float64), (m - 1,))
    node_limit = np.concatenate([np.zeros(m), limit])
    a, b = link[:, 0].astype(np.int64), link[:, 1].astype(np.int64)
    active = [(-node_limit[i], i) for i in np.flatnonzero(big[:m])]
    heapq.heapify(active)
    counted = big[:m].copy().tolist() + [False] * (m - 1)
    out = np.zeros(m - 1)
    for i in range(m - 1):
        if valid[m + i]:
            counted[a[i]] = counted[b[i]] = False
            if big[m + i]:
                counted[m + i] = True
                heapq.heappush(active, (-node_limit[m + i], m + i))
        while active and not counted[active[0][1]]:
            heapq.heappop(active)
        out[i] = -active[0][0] if active else 0.0
    return out


def _flat_labels(link: np.ndarray, made: np.ndarray) -> np.ndarray:
    """Labels 1..k of the leaves when exactly the merges ``made [m - 1]`` are applied."""
    m = len(link) + 1
    parent = np.arange(m)
    rep = np.concatenate([np.arange(m), np.zeros(m - 1, dtype=np.int64)])  # a leaf per node

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (x, y) in enumerate(link[:, :2].astype(np.int64)):
        rep[m + i] = rep[x]
        if made[i]:
            parent[find(rep[y])] = find(rep[x])
    roots = np.array([find(i) for i in range(m)])
    return np.unique(roots, return_inverse=True)[1] + 1


# -- one layer ----------------------------------------------------------------------------------
@dataclass
class LayerClusters:
    """Clustering of one hidden layer's pooled neurons.

    ``members[k]``: indices (into the pooled ``M`` neurons) of kept cluster ``k``; ``sign[i]``:
    orientation of neuron ``i`` relative to its cluster (+1 outside kept clusters); ``winner``:
    per kept cluster, the student whose members define it; ``table``: one row per cluster.
    """

    members: list[np.ndarray]
    sign: torch.Tensor
    winner: list[int]
    table: pd.DataFrame
    height: float


def cluster_layer(
    v: torch.Tensor,
    owner: np.ndarray,
    rank: np.ndarray,
    symmetry: Symmetry,
    n_students: int,
    h: ClusterHparams,
    layer: str,
    coordinate: int = 0,
) -> LayerClusters:
    """Cluster pooled incoming vectors ``v [M, k]`` (``owner[i]``: student of neuron i; ``rank``:
    students best first) by the rule in ``h`` (module docstring). ``coordinate``: the canonical
    coordinate of ``sign: coordinate`` (the first informative input of the first layer)."""
    min_size = math.floor(h.gamma * n_students)
    if min_size < 2:
        raise ValueError(
            f"cluster.gamma: gamma x students = {h.gamma * n_students} < 2; a cluster "
            "must hold neurons of at least two students"
        )
    u, _ = canonical(v, symmetry)
    if len(u) < 2:
        raise ValueError(f"layer {layer}: fewer than two neurons to cluster")
    sign = torch.ones(len(u), dtype=u.dtype)
    sign_invariant = symmetry.sign_invariant
    if sign_invariant and h.sign == "coordinate":  # the published canonical orientation
        flip = torch.sign(u[:, coordinate])
        sign = torch.where(flip == 0, torch.ones_like(flip), flip).cpu()
        u = u * sign.to(u)[:, None]
        sign_invariant = False
    link = linkage(condensed_distances(u.cpu().numpy(), sign_invariant), "average")
    limit = 1 - math.cos(math.radians(h.beta))
    tight = _spread_heights(link, u.norm(dim=1).cpu().numpy(), h.beta) if h.tight_count else None
    labels, height, _ = cut(
        link,
        min_size,
        owner if h.support == "students" or h.distinct else None,
        h.cut,
        max_height=tight,
        run="stable" if tight is not None else "max",
        distinct=h.distinct,
        by_owner=h.support == "students",
    )
    position = {int(s): p for p, s in enumerate(rank)}
    pool = set(rank[: h.winners].tolist()) if h.winners else set(position)
    rows, kept = [], []
    order = np.argsort(labels, kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        owners = owner[idx]
        spread = 0.0
        if len(idx) > 1:
            d = cosine_distances(u[idx], u[idx], sign_invariant)
            spread = float(d[torch.triu_indices(len(idx), len(idx), 1).unbind()].median())
        students = len(set(owners.tolist()))
        ours = [o for o in owners.tolist() if o in pool]
        if (students if h.support == "students" else len(idx)) < min_size:
            status = "dropped_small"
        elif spread > limit:
            status = "dropped_spread"
        elif not ours:
            status = "dropped_unowned"
        else:
            status = "kept"
            kept.append((len(rows), idx))
        rows.append(
            {
                "layer": layer,
                "cluster": int(labels[idx[0]]),
                "size": len(idx),
                "students": students,
                "spread": spread,
                "status": status,
                "winner": _winner(owners, position),
                "recovered": -1,
            }
        )
    tol = 1 - math.cos(math.radians(h.merge_angle)) if h.fragments else -1.0
    groups = _fragments(u, kept, sign_invariant, tol)
    members, winners = [], []
    for k, group in enumerate(groups):
        idx = np.concatenate([kept[g][1] for g in group])
        winner = _winner(np.array([o for o in owner[idx] if o in pool]), position)
        if sign_invariant:
            ref = u[idx[owner[idx] == winner][0]]
            s = torch.sign(u[idx] @ ref)
            sign[idx] = torch.where(s == 0, torch.ones_like(s), s).cpu()
        for g in group:
            row = rows[kept[g][0]]
            row["recovered"] = k
            if g != group[0]:
                row["status"] = "merged"
        rows[kept[group[0]][0]]["winner"] = winner
        members.append(idx)
        winners.append(winner)
    table = pd.DataFrame(rows)
    table["height"] = height
    table["nonlinearity"] = np.nan
    table.loc[table.status == "merged", "recovered"] = -1
    return LayerClusters(members, sign, winners, table, height)


def _spread_heights(link: np.ndarray, norms: np.ndarray, beta: float) -> np.ndarray:
    """Per merge, the height that stands for the spread limit: ``chord(beta)`` x the mean norm
    of the merged cluster's vectors (vectors of norm r within beta of each other are at most
    ``r chord(beta)`` apart; unit vectors, a scale symmetry: ``chord(beta)``)."""
    m = len(norms)
    total = np.concatenate([norms, np.zeros(m - 1)])
    for i, (a, b) in enumerate(link[:, :2].astype(np.int64)):
        total[m + i] = total[a] + total[b]
    return chord(beta) * total[m:] / link[:, 3]


def _winner(owners: np.ndarray, position: dict) -> int:
    return int(min(owners, key=lambda s: position[int(s)]))


def _fragments(u: torch.Tensor, kept: list, sign_invariant: bool, tol: float) -> list[list[int]]:
    """Groups of kept clusters (indices into ``kept``) whose mean directions are within
    ``tol`` cosine distance of each other (single linkage), in order of first member."""
    if not kept:
        return []
    unit = u / u.norm(dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    centres = []
    for _, idx in kept:
        block = unit[idx]
        if sign_invariant:
            s = torch.sign(block @ block[0])
            block = block * torch.where(s == 0, torch.ones_like(s), s)[:, None]
        centres.append(block.mean(0))
    close = cosine_distances(torch.stack(centres), torch.stack(centres), sign_invariant) < tol
    parent = list(range(len(kept)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(close, 1)).tolist():
        parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(kept)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())
