"""Teleportation on every registered model: the function is unchanged (fp64 1e-10 for each of the
five samplers and both residual groups; fp32 1e-5 and after ten chained inter-landscape teleports
with cob_range 10), gradients transform as grad / D, CoBs compose and undo, recovery finds a
planted CoB, and the stock graph is kept where the CoB changes no operation. On residual
networks the group is the original's (skip edge and branch their own factors at every Add) or
its tied subgroup (one factor per stream channel)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models import build, neuron_structure, register_model
from pipeline.models.structure import NeuronStructure
from pipeline.symmetry.actions import random_element
from pipeline.teleport.cob import (
    SAMPLINGS,
    ChangeOfBasis,
    identity,
    parameter_scales,
    recover,
    sample,
)
from pipeline.teleport.network import (
    SITES,
    changes_operations,
    current_cob,
    materialise,
    teleport_,
    teleported_parameters,
)

ACTS = ("relu", "tanh", "sigmoid", "elu", "leaky_relu")
# model -> (input shape, small options, activations to test)
MODELS = {
    "logistic": ((1, 6, 6), {}, ()),
    "mlp": ((1, 6, 6), {"widths": [10, 8], "batch_norm": True}, ACTS),
    "conv": ((1, 8, 8), {"channels": 4, "pool": True, "batch_norm": True}, ACTS),
    "vgg11": ((3, 32, 32), {"width": 0.0625, "dropout": 0.0}, ("relu", "tanh")),
    "vgg13": ((3, 32, 32), {"width": 0.0625, "dropout": 0.0, "batch_norm": True}, ("relu",)),
    "vgg16": ((3, 32, 32), {"width": 0.0625, "dropout": 0.0, "batch_norm": True}, ACTS),
    "vgg19": ((3, 32, 32), {"width": 0.0625, "dropout": 0.0}, ("elu",)),
    "resnet20": ((3, 8, 8), {}, ACTS),
    "resnet56": ((3, 4, 4), {"batch_norm": False}, ("relu", "tanh")),
    "resnet110": ((3, 8, 8), {}, ("leaky_relu",)),
    "myrtle": ((3, 8, 8), {"width": 2}, ACTS),
    "resnet18": ((3, 16, 16), {"stem": "cifar_maxpool"}, ()),
    "resnet34": ((3, 8, 8), {"stem": "cifar"}, ()),
    "resnet50": ((3, 8, 8), {"stem": "cifar"}, ()),
    "densenet121": (
        (3, 16, 16),
        {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 6, "bn_size": 2},
        ACTS,
    ),
    "vgg16_torchvision": ((3, 32, 32), {"width": 0.0625, "hidden": 16, "dropout": 0.0}, ACTS),
    "modules_cnn": ((3, 8, 8), {"width": 0.125}, ()),
}


#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _structure_cases() -> dict:
    """test_structure's CASES (which must cover every registered model): a model registered
    later is teleport-tested on its first case there."""
    try:
        from test_structure import CASES
    except ImportError:
        return {}
    return CASES


def _cases():
    for name, (shape, opts, acts) in MODELS.items():
        for act in acts or (None,):
            options = dict(opts, activation=act) if act else dict(opts)
            yield name, shape, options, f"{name}-{act or 'default'}"
    for name, cases in _structure_cases().items():
        if name not in MODELS:
            shape, opts = cases[0]
            yield name, shape, opts, f"{name}-structure-case"


def _sampled_cases():
    """Every case, each with one of the five samplers in turn (each sampler meets many
    architectures; :func:`test_every_sampler_and_residual_group` runs all on a few)."""
    for k, (name, shape, opts, case) in enumerate(_cases()):
        sampling = SAMPLINGS[k % len(SAMPLINGS)]
        yield pytest.param(name, shape, opts, sampling, id=f"{case}-{sampling}")


def _model(name, shape, opts, dtype=torch.float64, seed=3):
    model = build(name, shape, 5, opts, seed=seed, dtype=dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@torch.no_grad()
def _train_forward(model, x):
    """Train-mode output of a copy (BN statistics of the original untouched), fixed dropout."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return copy.deepcopy(model).train()(x)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_every_registered_model_is_covered():
    names = set(register_model.names())
    covered = set(MODELS) | set(_structure_cases())
    assert names <= covered, names - covered


@pytest.mark.parametrize("name,shape,opts,sampling", list(_sampled_cases()))
def test_teleport_leaves_the_function_unchanged(name, shape, opts, sampling):
    model = _model(name, shape, opts)
    structure = neuron_structure(model, shape)
    x = torch.randn(8, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    one = sample(structure, "inter_landscape", 0.9, gen)
    chain = [sample(structure, "inter_landscape", 10.0, gen) for _ in range(10)]
    with torch.no_grad():
        reference = model(x)
        reference_train = _train_forward(model, x)
    # this case's sampler, in both residual groups where the model has residual streams (fp64)
    residual = ("per_branch", "tied") if any(len(g.branches) > 1 for g in structure.groups) else ()
    for group in residual or ("per_branch",):
        cob = sample(structure, sampling, 0.9, gen, center=2.0, residual=group)
        net = materialise(copy.deepcopy(model), shape)
        teleport_(net, cob)
        with torch.no_grad():
            assert _rel(net(x), reference) < 1e-10, (sampling, group)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        base = copy.deepcopy(model).to(dtype)
        net = materialise(base, shape)
        teleport_(net, one)
        with torch.no_grad():
            out = net(x.to(dtype))
        assert _rel(out.double(), reference) < tol, f"{dtype}: one teleport"
        if dtype == torch.float64:  # batch statistics (BN) and dropout masks too
            assert _rel(_train_forward(net, x), reference_train) < tol, "train mode"
        for cob in chain:
            teleport_(net, cob)
        with torch.no_grad():
            out = net(x.to(dtype))
        assert _rel(out.double(), reference) < tol, f"{dtype}: ten chained teleports"
    if structure.groups:
        original = dict(model.named_parameters())
        moved = max(_rel(p.double(), original[k]) for k, p in net.named_parameters())
        assert moved > 1e-2, "the teleport should move the parameters"
        # the modified operations matter: the stock graph with teleported weights is another
        # function (inter-landscape factors are negative for about half the neurons)
        assert changes_operations(structure, one)
        stock = copy.deepcopy(model)
        stock.load_state_dict(teleported_parameters(structure, original, one), strict=False)
        with torch.no_grad():
            assert _rel(stock(x), reference) > 1e-3


@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("mlp", (1, 6, 6), {"widths": [10, 8], "batch_norm": True, "activation": "tanh"}),
        ("resnet20_option_a", (3, 8, 8), {"activation": "elu"}),
        ("densenet121", (3, 8, 8), MODELS["densenet121"][1] | {"stem": "cifar"}),
    ],
)
def test_every_sampler_and_residual_group(name, shape, opts):
    """All five samplers, each in the paper's per-branch group and the tied one, one after
    the other on one materialised network (composed), in train and eval mode, fp64."""
    model = _model(name, shape, opts)
    structure = neuron_structure(model, shape)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
    reference_train = _train_forward(model, x)
    net = materialise(copy.deepcopy(model), shape)
    gen = torch.Generator().manual_seed(9)
    for sampling in SAMPLINGS:
        for residual in ("per_branch", "tied"):
            teleport_(net, sample(structure, sampling, 0.9, gen, center=2.0, residual=residual))
            with torch.no_grad():
                assert _rel(net(x), reference) < 1e-10, (sampling, residual)
            assert _rel(_train_forward(net, x), reference_train) < 1e-10, (sampling, residual)


@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("mlp", (1, 6, 6), {"widths": [10, 8], "batch_norm": True, "activation": "tanh"}),
        ("resnet20", (3, 8, 8), {"activation": "elu"}),
        ("densenet121", (3, 8, 8), MODELS["densenet121"][1] | {"stem": "cifar"}),
    ],
)
def test_gradients_transform_contravariantly(name, shape, opts):
    model = _model(name, shape, opts).train()
    structure = neuron_structure(model, shape)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    cob = sample(structure, "inter_landscape", 0.9, gen)
    net = materialise(copy.deepcopy(model), shape)
    teleport_(net, cob)
    for m in (model, net):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    scales = parameter_scales(structure, cob, dict(model.named_parameters()))
    teleported = dict(net.named_parameters())
    names = [k for k, _ in model.named_parameters()]
    expected = torch.cat(
        [
            (p.grad / scales[k] if k in scales else p.grad).flatten()
            for k, p in model.named_parameters()
        ]
    )
    found = torch.cat([teleported[k].grad.flatten() for k in names])
    assert _rel(found, expected) < 1e-10
    # |tau| < 1 amplifies gradients: the teleported gradient norm differs
    g0 = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    g1 = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert abs(g1 / g0 - 1) > 1e-2


def test_compose_undo_and_stock_graph():
    shape, opts = (3, 32, 32), {"width": 0.0625, "dropout": 0.0}
    model = _model("vgg16", shape, opts)
    structure = neuron_structure(model, shape)
    gen = torch.Generator().manual_seed(4)
    a = sample(structure, "inter_landscape", 0.9, gen)
    b = sample(structure, "centered", 0.5, gen, center=2.0)
    one, two = (materialise(copy.deepcopy(model), shape) for _ in range(2))
    teleport_(one, a)
    teleport_(one, b)
    teleport_(two, a.compose(b))
    named = dict(two.named_parameters())
    assert max(_rel(p, named[k]) for k, p in one.named_parameters()) < 1e-12
    teleport_(one, current_cob(one).inverse())
    named = dict(model.named_parameters())
    assert max(_rel(p, named[k]) for k, p in one.named_parameters()) < 1e-12
    assert not list(getattr(one, SITES).children()), "undone: no modified operation is left"
    # positive factors on ReLU without BatchNorm change no operation: the stock graph runs,
    # and the unmaterialised model can be teleported in place
    positive = sample(structure, "intra_landscape", 0.9, gen)
    assert not changes_operations(structure, positive)
    teleport_(two, two._teleport.cob.inverse())
    teleport_(two, positive)
    assert not list(getattr(two, SITES).children())
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        in_place = copy.deepcopy(model)
        teleport_(in_place, positive)
        assert _rel(in_place(x), before) < 1e-10
    with pytest.raises(ValueError, match="materialise"):
        teleport_(copy.deepcopy(model), a)


@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("mlp", (1, 6, 6), {"widths": [10, 8], "batch_norm": True}),
        ("resnet20", (3, 8, 8), {"bn_eps": 1e-5}),
        ("densenet121", (3, 16, 16), MODELS["densenet121"][1]),
        ("vgg16_torchvision", (3, 32, 32), MODELS["vgg16_torchvision"][1]),
    ],
)
def test_recover_planted_cob(name, shape, opts):
    model = _model(name, shape, opts)
    structure = neuron_structure(model, shape)
    cob = sample(structure, "inter_landscape", 0.9, torch.Generator().manual_seed(5))
    before = dict(model.named_parameters())
    after = teleported_parameters(structure, before, cob)
    found = recover(structure, before, after)
    for k in cob.tau:
        assert (found.tau[k] - cob.tau[k]).abs().max() < 1e-10, k
    for k in cob.norm_in:
        assert (found.norm_in[k] - cob.norm_in[k]).abs().max() < 1e-10, k
    again = teleported_parameters(structure, before, found)
    assert max(_rel(again[k], after[k]) for k in after) < 1e-10
    same = recover(structure, before, before)
    assert all((t - 1).abs().max() < 1e-12 for t in [*same.tau.values(), *same.norm_in.values()])


def test_sampling_ranges_and_errors():
    structure = neuron_structure(build("mlp", (1, 6, 6), 5, {"widths": [400]}), (1, 6, 6))
    gen = torch.Generator().manual_seed(6)

    def tau(sampling, r, **kw):
        return sample(structure, sampling, r, gen, **kw).tau["fc1"]

    t = tau("intra_landscape", 0.3)
    assert t.min() >= 0.7 and t.max() <= 1.3 and t.std() > 0.1
    t = tau("inter_landscape", 0.3)
    assert ((t.abs() >= 0.7) & (t.abs() <= 1.3)).all()
    assert 0.35 < (t < 0).double().mean() < 0.65
    t = tau("centered", 0.5, center=2.0)
    assert t.min() >= 1.5 and t.max() <= 2.5
    assert (tau("positive", 0.2) > 0).all() and tau("positive", 0.2).max() <= 0.2
    assert (tau("negative", 0.2) < 0).all()
    one = sample(structure, "inter_landscape", 0.9, torch.Generator().manual_seed(7))
    two = sample(structure, "inter_landscape", 0.9, torch.Generator().manual_seed(7))
    assert torch.equal(one.tau["fc1"], two.tau["fc1"])
    with pytest.raises(ValueError, match="intra_landscape needs cob_range <= 1"):
        sample(structure, "intra_landscape", 1.5, gen)
    with pytest.raises(ValueError, match="centered needs"):
        sample(structure, "centered", 1.5, gen, center=1.0)
    with pytest.raises(ValueError, match="sampling: 'within' not allowed"):
        sample(structure, "within", 0.5, gen)
    assert ChangeOfBasis.from_dict(one.to_dict()).tau["fc1"].equal(one.tau["fc1"])
    assert identity(structure).tau["fc1"].eq(1).all()


def test_densenet_structure_ties_consumer_norms():
    shape, opts = (3, 16, 16), MODELS["densenet121"][1]
    s = neuron_structure(build("densenet121", shape, 5, opts), shape)
    tied = [g for g in s.groups if g.tied_to]
    # block 1 layer 2 reads the stem (6 channels) and layer 1's growth (4 channels)
    names = {g.name: g for g in tied}
    seg = names["features.denseblock1.denselayer2.norm1[6:10]"]
    assert seg.tied_to == "features.denseblock1.denselayer1.conv2" and seg.size == 4
    assert seg.branches[0].linear[0].start == 6 and seg.activation == "relu"
    conv2 = s.group("features.denseblock1.denselayer1.conv2")
    # read by norm1 of layer 2 (block 1, 2 layers), and the transition's norm
    assert {sl.param for sl in conv2.normalised_by} == {
        "features.denseblock1.denselayer2.norm1.running_mean",
        "features.denseblock1.denselayer2.norm1.running_var",
        "features.transition1.norm.running_mean",
        "features.transition1.norm.running_var",
    }
    assert conv2.homogeneous and not conv2.odd
    assert NeuronStructure.from_json(s.to_json()) == s
    # a random group element (permutations tied through the consumer BatchNorms, rescaling
    # with their statistics, BN scaling) keeps the function, in train and eval mode
    model = _model("densenet121", shape, {**opts, "bn_eps": 1e-20})
    x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    element = random_element(s, torch.Generator().manual_seed(1))
    assert torch.equal(element.perms[seg.name], element.perms[seg.tied_to])
    state = element.apply(dict(model.state_dict()), s)
    assert (
        max(_rel(state[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
        > 1e-3
    )
    for mode in (False, True):
        moved = copy.deepcopy(model).train(mode)
        moved.load_state_dict(state)
        with torch.no_grad():
            assert _rel(moved(x), copy.deepcopy(model).train(mode)(x)) < 1e-10
    # JSON written before these fields existed still loads
    import json

    raw = json.loads(s.to_json())
    for g in raw["groups"]:
        for key in ("normalised_by", "tied_to", "sites"):
            del g[key]
    old = NeuronStructure.from_json(json.dumps(raw))
    assert old.groups[0].sites == () and old.groups[0].tied_to is None


def test_option_a_resnet_teleports_through_its_zero_padded_shortcuts():
    """The stage-1 stream's factors follow it into channels 8..23 of stage 2 (the padded
    channels have their own), a BatchNorm shared by three groups gets one factor per channel,
    the function is unchanged in train and eval mode, and recovery finds the planted CoB (the
    tied group: one factor per stream channel; the per-branch group has its own test)."""
    shape = (3, 8, 8)
    model = _model("resnet20_option_a", shape, {"bn_eps": 1e-5, "activation": "elu"})
    structure = neuron_structure(model, shape)
    gen = torch.Generator().manual_seed(5)
    cob = sample(structure, "inter_landscape", 0.9, gen, residual="tied")
    assert cob.norm_in["layer2.0.bn2"].shape == (32,)
    net = materialise(copy.deepcopy(model), shape)
    teleport_(net, cob)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(net(x), model(x)) < 1e-10
    assert _rel(_train_forward(net, x), _train_forward(model, x)) < 1e-10
    # naive reference: BN affine rows times the factor of the group owning each channel
    tau = torch.cat(
        [
            cob.tau["layer2.residual[0:8]"],
            cob.tau["layer1.residual"],
            cob.tau["layer2.residual[24:32]"],
        ]
    )
    for k in ("layer2.1.bn2.weight", "layer2.1.bn2.bias"):
        expected = model.get_parameter(k) * tau
        assert _rel(net.get_parameter(k), expected) < 1e-12, k
    before = dict(model.named_parameters())
    found = recover(structure, before, teleported_parameters(structure, before, cob))
    for k in cob.tau:
        assert (found.tau[k] - cob.tau[k]).abs().max() < 1e-10, k
    for k in cob.norm_in:
        assert (found.norm_in[k] - cob.norm_in[k]).abs().max() < 1e-10, k


@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("resnet20", (3, 8, 8), {}),
        ("resnet20_option_a", (3, 8, 8), {"batch_norm": False}),
    ],
)
def test_residual_teleport_gives_skip_edge_and_branch_their_own_factors(name, shape, opts):
    """The original's group (Armenta et al.): every branch summed into a residual stream has its
    own factors, the stream between Adds holds the first summand's basis, and each Add scales
    its second summand by tau_first / tau_second. Positive factors on a ReLU ResNet then modify
    the Adds (the tied subgroup modifies nothing); the function is unchanged in train and eval
    mode; weights reading the stream divide by the factors of the branch they read; a planted
    per-branch CoB is recovered, and the tied group cannot reach it."""
    model = _model(name, shape, opts)
    structure = neuron_structure(model, shape)
    streams = [g for g in structure.groups if len(g.branches) > 1]
    assert streams and all(g.joins for g in streams)
    for g in streams:
        assert all(j.first != j.second for j in g.joins)
        assert {j.first for j in g.joins} | {j.second for j in g.joins} == set(
            range(len(g.branches))
        ), g.name
    gen = torch.Generator().manual_seed(8)
    # positive factors, BatchNorm inputs left alone: only the Adds can change
    weight_space = {"norm_inputs": False}
    assert changes_operations(
        structure, sample(structure, "intra_landscape", 0.5, gen, **weight_space)
    )
    tied = sample(structure, "intra_landscape", 0.5, gen, residual="tied", **weight_space)
    assert not changes_operations(structure, tied)
    cob = sample(structure, "intra_landscape", 0.5, gen)
    assert all(cob.tau[g.name].shape == (len(g.branches), g.size) for g in streams)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net = materialise(copy.deepcopy(model), shape)
    teleport_(net, cob)
    with torch.no_grad():
        assert _rel(net(x), model(x)) < 1e-10
    assert _rel(_train_forward(net, x), _train_forward(model, x)) < 1e-10
    # the stock graph with these weights is another function: the Adds matter
    before = dict(model.named_parameters())
    after = teleported_parameters(structure, before, cob)
    stock = copy.deepcopy(model)
    stock.load_state_dict(after, strict=False)
    with torch.no_grad():
        assert _rel(stock(x), model(x)) > 1e-3
    # naive reference: the columns an outgoing slice owns are divided by the factors of the
    # branch it reads (times them, the ratio after / before is one row factor per output), and
    # each branch's incoming biases and BatchNorm affine rows are multiplied by its factors
    for g in streams:
        for sl in g.outgoing:
            t = cob.tau[g.name][sl.branch].repeat_interleave(sl.block)
            ratio = (after[sl.param] / before[sl.param]).movedim(sl.axis, 0)
            cols = ratio[sl.start : sl.start + len(t)]
            undone = cols * t.reshape(-1, *([1] * (cols.ndim - 1)))
            assert _rel(undone, undone[:1].expand_as(undone)) < 1e-12, sl
        for b, branch in enumerate(g.branches):
            for sl in (sl for sl in branch.incoming if before[sl.param].ndim == 1):
                ratio = (after[sl.param] / before[sl.param]).movedim(sl.axis, 0)
                rows = ratio[sl.start : sl.start + g.size].reshape(g.size, -1)
                expected = cob.tau[g.name][b][:, None].expand_as(rows)
                assert _rel(rows, expected) < 1e-12, sl
    found = recover(structure, before, after)
    for k in cob.tau:
        assert (found.tau[k] - cob.tau[k]).abs().max() < 1e-10, k
    tied = recover(structure, before, after, residual="tied")
    again = teleported_parameters(structure, before, tied)
    assert max(_rel(again[k], after[k]) for k in after) > 1e-3
