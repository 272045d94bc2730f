"""Property: :class:`pipeline.train.optim.SGD` and :class:`~pipeline.train.optim.Adam` (torch's
optimizers without the ``torch._dynamo`` import) update parameters and state bit-identically to
``torch.optim.SGD`` and ``torch.optim.Adam`` on the CPU, and their ``state_dict`` is torch's.

Each case draws the hyperparameters (every SGD variant: momentum, dampening, Nesterov, weight
decay, maximize; Adam's betas, eps, coupled or decoupled weight decay, amsgrad, maximize), the
parameter shapes and dtype, one or two parameter groups (the second with its own weight decay and
learning rate, as ``wd_on: weights`` builds), the steps, parameters left without a gradient at
some steps (torch skips them and creates their state late), and a learning-rate change between
steps (as the schedules do). Half-way, ours is saved and reloaded into a fresh optimizer (the
resume path); torch's runs through.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples, sgd_hparams

from pipeline.train.optim import SGD, Adam


@st.composite
def adam_hparams(draw):
    return {
        "lr": draw(st.floats(1e-4, 0.1)),
        "betas": (draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
        "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        "weight_decay": draw(st.just(0.0) | st.floats(1e-4, 0.1)),
        "amsgrad": draw(st.booleans()),
        "decoupled_weight_decay": draw(st.booleans()),
    }


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["sgd", "adam"]))
    hp = draw(sgd_hparams()) if kind == "sgd" else draw(adam_hparams())
    hp["maximize"] = draw(st.booleans())
    shapes = draw(
        st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=4)
    )
    return {
        "kind": kind,
        "hparams": hp,
        "shapes": [tuple(s) for s in shapes],
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "split": draw(st.integers(0, len(shapes))),  # params[split:] form a second group
        "group_lr": draw(st.floats(1e-3, 0.1)),
        "steps": draw(st.integers(1, 6)),
        "new_lr": draw(st.floats(1e-3, 0.1)),
        "seed": draw(st.integers(0, 2**16)),
        "dropped": draw(st.sets(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=4)),
    }


def _optimizer(cls, params, case):
    split = case["split"]
    groups = [{"params": params[:split]}] if split else []
    if split < len(params):
        groups.append({"params": params[split:], "weight_decay": 0.0, "lr": case["group_lr"]})
    return cls(groups, **case["hparams"])


def _same(a, b, where="") -> None:
    """``a`` and ``b`` equal, tensors bit for bit (dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@settings(max_examples=examples(60, 600))
@given(cases())
def test_the_optimizers_are_torchs_bit_for_bit(case):
    gen = torch.Generator().manual_seed(case["seed"])
    init = [torch.randn(s, generator=gen, dtype=case["dtype"]) for s in case["shapes"]]
    grads = [
        [torch.randn(s, generator=gen, dtype=case["dtype"]) for s in case["shapes"]]
        for _ in range(case["steps"])
    ]
    ours_cls, torch_cls = (
        (SGD, torch.optim.SGD) if case["kind"] == "sgd" else (Adam, torch.optim.Adam)
    )
    assert issubclass(ours_cls, torch_cls)
    ours_p = [p.clone().requires_grad_() for p in init]
    ref_p = [p.clone().requires_grad_() for p in init]
    ours, ref = _optimizer(ours_cls, ours_p, case), _optimizer(torch_cls, ref_p, case)
    for step, step_grads in enumerate(grads):
        if step == case["steps"] // 2:  # resume: a fresh optimizer from ours' state_dict
            state = ours.state_dict()
            _same(state, ref.state_dict(), "state_dict before resume")
            ours = _optimizer(ours_cls, ours_p, case)
            ours.load_state_dict(state)
        if step == 1:
            for opt in (ours, ref):
                for group in opt.param_groups:
                    group["lr"] = case["new_lr"]
        for opt, params in ((ours, ours_p), (ref, ref_p)):
            opt.zero_grad(set_to_none=True)
            for i, (p, g) in enumerate(zip(params, step_grads, strict=True)):
                if (step, i) not in case["dropped"]:
                    p.grad = g.clone()
            opt.step()
        for i, (a, b) in enumerate(zip(ours_p, ref_p, strict=True)):
            _same(a.detach(), b.detach(), f"step {step}, parameter {i}")
        _same(ours.state_dict(), ref.state_dict(), f"step {step}, state_dict")


def test_torchs_own_step_where_the_plain_step_does_not_apply():
    """Tensor hyperparameters and torch's foreach kernels go through torch's step, still equal to
    torch's (and still an SGD for the teleport code's ``isinstance``)."""
    torch.manual_seed(0)
    for ours_cls, torch_cls, hp in (
        (SGD, torch.optim.SGD, {"lr": torch.tensor(0.05), "momentum": 0.9, "foreach": True}),
        (Adam, torch.optim.Adam, {"lr": torch.tensor(0.01), "foreach": False}),
    ):
        init = [torch.randn(3, 2), torch.randn(2)]
        ours_p = [p.clone().requires_grad_() for p in init]
        ref_p = [p.clone().requires_grad_() for p in init]
        ours, ref = ours_cls(ours_p, **hp), torch_cls(ref_p, **hp)
        for _ in range(3):
            grads = [torch.randn_like(p) for p in init]
            for opt, params in ((ours, ours_p), (ref, ref_p)):
                opt.zero_grad()
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()
                opt.step()
        for a, b in zip(ours_p, ref_p, strict=True):
            assert torch.equal(a, b)
        _same(ours.state_dict(), ref.state_dict())
