"""Every registered model's function is unchanged by a random element of the symmetry group its
neuron structure declares: permutations everywhere (residual streams as one tied group), positive
scaling of homogeneous neurons and of BatchNorm-normalised branches, sign flips of odd ones."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import build, neuron_structure, register_model
from pipeline.models.structure import NeuronStructure, StructureError
from pipeline.symmetry.actions import random_element

# model name -> list of (input shape, options); every registered model must appear here.
CASES = {
    "logistic": [((1, 8, 8), {})],
    "mlp": [
        ((1, 8, 8), {"widths": [12, 10], "batch_norm": True}),
        ((1, 8, 8), {"widths": [12, 10], "activation": "tanh"}),
        ((1, 8, 8), {"widths": [12], "activation": "leaky_relu"}),
        ((1, 8, 8), {"widths": [12], "activation": "identity"}),
        ((1, 8, 8), {"widths": [12, 10], "activation": "sigmoid"}),
        ((1, 8, 8), {"widths": [12], "activation": "softplus", "batch_norm": True}),
        ((1, 8, 8), {"widths": [12], "activation": "gelu"}),
    ],
    "conv": [
        ((1, 8, 8), {"channels": 6, "pool": True}),
        ((1, 8, 8), {"channels": 6, "activation": "tanh", "batch_norm": True}),
    ],
    "vgg11": [((3, 32, 32), {"batch_norm": True, "width": 0.125, "dropout": 0.0})],
    "vgg13": [((3, 32, 32), {"width": 0.125, "dropout": 0.0})],
    "vgg16": [
        ((3, 32, 32), {"batch_norm": True, "width": 0.125, "dropout": 0.0}),
        ((3, 32, 32), {"width": 0.125, "dropout": 0.0, "activation": "tanh"}),
    ],
    "vgg19": [((3, 32, 32), {"width": 0.125, "dropout": 0.0})],
    "resnet20": [((3, 16, 16), {}), ((3, 16, 16), {"batch_norm": False, "activation": "tanh"})],
    "resnet20_option_a": [
        ((3, 16, 16), {}),
        ((3, 16, 16), {"batch_norm": False, "activation": "tanh"}),
    ],
    "resnet56": [((3, 8, 8), {})],
    "resnet110": [((3, 8, 8), {"width": 1})],
    "myrtle": [((3, 16, 16), {"width": 4}), ((1, 8, 8), {"width": 4, "batch_norm": False})],
    "resnet18": [((3, 32, 32), {"stem": "cifar"}), ((3, 32, 32), {"stem": "cifar_maxpool"})],
    "resnet34": [((3, 32, 32), {"stem": "cifar"})],
    "resnet50": [((3, 32, 32), {})],
    "modules_cnn": [
        ((3, 32, 32), {"width": 0.25, "dropout": False}),
        ((1, 8, 8), {"width": 0.25, "dropout": False}),
    ],
    "densenet121": [
        (
            (3, 16, 16),
            {"growth_rate": 4, "block_config": [2, 3], "num_init_features": 8, "bn_size": 2},
        ),
        (
            (3, 8, 8),
            {
                "growth_rate": 4,
                "block_config": [2, 2],
                "num_init_features": 6,
                "bn_size": 2,
                "stem": "cifar",
                "activation": "tanh",
            },
        ),
    ],
    "vgg16_torchvision": [
        ((3, 32, 32), {"width": 0.125, "hidden": 32, "dropout": 0.0}),
        (
            (3, 32, 32),
            {
                "width": 0.125,
                "hidden": 32,
                "dropout": 0.0,
                "batch_norm": False,
                "activation": "elu",
            },
        ),
    ],
}


def _cases():
    for name, cases in CASES.items():
        for i, (shape, opts) in enumerate(cases):
            yield pytest.param(name, shape, opts, id=f"{name}-{i}")


def test_every_registered_model_is_covered():
    missing = set(register_model.names()) - set(CASES)
    assert not missing, f"add small instances of {sorted(missing)} to CASES in this file"


def _randomise_bn(model):
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name,shape,opts", list(_cases()))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_symmetry_group_leaves_function_unchanged(name, shape, opts, mode):
    if "bn_eps" in register_model.entry(name).params:
        opts = {**opts, "bn_eps": 1e-20}  # eps breaks the BN scale symmetry at eps / variance
    model = build(name, shape, 10, opts, seed=3, dtype=torch.float64)
    neurons = neuron_structure(model, shape)
    with torch.no_grad():
        _randomise_bn(model)
    model.train(mode == "train")
    x = torch.randn(8, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        element = random_element(neurons, torch.Generator().manual_seed(1))
        state = element.apply(dict(model.state_dict()), neurons)
        changed = max(
            (state[k] - v).abs().max().item()
            for k, v in model.state_dict().items()
            if v.is_floating_point()
        )
        model.load_state_dict(state)
        after = model(x)
    assert changed > 1e-3 or not neurons.groups, "the group element should move the parameters"
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert rel < 1e-10, f"{name} {opts} ({mode}): relative change {rel:.2e}"


def test_structure_of_resnet_ties_residual_streams():
    model = build("resnet20", (3, 16, 16), 10, {})
    s = neuron_structure(model, (3, 16, 16))
    streams = [g for g in s.groups if g.name.endswith(".residual")]
    assert [g.size for g in streams] == [16, 32, 64]
    # stage 1: the stem and the three blocks' conv2 write into the stream
    assert len(streams[0].branches) == 4
    # stage 2: the projection shortcut and three conv2
    assert {b.linear[0].param for b in streams[1].branches} >= {"layer2.0.downsample.0.weight"}
    assert s.output.weight == "fc.weight" and s.output.size == 10


def test_flatten_blocks_and_output_layer():
    model = build("conv", (1, 8, 8), 10, {"channels": 4, "pool": True})
    s = neuron_structure(model, (1, 8, 8))
    last = s.groups[-1]
    (out_slice,) = last.outgoing
    assert (out_slice.param, out_slice.axis, out_slice.block) == (
        "fc.weight",
        1,
        4,
    )  # 8x8 pooled twice: 2x2
    assert last.max_pool and last.homogeneous and not last.odd


def test_structure_json_round_trip():
    s = neuron_structure(build("resnet20", (3, 16, 16), 10, {}), (3, 16, 16))
    assert NeuronStructure.from_json(s.to_json()) == s


def test_unsupported_graph_is_named():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) * self.b(x)

    with pytest.raises(StructureError, match="product of two tensors"):
        neuron_structure(Gated(), (4,))


def _starts(group, suffix=".weight"):
    """``parameter -> start`` of a group's incoming Linear/Conv slices."""
    return {b.linear[0].param.removesuffix(suffix): b.linear[0].start for b in group.branches}


def test_option_a_streams_run_on_inside_the_wider_stages():
    s = neuron_structure(build("resnet20_option_a", (3, 16, 16), 10, {}), (3, 16, 16))
    streams = {g.name: g for g in s.groups if ".residual" in g.name}
    assert {k: g.size for k, g in streams.items()} == {
        "layer1.residual": 16,
        "layer2.residual[0:8]": 8,
        "layer2.residual[24:32]": 8,
        "layer3.residual[0:16]": 16,
        "layer3.residual[48:64]": 16,
    }
    # the stage-1 stream: channels 0..15 of stage 1, 8..23 of stage 2, 16+8..16+23 of stage 3
    one = streams["layer1.residual"]
    assert _starts(one) == {
        "conv1": 0,
        **{f"layer1.{i}.conv2": 0 for i in range(3)},
        **{f"layer2.{i}.conv2": 8 for i in range(3)},
        **{f"layer3.{i}.conv2": 24 for i in range(3)},
    }
    bn = one.branches[4]  # layer2.0: BN affine and statistics carry the offset
    assert {(sl.param, sl.start) for sl in bn.norm + bn.stats} == {
        (f"layer2.0.bn2.{k}", 8) for k in ("weight", "bias", "running_mean", "running_var")
    }
    assert {(sl.param, sl.start) for sl in one.outgoing} == {
        *((f"layer1.{i}.conv1.weight", 0) for i in range(3)),
        ("layer2.0.conv1.weight", 0),
        ("layer2.1.conv1.weight", 8),
        ("layer2.2.conv1.weight", 8),
        ("layer3.0.conv1.weight", 8),
        ("layer3.1.conv1.weight", 24),
        ("layer3.2.conv1.weight", 24),
        ("fc.weight", 24),
    }
    assert {(site.node, site.start) for site in one.sites} >= {
        ("act", 0),
        ("layer2_0_act2", 8),
        ("layer3_2_act2", 24),
    }
    # the zero-padded channels of stage 2 are embedded at offset 16 in stage 3
    assert _starts(streams["layer2.residual[24:32]"]) == {
        **{f"layer2.{i}.conv2": 24 for i in range(3)},
        **{f"layer3.{i}.conv2": 40 for i in range(3)},
    }
    assert _starts(streams["layer3.residual[48:64]"]) == {f"layer3.{i}.conv2": 48 for i in range(3)}
    # every channel of every conv2 is owned by exactly one stream
    for conv, width in (("layer2.1.conv2", 32), ("layer3.0.conv2", 64)):
        owned = sorted(
            r
            for g in streams.values()
            for p, st in _starts(g).items()
            if p == conv
            for r in range(st, st + g.size)
        )
        assert owned == list(range(width)), conv
    assert s.output.weight == "fc.weight"
    assert NeuronStructure.from_json(s.to_json()) == s


def test_option_a_permutation_is_a_naive_reindexing():
    """A permutation of the stage-1 stream moves exactly rows 8..23 of layer2.0.conv2 (a naive
    re-indexing written here) and leaves its padded rows alone."""
    from pipeline.symmetry.actions import permute

    model = build("resnet20_option_a", (3, 8, 8), 10, {}, dtype=torch.float64)
    s = neuron_structure(model, (3, 8, 8))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    moved = permute(state, s, {"layer1.residual": perm})
    w, new = state["layer2.0.conv2.weight"], moved["layer2.0.conv2.weight"]
    assert torch.equal(new[8:24], w[8:24][perm])
    assert torch.equal(new[:8], w[:8]) and torch.equal(new[24:], w[24:])
    w, new = state["layer3.1.conv1.weight"], moved["layer3.1.conv1.weight"]
    assert torch.equal(new[:, 24:40], w[:, 24:40][:, perm])
    assert torch.equal(new[:, :24], w[:, :24]) and torch.equal(new[:, 40:], w[:, 40:])


class _Padded(torch.nn.Module):
    """conv a (4 channels) -> act -> conv b (8 channels) + a zero-padded copy of a's output,
    with optional extra operations to test what the derivation understands."""

    def __init__(
        self,
        pad=(0, 0, 0, 0, 2, 2),
        index=(slice(None), slice(None)),
        stride=1,
        spatial=None,
        shortcut_act=None,
        self_tie=False,
    ):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 8, 3, stride, padding=1)
        self.pool, self.flatten = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        self.fc = torch.nn.Linear(8, 5)
        self.pad, self.index, self.spatial = pad, index, spatial
        self.shortcut_act, self.self_tie = shortcut_act, self_tie

    def forward(self, x):
        x = torch.relu(self.a(x))
        if self.spatial is not None:
            x = torch.nn.functional.pad(x, **self.spatial)
        shortcut = torch.nn.functional.pad(x[self.index], self.pad)
        if self.shortcut_act is not None:
            shortcut = getattr(torch, self.shortcut_act)(shortcut)
        if self.self_tie:  # a's channel c + 2 meets its channel c
            shortcut = shortcut + torch.nn.functional.pad(x, (0, 0, 0, 0, 4, 0))
        out = torch.relu(self.b(x) + shortcut)
        return self.fc(self.flatten(self.pool(out)))


def test_zero_padding_and_spatial_operations_in_a_toy_graph():
    s = neuron_structure(_Padded(), (3, 6, 6))
    assert [(g.name, g.size) for g in s.groups] == [("a.residual", 4), ("b[0:2]", 2), ("b[6:8]", 2)]
    assert _starts(s.group("a.residual")) == {"a": 0, "b": 2}
    assert [(sl.param, sl.start) for sl in s.group("b[6:8]").outgoing] == [("fc.weight", 6)]
    assert [(sl.param, sl.start) for sl in s.group("a.residual").outgoing] == [
        ("b.weight", 0),
        ("fc.weight", 2),
    ]
    # uneven padding puts a's neurons elsewhere
    uneven = neuron_structure(_Padded(pad=(0, 0, 0, 0, 1, 3)), (3, 6, 6))
    assert [(g.name, g.size) for g in uneven.groups] == [
        ("a.residual", 4),
        ("b[0:1]", 1),
        ("b[5:8]", 3),
    ]
    # spatial padding (zeros, reflection) and spatial subsampling leave the channel layout alone
    same = [
        _Padded(spatial={"pad": (1, 1, 1, 1)}),
        _Padded(spatial={"pad": (1, 1, 1, 1), "mode": "reflect"}),
        _Padded(
            index=(slice(None), Ellipsis, slice(None, None, 2), slice(None, None, 2)), stride=2
        ),
    ]
    for model in same:
        found = neuron_structure(model, (3, 6, 6))
        assert [(g.name, g.branches, g.outgoing) for g in found.groups] == [
            (g.name, g.branches, g.outgoing) for g in s.groups
        ]
    for model in (_Padded().double(), same[-1].double()):
        s = neuron_structure(model, (3, 6, 6))
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = model(x)
            element = random_element(s, torch.Generator().manual_seed(1))
            model.load_state_dict(element.apply(model.state_dict(), s))
            assert ((model(x) - before).abs().max() / before.abs().max()).item() < 1e-12


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"spatial": {"pad": (1, 1, 1, 1), "value": 1.0}}, "padding with the constant 1.0"),
        ({"index": (slice(None), [3, 2, 1, 0])}, "indexing"),
        ({"shortcut_act": "sigmoid"}, "sigmoid of zero-padded channels"),
        ({"self_tie": True}, "tie its channels 0 and 2"),
    ],
)
def test_unsupported_padding_and_indexing_is_named(kwargs, message):
    with pytest.raises(StructureError, match=message):
        neuron_structure(_Padded(**kwargs), (3, 6, 6))
