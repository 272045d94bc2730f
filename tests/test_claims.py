"""Claims: margins and aggregation, each science's claims on planted tables (holding and not),
and the printed summary. Claims read tables only (no torch)."""

from __future__ import annotations

import json
import operator
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline import io
from pipeline.claims import register_claim
from pipeline.claims.check import (
    COLUMNS,
    Context,
    Tables,
    aggregate,
    check,
    collect,
    evaluate_study,
    margins,
)
from pipeline.claims.report import render_html, summary_lines

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _random_checks(rng, n):
    rows = []
    for _ in range(n):
        direction = str(rng.choice(list(OPS)))
        threshold = float(rng.normal())
        value = threshold if rng.random() < 0.2 else float(rng.normal())
        rows.append(
            check(
                f"seed~{rng.integers(3)}", f"layer {rng.integers(4)}", value, direction, threshold
            )
        )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("draw", range(20))
def test_margin_is_positive_inside_the_threshold_and_holds_is_the_comparison(draw):
    rng = np.random.default_rng(draw)
    frame = margins(_random_checks(rng, 50))
    for r in frame.itertuples():
        assert r.holds == OPS[r.direction](r.value, r.threshold)
        assert abs(abs(r.margin) - abs(r.value - r.threshold)) < 1e-12
        if r.margin > 0:
            assert r.holds
        if r.margin < 0:
            assert not r.holds
        if r.margin == 0:
            assert r.holds == (r.direction in ("<=", ">="))


def test_a_missing_value_never_holds():
    frame = margins(pd.DataFrame([check("r", "i", float("nan"), ">=", 0.0)]))
    assert not frame.holds.iloc[0] and frame.margin.iloc[0] == -np.inf


def test_an_unknown_direction_is_named():
    with pytest.raises(ValueError, match="direction"):
        margins(pd.DataFrame([check("r", "i", 1.0, "=<", 0.0)]))


@pytest.mark.parametrize("draw", range(20))
def test_aggregates_keep_the_worst_check_per_run_and_per_claim(draw):
    rng = np.random.default_rng(100 + draw)
    frames = []
    for claim in ("a", "b"):
        frames.append(margins(_random_checks(rng, int(rng.integers(1, 30)))).assign(claim=claim))
    checks = pd.concat(frames, ignore_index=True).assign(
        study="s", figure="", tables="", statement="", note=""
    )
    table = aggregate(checks)
    assert list(table.columns) == COLUMNS
    for claim, rows in checks.groupby("claim"):
        top = table[(table.scope == "claim") & (table.claim == claim)]
        assert len(top) == 1
        top = top.iloc[0]
        assert top.holds == rows.holds.all()
        assert top.checks == len(rows) and top.failed == (~rows.holds).sum()
        assert top.margin == rows.margin.min()
        for run, part in rows.groupby("run"):
            per_run = table[(table.scope == "run") & (table.claim == claim) & (table.run == run)]
            assert len(per_run) == 1
            assert per_run.holds.iloc[0] == part.holds.all()
            assert per_run.margin.iloc[0] == part.margin.min()


# -- planted tables -----------------------------------------------------------------------------
def _study(tmp_path, tables: dict[str, pd.DataFrame], spec: dict, runs=None) -> pd.DataFrame:
    paths = {}
    for key, frame in tables.items():
        paths[key] = tmp_path / f"{key}.parquet"
        io.write_parquet(paths[key], frame)
    return evaluate_study("s", spec, paths, runs)


def _claim(table, name):
    rows = table[(table.claim == name) & (table.scope == "claim")]
    assert len(rows) == 1, f"claim {name} not evaluated: {sorted(set(table.claim))}"
    return rows.iloc[0]


def _summary(law, devs, runs, note=""):
    return pd.DataFrame(
        {
            "run": runs,
            "layer": "fc1",
            "quantity": law,
            "note": note,
            "max_rel_dev_discrete": devs,
            "max_rel_dev_continuous": devs,
        }
    )


@pytest.mark.parametrize("draw", range(5))
def test_conservation_claims_hold_exactly_where_the_paper_says(tmp_path, draw):
    rng = np.random.default_rng(draw)
    runs = ["momentum~0.0/bn_eps~1e-12/seed~1", "momentum~0.0/bn_eps~1e-05/seed~1"]
    hp = {
        runs[0]: {"seed": 1, "model": {"name": "mlp", "bn_eps": 1e-12}, "train": {"momentum": 0.0}},
        runs[1]: {"seed": 1, "model": {"name": "mlp", "bn_eps": 1e-5}, "train": {"momentum": 0.0}},
    }
    exact = float(10 ** rng.uniform(-14, -7))
    broken = exact * float(10 ** rng.uniform(2.1, 5))
    tables = {
        "cache/scale.summary": _summary("scale", [exact, broken], runs),
        "cache/rescale.summary": _summary("rescale", [exact, exact], runs),
        "cache/translation.summary": _summary("translation", [exact, exact], runs),
    }
    spec = {"figures": {"fig_scale": {"kind": "conservation", "metric": "scale"}}}
    out = _study(tmp_path, tables, spec, hp)
    assert _claim(out, "scale_discrete").holds  # the broken eps run is not an exact-law run
    assert _claim(out, "scale_discrete").checks == 1
    breaks = _claim(out, "bn_eps_breaks_scale")
    assert breaks.holds and breaks.value == pytest.approx(broken / exact)
    assert breaks.figure == "fig_scale"
    # eps barely breaking the law: the ratio claim fails; a large exact deviation fails too
    tables["cache/scale.summary"] = _summary("scale", [exact, exact * 50], runs)
    tables["cache/rescale.summary"] = _summary("rescale", [exact, 2e-6], runs)
    out = _study(tmp_path, tables, spec, hp)
    assert not _claim(out, "bn_eps_breaks_scale").holds
    assert not _claim(out, "rescale_discrete").holds
    assert _claim(out, "rescale_discrete").failed == 1


def test_rows_without_a_prediction_are_not_checked(tmp_path):
    runs = ["seed~1"]
    hp = {"seed~1": {"seed": 1, "model": {"name": "mlp"}, "train": {"momentum": 0.0}}}
    table = _summary("translation", [1.0], runs, note="no prediction for optimizer adam")
    out = _study(tmp_path, {"cache/translation.summary": table}, {}, hp)
    assert "translation_discrete" not in set(out.claim)


def _stitching(penalties: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    types = {
        "linear": ("linear", {}),
        "rank1": ("low_rank", {"rank": 1}),
        "grelu": ("birkhoff", {"alpha": 0.1}),
    }
    for label, values in penalties.items():
        kind, options = types[label]
        for position, p in enumerate(values):
            rows.append(
                {
                    "zoo": "cnn",
                    "seed_a": 0,
                    "seed_b": 1,
                    "position": position,
                    "layer": f"act{position}",
                    "stitch": label,
                    "type": kind,
                    "options": json.dumps(options),
                    "penalty": p,
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("draw", range(5))
def test_grelu_stitching_claims_compare_types_layer_by_layer(tmp_path, draw):
    rng = np.random.default_rng(draw)
    linear = rng.uniform(0, 0.05, 4)
    grelu = linear + rng.uniform(0, 0.14, 4)
    rank1 = grelu + rng.uniform(0.01, 0.3, 4)
    spec = {"figures": {"st": {"kind": "stitching_penalty"}}}
    table = _stitching({"linear": linear, "rank1": rank1, "grelu": grelu})
    out = _study(tmp_path, {"tables/stitching": table}, spec)
    assert _claim(out, "grelu_stitching_close_to_linear").holds
    assert _claim(out, "grelu_stitching_beats_rank1").holds
    assert _claim(out, "grelu_stitching_close_to_linear").checks == 4
    layer = int(rng.integers(4))
    grelu[layer] = linear[layer] + 0.16
    rank1[layer] = grelu[layer] - 0.01
    table = _stitching({"linear": linear, "rank1": rank1, "grelu": grelu})
    out = _study(tmp_path, {"tables/stitching": table}, spec)
    for name in ("grelu_stitching_close_to_linear", "grelu_stitching_beats_rank1"):
        row = _claim(out, name)
        assert not row.holds and row.failed == 1 and f"layer {layer}" in row["item"]


def test_masks_claims_on_planted_drops_and_overlaps(tmp_path):
    spec = {
        "masks": {
            "stages": {
                "add": {"subtask": "add"},
                "mul": {"subtask": "mul"},
                "add2": {"subtask": "add", "seed": 2},
                "mul2": {"subtask": "mul", "seed": 2},
            }
        }
    }
    inverse = pd.DataFrame(
        {
            "run": "seed~1",
            "mask": ["add", "add", "mul", "mul"],
            "view": ["add", "mul", "add", "mul"],
            "drop": [0.9, 0.2, 0.25, 0.8],
        }
    )

    def iou_rows(pairs):
        return pd.DataFrame(
            [
                {"run": "seed~1", "kind": "role", "layer": "hidden", "a": a, "b": b, "iou": v}
                for a, b, v in pairs
            ]
        )

    overlap = iou_rows([("add", "mul", 0.3), ("add", "add2", 0.6), ("mul", "mul2", 0.5)])
    stability = iou_rows([("add", "add2", 0.6), ("mul", "mul2", 0.5)])
    accuracy = pd.DataFrame(
        {
            "run": "seed~1",
            "mask": ["none", "none", "add", "add", "mul", "mul"],
            "view": ["add", "mul", "add", "mul", "add", "mul"],
            "accuracy": [1.0, 0.98, 0.99, 0.01, 0.02, 0.86],
        }
    )
    tables = {
        "masks/tables/inverse": inverse,
        "masks/tables/accuracy": accuracy,
        "masks/tables/overlap": overlap,
        "masks/tables/stability": stability,
        "masks/tables/class_drop": pd.DataFrame(
            {
                "run": "seed~1",
                "removed": [0, 1],
                "target_drop": [90.0, 60.0],
                "largest_other_drop": [10.0, 0.0],
            }
        ),
    }
    out = _study(tmp_path, tables, spec, {"seed~1": {"seed": 1}})
    specialises = _claim(out, "inverse_mask_specialises")
    assert specialises.holds and specialises.value == pytest.approx(0.8 / 0.25)
    assert _claim(out, "specialised_masks_overlap_less").holds
    assert _claim(out, "class_removal_is_specific").holds
    assert "pairs_do_not_share" not in set(out.claim)  # not the double-addition task
    tables["masks/tables/inverse"] = inverse.assign(
        drop=[0.9, 0.2, 0.75, 0.8]
    )  # mul mask hurts add
    tables["masks/tables/overlap"] = iou_rows(
        [("add", "mul", 0.55), ("add", "add2", 0.6), ("mul", "mul2", 0.5)]
    )
    out = _study(tmp_path, tables, spec, {"seed~1": {"seed": 1}})
    assert not _claim(out, "inverse_mask_specialises").holds
    assert not _claim(out, "specialised_masks_overlap_less").holds
    # a mask that does not solve its own subtask removes little: its ratio does not count
    tables["masks/tables/inverse"] = inverse
    tables["masks/tables/accuracy"] = accuracy.assign(accuracy=[1.0, 0.98, 0.99, 0.01, 0.02, 0.3])
    out = _study(tmp_path, tables, spec, {"seed~1": {"seed": 1}})
    spurious = _claim(out, "inverse_mask_specialises")
    assert not spurious.holds and spurious.value == pytest.approx(0.3 / 0.98)


def test_teleport_claims(tmp_path):
    rows = []
    for teleported, loss in ((False, 0.5), (True, 0.5 * (1 + 3e-6))):
        for alpha in (0.0, 0.5, 1.0):
            rows.append(
                {
                    "alpha": alpha,
                    "split": "test",
                    "loss": loss + alpha,
                    "accuracy": 0.9,
                    "teleported": teleported,
                }
            )
    micro = pd.DataFrame(
        {
            "pair": "gradient_vs_teleport",
            "model": "mlp",
            "batch_size": 8,
            "angle": [89.9, 90.1, 90.2],
        }
    )
    validation = pd.DataFrame(
        [
            {
                "model": "mlp",
                "optimizer": "SGD",
                "teleport": mode,
                "seed": seed,
                "epoch": 3,
                "accuracy": acc,
            }
            for seed in (0, 1)
            for mode, acc in (("none", 0.80), ("teleport", 0.85))
        ]
    )
    spec = {"figures": {"fig6": {"kind": "teleport_validation", "box_epochs": [3, 6]}}}
    tables = {
        "tables/interpolation": pd.DataFrame(rows),
        "tables/micro": micro,
        "tables/validation": validation,
    }
    out = _study(tmp_path, tables, spec)
    assert _claim(out, "teleport_invariance").holds
    assert _claim(out, "micro_teleport_angle").value == pytest.approx(0.2)
    speed = _claim(out, "teleport_speeds_up_sgd")
    assert speed.holds and speed.checks == 3  # two seeds and the pooled box
    validation.loc[(validation.seed == 1) & (validation.teleport == "teleport"), "accuracy"] = 0.7
    tables["tables/validation"] = validation
    out = _study(tmp_path, tables, spec)
    assert not _claim(out, "teleport_speeds_up_sgd").holds
    assert "seed~1" in _claim(out, "teleport_speeds_up_sgd")["item"]


def test_lottery_claim_checks_the_last_rewound_level(tmp_path):
    rows = []
    for strategy in ("sparse_global", "han"):
        for level, (sparsity, acc) in enumerate([(0.0, 0.95), (0.36, 0.95), (0.59, 0.945)]):
            rows.append(
                {
                    "run": "seed~1",
                    "strategy": strategy,
                    "level": level,
                    "sparsity": sparsity,
                    "test_accuracy": acc - (0.2 if strategy == "han" else 0),
                }
            )
    out = _study(tmp_path, {"tables/lottery": pd.DataFrame(rows)}, {}, {"seed~1": {"seed": 1}})
    lottery = _claim(out, "lottery_ticket")
    assert lottery.holds and lottery.checks == 1 and lottery.value == pytest.approx(0.005)


def test_every_claim_is_documented_and_imports_no_torch():
    entries = register_claim.entries()
    assert entries
    for name, entry in entries.items():
        assert entry.doc and entry.meta.get("tables"), name
    modules = sorted({e.module for e in entries.values()})
    code = (
        "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_summary_counts_claims_and_names_those_that_fail(tmp_path):
    checks = pd.DataFrame(
        [check("seed~1", "x", 1.0, "<=", 2.0), check("seed~1", "x", 3.0, "<=", 2.0)]
    )
    frames = [
        margins(checks.iloc[[i]]).assign(
            study="s", claim=c, figure="", tables="t.parquet", statement=f"{c} holds", note=""
        )
        for i, c in enumerate(["good", "bad"])
    ]
    table = aggregate(pd.concat(frames, ignore_index=True))
    paths = [tmp_path / "a.parquet"]
    io.write_parquet(paths[0], table)
    collected = collect(paths, tmp_path / "claims.parquet", tmp_path / "claims.html")
    lines = summary_lines(collected)
    assert "1 of 2 claims hold" in lines
    assert any(line.startswith("  does not hold: s.bad") for line in lines)
    assert "1 of 2 claims hold" in (tmp_path / "claims.html").read_text()
    assert "bad holds" in render_html(collected)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.claims", str(tmp_path / "claims.parquet")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "1 of 2 claims hold" in proc.stdout


def test_tables_name_the_missing_key(tmp_path):
    with pytest.raises(KeyError, match="no table 'tables/x'"):
        Tables({})["tables/x"]
    assert Context("s", {"figures": {"f": {"kind": "k", "metric": "m"}}}).figures(
        "k", metric="m"
    ) == ["f"]


def test_weight_matching_claim_checks_the_zoos_its_figure_shows(tmp_path):
    rows = []
    for zoo, before, after in (("mlp", 1.0, 0.1), ("cnn", 2.0, 1.0)):
        for aligned, barrier in ((False, before), (True, after)):
            for split in ("train", "test"):
                rows.append(
                    {
                        "metric": "weight_matching",
                        "zoo": zoo,
                        "seed_a": 0,
                        "seed_b": 1,
                        "aligned": aligned,
                        "split": split,
                        "t": 0.5,
                        "loss_barrier": barrier,
                    }
                )
    table = pd.DataFrame(rows)
    shown = {"figures": {"b": {"kind": "weight_matching_barrier", "where": {"zoo": "mlp"}}}}
    out = _study(tmp_path, {"tables/alignment": table}, shown)
    claim = _claim(out, "weight_matching_removes_barrier")
    assert claim.holds and claim.checks == 2 and claim.figure == "b"
    out = _study(tmp_path, {"tables/alignment": table}, {})  # no figure: every zoo
    claim = _claim(out, "weight_matching_removes_barrier")
    assert not claim.holds and claim.checks == 4 and claim.failed == 2


def test_collected_lottery_levels_say_whose_they_are(tmp_path):
    """Each run's lottery table carries its run and seed once collected, so the lottery claim
    is checked per seed."""
    from pipeline.recovery.study import collect_tables

    paths = []
    for seed, gap in ((1, 0.0), (2, 0.03)):
        levels = pd.DataFrame(
            {
                "strategy": "sparse_global",
                "level": [0, 1],
                "sparsity": [0.0, 0.6],
                "test_accuracy": [0.95, 0.95 - gap],
            }
        )
        paths.append(tmp_path / f"{seed}.parquet")
        io.write_parquet(paths[-1], levels)
    labels = [{"run": f"seed~{s}", "seed": s} for s in (1, 2)]
    table = collect_tables(paths, tmp_path / "lottery.parquet", labels)
    assert list(table.run) == ["seed~1"] * 2 + ["seed~2"] * 2
    runs = {f"seed~{s}": {"seed": s} for s in (1, 2)}
    out = _study(tmp_path, {"tables/lottery": table}, {}, runs)
    per_run = out[(out.claim == "lottery_ticket") & (out.scope == "run")].set_index("run")
    assert per_run.holds["seed~1"] and not per_run.holds["seed~2"]
    assert per_run.seed["seed~2"] == 2
    with pytest.raises(ValueError):
        collect_tables(paths, None, labels[:1])
