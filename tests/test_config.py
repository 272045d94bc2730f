"""Config validation names the key and the allowed values; run names are readable and stable."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest

from pipeline import config as cfg
from pipeline import studies
from pipeline.config import ConfigError, expand_runs, resolve_hparams
from pipeline.studies import Plan

BASE = {
    "studies": {
        "s": {
            "kind": "train",
            "dataset": {"name": "digits"},
            "model": {"name": "mlp", "widths": [8]},
            "train": {"lr": 0.1, "epochs": 1},
            "sweep": {"lr": [0.1, 0.01], "wd": [0, 5e-4]},
            "seeds": [1, 2],
            "metrics": ["translation"],
        }
    }
}


def problems(mutate) -> str:
    config = copy.deepcopy(BASE)
    mutate(config["studies"]["s"])
    with pytest.raises(ConfigError) as err:
        studies.validate(config)
    return str(err.value)


def test_valid_config_expands_to_named_runs():
    plan = Plan.from_config(copy.deepcopy(BASE))
    names = [r.name for r in plan.runs["s"]]
    assert names[:2] == ["lr~0.1/wd~0.0/seed~1", "lr~0.1/wd~0.0/seed~2"]
    assert names[-1] == "lr~0.01/wd~0.0005/seed~2"
    assert len(names) == 8
    run = plan.run("s", "lr~0.01/wd~0.0005/seed~2")
    assert run.hparams["train"]["wd"] == 0.0005 and run.hparams["train"]["lr"] == 0.01


def test_typo_key_names_key_and_allowed():
    text = problems(lambda s: s["train"].update(lrr=0.1))
    assert "studies.s.train.lrr: unknown key" in text
    assert "momentum" in text and "wd" in text


def test_wrong_type_and_negative_lr():
    assert "studies.s.train.epochs" in problems(lambda s: s["train"].update(epochs="ten"))
    text = problems(lambda s: s["train"].update(lr=-0.1))
    assert "studies.s.train.lr" in text


def test_unknown_names_list_allowed_values():
    text = problems(lambda s: s["model"].update(name="resnet9000"))
    assert "studies.s.model.name" in text and "mlp" in text and "vgg16" in text
    text = problems(lambda s: s["model"].update(widthz=[3]))
    assert "studies.s.model.widthz: unknown option for model 'mlp'" in text and "widths" in text
    text = problems(lambda s: s.update(metrics=["translashun"]))
    assert "translashun" in text and "rescale" in text
    text = problems(lambda s: s["dataset"].update(name="mnistt"))
    assert "studies.s.dataset.name" in text and "fashion_mnist" in text
    text = problems(lambda s: s["train"].update(optimizer="sgdd"))
    assert "'sgdd' is not allowed; allowed: sgd, adam" in text


def test_sweep_keys_are_checked():
    assert "studies.s.sweep.lrate: unknown sweep key" in problems(
        lambda s: s["sweep"].update(lrate=[1])
    )
    assert "has no option 'depth'" in problems(lambda s: s["sweep"].update({"model.depth": [1]}))


def test_mechanics_needs_step0_and_trace_metrics_need_mechanics():
    def no_step0(s):
        s["train"]["mechanics"] = True
        s["checkpoints"] = {"step0": False}

    assert "checkpoints.step0" in problems(no_step0)
    assert "need train.mechanics: true" in problems(lambda s: s.update(metrics=["gradient_norm"]))


def test_adding_a_defaulted_hyperparameter_renames_and_reruns_nothing(monkeypatch):
    runs = expand_runs("s", BASE["studies"]["s"])
    before = [(r.name, r.nondefault) for r in runs]

    # a new training hyperparameter with a default appears in the code
    @dataclass(frozen=True)
    class Extended(cfg.TrainHparams):
        label_smoothing: float = 0.0

    monkeypatch.setitem(cfg.SECTIONS, "train", Extended)
    assert "label_smoothing" in expand_runs("s", BASE["studies"]["s"])[0].hparams["train"]
    after = [(r.name, r.nondefault) for r in expand_runs("s", BASE["studies"]["s"])]
    assert after == before


def test_nondefault_round_trips_to_full_hparams():
    for run in expand_runs("s", BASE["studies"]["s"]):
        assert resolve_hparams(run.nondefault) == run.hparams
        assert "momentum" not in run.nondefault.get("train", {})


def test_default_and_paper_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in [
        root / "config" / "config.yaml",
        *sorted((root / "config" / "paper").glob("*.yaml")),
    ]:
        Plan.from_config(cfg.load(path))


def test_sweep_over_whole_models_and_datasets():
    study = {
        **copy.deepcopy(BASE["studies"]["s"]),
        "sweep": {
            "dataset.name": ["digits"],
            "model": [
                {"name": "mlp", "widths": [500] * 5, "label": "mlp5x500"},
                {"name": "myrtle", "width": 8},
            ],
            "lr": [0.1],
        },
    }
    study.pop("model")
    studies.validate({"studies": {"s": study}})
    runs = expand_runs("s", study)
    assert [r.name for r in runs[::2]] == [
        "dataset~digits/model~mlp5x500/lr~0.1/seed~1",
        "dataset~digits/model~myrtle/lr~0.1/seed~1",
    ]
    assert runs[0].hparams["model"] == {"name": "mlp", "widths": [500] * 5}
    bad = copy.deepcopy(study)
    bad["sweep"]["model"][1] = {"name": "mlp", "depth": 3}
    with pytest.raises(ConfigError, match=r"sweep.model\[1\].depth: unknown option"):
        studies.validate({"studies": {"s": bad}})


# -- selection on the test split ---------------------------------------------------------------
def _plateau(metric, val_fraction=0.1, **extra):
    def mutate(s):
        s["dataset"]["val_fraction"] = val_fraction
        s["train"].update(schedule="plateau", plateau_metric=metric)
        s.update(extra)

    return mutate


def _modelsym(metric, val_fraction=0.2, **extra):
    zoo = {
        "model": {"name": "myrtle", "width": 2},
        "seeds": [0, 1],
        "train": {"schedule": "plateau", "plateau_metric": metric},
    }
    return {
        "studies": {
            "z": {
                "kind": "modelsym",
                "dataset": {"name": "digits", "val_fraction": val_fraction},
                "zoos": {"bn": zoo},
                **extra,
            }
        }
    }


def test_test_split_selection_is_refused_unless_declared():
    text = problems(_plateau("test_accuracy"))
    assert "studies.s.train.plateau_metric: the learning-rate schedule reads the test split" in text
    assert "studies.s.test_selection" in text
    # swept into the schedule, too
    text = problems(
        lambda s: s["sweep"].update(schedule=["constant", "plateau"], plateau_metric=["test_loss"])
    )
    assert "reads the test split (test_loss)" in text
    # a non-vectorised zoo's schedule
    with pytest.raises(ConfigError, match=r"studies.z.zoos.bn.train.plateau_metric: the"):
        studies.validate(_modelsym("test_accuracy"))
    # declared: valid, and every figure of the study says it is test-selected
    protocol = "Armenta et al.: ReduceLROnPlateau on the CIFAR test accuracy"
    config = copy.deepcopy(BASE)
    _plateau("test_accuracy", 0.0, test_selection=protocol)(config["studies"]["s"])
    config["studies"]["s"]["figures"] = {"f": {"kind": "performance", "caption": "Loss."}}
    plan = Plan.from_config(config)
    assert plan.figures()["f"][1]["caption"] == f"Test-selected (reproduces {protocol}). Loss."
    studies.validate(_modelsym("test_accuracy", test_selection=protocol))


def test_validation_selection_needs_a_validation_split():
    Plan.from_config(_config_with(_plateau("val_accuracy", 0.1)))
    text = problems(_plateau("val_loss", 0.0))
    assert "studies.s.train.plateau_metric: a val_* metric needs a validation split" in text
    with pytest.raises(ConfigError, match="studies.z.dataset.val_fraction: zoo members"):
        studies.validate(_modelsym("val_accuracy", 0.0))


def _config_with(mutate):
    config = copy.deepcopy(BASE)
    mutate(config["studies"]["s"])
    return config


def test_weight_decay_scope_is_a_choice():
    import torch

    from pipeline.config import TrainHparams
    from pipeline.train.optim import make_optimizer

    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    named = dict(model.named_parameters())
    everything = make_optimizer(named, TrainHparams(wd=0.1))
    assert [g["weight_decay"] for g in everything.param_groups] == [0.1]
    weights = make_optimizer(named, TrainHparams(wd=0.1, wd_on="weights"))
    decayed, undecayed = weights.param_groups
    names = {id(p): n for n, p in named.items()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["0.weight", "1.weight", "2.weight"]
    assert sorted(names[id(p)] for p in undecayed["params"]) == ["0.bias", "1.bias", "2.bias"]
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (0.1, 0.0)
    # one SGD step from zero gradients: only the decayed parameters shrink
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weights.step()
    for n, p in named.items():
        factor = 1 - 0.1 * 0.1 if n.endswith("weight") else 1.0
        assert torch.allclose(p.detach(), before[n] * factor, rtol=1e-6), n
    assert "studies.s.train.wd_on" in problems(lambda s: s["train"].update(wd_on="biases"))


@pytest.mark.parametrize(
    "paper,expected",
    [
        ("neural_mechanics", "all"),
        ("teleportation", "all"),
        ("modelsym", "weights"),
        ("modules", "all"),
        ("expand_and_cluster", "all"),
    ],
)
def test_paper_configs_decay_as_their_seed_codebases(paper, expected):
    """Kunin et al., Armenta et al., Csordas et al. and OpenLTH (Expand-and-Cluster) decay every
    parameter (torch's weight_decay on model.parameters()); Godfrey et al.'s modelsym decays the
    parameters whose name contains "weight"."""
    from pathlib import Path

    config = cfg.load(Path(__file__).resolve().parents[1] / "config" / "paper" / f"{paper}.yaml")
    plan = Plan.from_config(config)
    trains = [r.hparams["train"] for runs in plan.runs.values() for r in runs]
    for study in config["studies"].values():
        for zoo in study.get("zoos", {}).values():
            trains.append({**cfg.defaults("train"), **zoo.get("train", {})})
    assert trains and {t["wd_on"] for t in trains} == {expected}
