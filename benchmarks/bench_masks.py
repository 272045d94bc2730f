"""Mask training step: K = 4 mask samples in one batched (vmapped) forward/backward, against
the same step written as a plain loop over the samples, and against a plain unmasked step.

- ``batched``: the K samples' masked weights stacked, one vmapped forward/backward over the
  batch of B items cut into K parts of B/K (sample k sees part k);
- ``loop`` (the baseline; headline ratio ``loop/bat``): the same work as a competent user
  writes it, K passes of one mask sample each over its B/K items, gradients accumulated;
- ``K x full`` (labelled, not a baseline): K passes over all B items each, K times the work of
  the other two (what K samples per step would cost on the whole batch);
- ``plain``: one unmasked training step of the model on the B items (a scale reference).

Each mode does a full step: sample the masks, forward, backward, clip, Adam. All modes are
warmed up, then timed over ``--steps`` steps in turn, ``--repeats`` times interleaved; prints
the median milliseconds per step and the median of the per-round ratios.

    .venv/bin/python benchmarks/bench_masks.py [--threads 1] [--steps 20] [--repeats 5]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call

from pipeline import devices
from pipeline.masks.batched import model_weights, stacked_outputs
from pipeline.masks.layers import masked_layers, masked_params
from pipeline.masks.sampling import init_logits, sample_masked_all
from pipeline.models import build
from pipeline.train.optim import multi_head_ce

K, BATCH = 4, 128
CASES = [  # name, model, input shape, outputs, heads, options
    ("digits MLP 32-32 (default)", "mlp", (1, 8, 8), 10, 1, {"widths": [32, 32]}),
    ("addmul MLP 384-384 (test)", "mlp", (42,), 20, 2, {"widths": [384, 384]}),
    ("addmul MLP 400-400-200", "mlp", (42,), 20, 2, {"widths": [400, 400, 200]}),
    ("addmul MLP 4x800", "mlp", (42,), 20, 2, {"widths": [800] * 4}),
    ("CIFAR CNN (width 0.5)", "modules_cnn", (3, 32, 32), 10, 1, {"width": 0.5}),
]


def _data(shape, outputs, heads, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=gen).to(device)
    classes = outputs // heads
    y = torch.randint(0, classes, (BATCH, heads) if heads > 1 else (BATCH,), generator=gen)
    return x, y.to(device)


def _timed(step, steps, device) -> float:
    devices.sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    devices.sync(device)
    return (time.perf_counter() - start) / steps * 1000


def bench(name, model_name, shape, outputs, heads, options, steps, repeats, device):
    model = build(model_name, shape, outputs, options, seed=0).to(device).eval()
    weights = model_weights(model)
    names = masked_params(masked_layers(model, shape))
    logits = init_logits(weights, names, 2.0)
    opt = torch.optim.Adam(list(logits.values()), lr=1e-2)
    noise = torch.Generator(device=device).manual_seed(0)
    x, y = _data(shape, outputs, heads, device)

    def finish(task):
        reg = sum(l.sum() for l in logits.values()) * (1e-4 / BATCH)
        reg.backward()
        torch.nn.utils.clip_grad_norm_(list(logits.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return task

    def batched():
        stacked = sample_masked_all(weights, logits, K, noise)
        task = multi_head_ce(stacked_outputs(model, weights, stacked, x), y)
        task.backward()
        finish(task)

    def sequential(per):
        for k in range(K):
            sample = sample_masked_all(weights, logits, 1, noise)
            params = {n: sample[n][0] if n in sample else w for n, w in weights.items()}
            block = slice(k * per, (k + 1) * per) if per < BATCH else slice(None)
            out = functional_call(model, params, (x[block],))
            (multi_head_ce(out, y[block]) / K).backward()
        finish(None)

    plain_model = build(model_name, shape, outputs, options, seed=0).to(device).train()
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)

    def plain():
        loss = multi_head_ce(plain_model(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        plain_opt.step()

    modes = {
        "plain": plain,
        "batched": batched,
        "loop": lambda: sequential(BATCH // K),
        "full": lambda: sequential(BATCH),
    }
    for step in modes.values():  # warm-up
        for _ in range(3):
            step()
    times = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, step in modes.items():
            times[mode].append(_timed(step, steps, device))

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    t = {mode: statistics.median(v) for mode, v in times.items()}
    masked = sum(weights[n].numel() for n in names)
    print(
        f"{name:28s} {masked:>10,d} {t['plain']:8.2f} {t['batched']:8.2f} {t['loop']:8.2f} "
        f"{t['full']:9.2f} {ratio('loop', 'batched'):8.2f}x {ratio('full', 'batched'):9.2f}x "
        f"{ratio('batched', 'plain'):9.2f}x",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = devices.resolve(args.device)
    print(
        f"K = {K} mask samples, batch {BATCH} (B/K = {BATCH // K} per sample), {args.threads} "
        f"thread(s), {device}; ms per step (sample, forward, backward, clip, Adam), medians of "
        f"{args.repeats} interleaved rounds of {args.steps} steps; loop/bat is the headline "
        "(same work); K x full does K times the work"
    )
    print(
        f"{'model':28s} {'masked w':>10s} {'plain':>8s} {'batched':>8s} {'loop':>8s} "
        f"{'K x full':>9s} {'loop/bat':>9s} {'Kfull/bat':>10s} {'bat/plain':>10s}"
    )
    for case in CASES:
        bench(*case, args.steps, args.repeats, device)


if __name__ == "__main__":
    main()
