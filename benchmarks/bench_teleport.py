"""Teleportation costs, printed side by side as ratios.

1. Teleporting a ResNet-18 (CIFAR stem with max-pool, 32x32, fp32) against one forward+backward
   pass of a batch of 256 (target: every teleport path below 1.0):
   - the training path: draw a CoB and update the D^-2 preconditioner;
   - in place on a stock model (positive CoB, a weight-space symmetry): parameters x D;
   - in place on a materialised model (inter-landscape CoB): parameters and momentum x D, fx
     graph rebuilt with the modified ReLUs / max-pool / BatchNorms.
2. Training speed of a teleported run against a plain one (target: ratio within 1.05):
   - ``train_run`` end to end on the default fig6-sized run (digits, MLP, SGD with momentum), with
     the TeleportCallback (inter-landscape 0.9) vs without;
   - SGD steps of ResNet-18 at batch 32: plain vs preconditioned (the callback's path), and a
     materialised network teleported with a positive CoB (stock graph) vs plain; for reference
     a materialised network whose ReLUs are modified (inter-landscape), which pays per forward.

Timings interleave the variants and report medians (the machine is shared).
Run: ``.venv/bin/python benchmarks/bench_teleport.py``.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import config as cfg
from pipeline.models import build, neuron_structure
from pipeline.teleport.cob import sample
from pipeline.teleport.network import materialise, teleport_
from pipeline.teleport.training import Preconditioner, TeleportCallback
from pipeline.train.loop import train_run

SHAPE = (3, 32, 32)


def timed(fn, repeat, clock=time.perf_counter):
    out = []
    for _ in range(repeat):
        start = clock()
        fn()
        out.append(clock() - start)
    return out


def resnet():
    return build("resnet18", SHAPE, 10, {"stem": "cifar_maxpool"}, seed=0)


def teleport_cost() -> None:
    model = resnet().train()
    structure = neuron_structure(model, SHAPE)
    x, y = torch.randn(256, *SHAPE), torch.randint(0, 10, (256,))

    def forward_backward():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    forward_backward()
    gen = torch.Generator().manual_seed(0)
    pre = Preconditioner(model, structure)

    def precondition():
        pre.teleport(sample(structure, "inter_landscape", 0.9, gen))

    stock = copy.deepcopy(model)

    def stock_in_place():
        teleport_(stock, sample(structure, "intra_landscape", 0.9, gen, norm_inputs=False))

    net = materialise(copy.deepcopy(model), SHAPE)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.zero_grad()
    F.cross_entropy(net(x[:8]), y[:8]).backward()
    opt.step()  # momentum buffers exist

    def materialised_in_place():
        teleport_(net, sample(structure, "inter_landscape", 0.9, gen), opt)

    fb = statistics.median(timed(forward_backward, 3))
    print(
        f"ResNet-18 forward+backward, batch 256 at 32x32: {fb:.3f} s "
        f"({torch.get_num_threads()} threads)"
    )
    for name, fn in (
        ("preconditioner (training path)", precondition),
        ("in place, stock model, positive CoB", stock_in_place),
        ("in place, materialised, inter-landscape", materialised_in_place),
    ):
        t = statistics.median(timed(fn, 5))
        print(f"  teleport {name:42s} {t:.3f} s   ratio to fwd+bwd {t / fb:.3f}")


def train_run_speed(repeat: int = 5) -> None:
    study = {
        "kind": "train",
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "widths": [100, 100]},
        "train": {
            "lr": 0.01,
            "momentum": 0.9,
            "wd": 0.01,
            "batch_size": 32,
            "epochs": 10,
            "on_nan": "record",
        },
        "checkpoints": {"step0": False, "epoch_end": False},
    }
    hp = cfg.expand_runs("bench", study)[0].hparams
    speeds: dict[str, list] = {"plain": [], "teleported": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            for mode, key in (("none", "plain"), ("teleport", "teleported")):
                cb = TeleportCallback(mode, "inter_landscape", 0.9)
                summary = train_run(Path(tmp) / f"{key}{i}", hp, progress=False, callbacks=(cb,))
                speeds[key].append(summary["steps_per_second"])
    plain, tele = (statistics.median(speeds[k]) for k in ("plain", "teleported"))
    print(
        f"train_run, digits MLP 100-100, SGD momentum, 10 epochs: plain {plain:.0f} steps/s, "
        f"teleported {tele:.0f} steps/s, time ratio teleported/plain {plain / tele:.3f}"
    )


def step_speed(steps: int = 2, repeat: int = 12, batch: int = 32) -> None:
    """One thread and process CPU time (less sensitive to other jobs on a shared machine);
    the variants alternate every ``steps`` steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = torch.randn(batch, *SHAPE), torch.randint(0, 10, (batch,))
    plain = resnet().train()
    structure = neuron_structure(plain, SHAPE)
    gen = torch.Generator().manual_seed(1)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.01)

    pre_model = copy.deepcopy(plain)
    pre_opt = sgd(pre_model)
    pre = Preconditioner(pre_model, structure)
    pre.teleport(sample(structure, "inter_landscape", 0.9, gen))
    pre.attach(pre_opt)
    positive = materialise(copy.deepcopy(plain), SHAPE)
    teleport_(positive, sample(structure, "intra_landscape", 0.9, gen, norm_inputs=False))
    modified = materialise(copy.deepcopy(plain), SHAPE)
    teleport_(modified, sample(structure, "inter_landscape", 0.9, gen))
    variants = {
        "plain": (plain, sgd(plain)),
        "preconditioned": (pre_model, pre_opt),
        "materialised, positive CoB": (positive, sgd(positive)),
        "materialised, modified ReLUs": (modified, sgd(modified)),
    }

    def run(model, opt):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    times: dict[str, list] = {k: [] for k in variants}
    for v in variants.values():
        run(*v)  # warm up
    for _ in range(repeat):
        for name, v in variants.items():
            times[name] += timed(lambda v=v: run(*v), 1, time.process_time)
    torch.set_num_threads(threads)
    base = statistics.median(times["plain"]) / steps
    print(
        f"ResNet-18 SGD step, batch {batch} at 32x32, 1 thread: plain {base:.3f} s/step "
        "(process CPU time)"
    )
    for name in list(variants)[1:]:
        t = statistics.median(times[name]) / steps
        print(f"  {name:32s} {t:.3f} s/step   ratio to plain {t / base:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teleport_cost()
    train_run_speed()
    step_speed()
