"""Training teleported networks, and the paper's controls.

Because a teleported network's modified operations stay fixed while it trains, it is a diagonal
reparametrisation of the original: ``f_tau(theta') = f(theta' / D)``. SGD with momentum and
(coupled) weight decay from ``theta' = D theta`` is therefore exactly SGD from ``theta`` whose
gradient term is scaled per parameter by ``D^-2`` (the weight-decay term is unchanged), with the
iterates related by ``theta'_t = D theta_t`` and the momentum buffers by ``v'_t = D v_t``. A later
teleport by ``D2`` multiplies the scaling by ``D2^-2`` and leaves ``theta`` and ``v`` as they
are. :class:`Preconditioner` trains that way: the stock model, no per-forward cost, one fused
multiply of the gradients per step. :class:`TeleportCallback` uses it for ``train_run``.

Controls (Armenta et al.): *pseudo-teleportation* moves each parameter tensor by the L1 distance
a real teleport would move it, in a random Gaussian direction; *same distribution* resamples
every Linear/Conv weight i.i.d. from the histogram of its teleported value.
"""

from __future__ import annotations

import torch

from pipeline import seeding
from pipeline.models import neuron_structure
from pipeline.models.structure import NeuronStructure
from pipeline.teleport.cob import ChangeOfBasis, identity, parameter_scales, sample
from pipeline.train.extensions import register_extension


class Preconditioner:
    """SGD on ``model`` equivalent to SGD on its teleport by the cumulative CoB: before every
    optimizer step the gradients are multiplied by ``D^-2``."""

    def __init__(self, model: torch.nn.Module, structure: NeuronStructure):
        self.structure = structure
        self.params = dict(model.named_parameters())
        self.cob = identity(structure)
        self._params: list = []
        self._factors: list = []
        self._handle = None

    def teleport(self, cob: ChangeOfBasis) -> None:
        """Compose the CoB: from now on train as the network teleported by it too."""
        self.cob = self.cob.compose(cob)
        scales = parameter_scales(self.structure, self.cob, self.params)
        self._params = [self.params[k] for k in scales]
        self._factors = [(d**-2).expand_as(self.params[k]).contiguous() for k, d in scales.items()]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = optimizer.register_step_pre_hook(self._scale_gradients)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def _scale_gradients(self, optimizer, args, kwargs):
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):
            pairs = [(g, f) for g, f in zip(grads, self._factors, strict=True) if g is not None]
            grads, factors = [g for g, _ in pairs], [f for _, f in pairs]
        else:
            factors = self._factors
        if grads:
            torch._foreach_mul_(grads, factors)

    def teleported_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters of the equivalent teleported network (``D theta``)."""
        scales = parameter_scales(self.structure, self.cob, self.params)
        return {
            k: p.detach() * scales[k] if k in scales else p.detach().clone()
            for k, p in self.params.items()
        }


@torch.no_grad()
def pseudo_teleport_(
    model: torch.nn.Module, structure: NeuronStructure, cob: ChangeOfBasis, gen: torch.Generator
) -> None:
    """Per parameter tensor: ``theta += |T(theta) - theta|_1 * r / |r|_1``, ``r ~ N(0, I)``.

    The original (``simulate_teleportation_sphere``) also lists BatchNorm's running statistics
    among the tensors, but a teleport leaves them where they are (BatchNorm computes
    ``BN(x / tau_in)``), so their distance, and their shift, is zero there too."""
    params = dict(model.named_parameters())
    scales = parameter_scales(structure, cob, params)
    for name, p in params.items():
        if name not in scales:
            continue
        distance = (p * (scales[name] - 1.0)).abs().sum()
        r = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
        p.add_(r * (distance / r.abs().sum()))


def sample_like(values: torch.Tensor, n: int, gen: torch.Generator, bins: int = 1000):
    """``n`` i.i.d. draws from the histogram of ``values`` (``bins`` equal bins, uniform within
    a bin), by inverse-CDF sampling."""
    v = values.detach().double().flatten().cpu()
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return torch.full((n,), lo, dtype=torch.float64)
    counts = torch.histc(v, bins, lo, hi)
    cdf = torch.cumsum(counts, 0) / counts.sum()
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u, right=True).clamp_max(bins - 1)
    width = (hi - lo) / bins
    return lo + (idx + torch.rand(n, generator=gen, dtype=torch.float64)) * width


@torch.no_grad()
def same_distribution_(
    model: torch.nn.Module,
    structure: NeuronStructure,
    cob: ChangeOfBasis,
    gen: torch.Generator,
    bins: int = 1000,
) -> None:
    """Resample every Linear/Conv weight (parameters with 2+ axes) i.i.d. from the histogram of
    its teleported value ``D W``."""
    params = dict(model.named_parameters())
    scales = parameter_scales(structure, cob, params)
    for name, p in params.items():
        if p.ndim >= 2:
            teleported = p * scales[name] if name in scales else p
            p.copy_(sample_like(teleported, p.numel(), gen, bins).reshape(p.shape).to(p))


INITIALIZERS = ("none", "normal", "xavier")


@torch.no_grad()
def reinitialise_(model: torch.nn.Module, scheme: str, gain: float, gen: torch.Generator) -> None:
    """The paper's initializer study (Fig. 9): every Linear/Conv weight drawn from N(0, gain^2)
    (``normal``) or Glorot-normal with ``gain`` (``xavier``), biases zero."""
    if scheme not in INITIALIZERS:
        raise ValueError(
            f"teleport.initializer: {scheme!r} not allowed; allowed: {', '.join(INITIALIZERS)}"
        )
    if scheme == "none":
        return
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for m in model.modules():
        if isinstance(m, layers):
            if scheme == "normal":
                torch.nn.init.normal_(m.weight, 0.0, gain, generator=gen)
            else:
                torch.nn.init.xavier_normal_(m.weight, gain, generator=gen)
            if m.bias is not None:
                m.bias.zero_()


MODES = ("none", "teleport", "pseudo", "same_distribution")


class TeleportCallback:
    """Teleport a ``train_run`` run at the start of epoch 0 (``every_n_epochs: 0``) or of every
    n-th epoch, reproducibly: the CoB of epoch ``e`` is drawn from
    ``seeding.generator(seed, "teleport", e)``.

    - ``teleport``: train as the teleported network through a :class:`Preconditioner` on the
      run's optimizer (exactly equivalent, stock model, momentum kept as the paper's code did
      not). On a resumed run it rebuilds the cumulative CoB of the epochs already started.
    - ``pseudo`` / ``same_distribution``: the controls, applied to the weights in place.
    - ``none``: nothing (the no_teleport arm).

    ``initializer`` (none, normal, xavier; with ``init_gain``): re-initialise the weights at the
    start of epoch 0, in every mode (the initializer study compares both arms on it).

    ``input_shape`` may be left out when the model's neuron structure is already cached
    (``train_run`` derives it before training).
    """

    def __init__(
        self,
        mode: str = "teleport",
        sampling: str = "inter_landscape",
        cob_range: float = 0.9,
        center: float = 1.0,
        every_n_epochs: int = 0,
        norm_inputs: bool = True,
        residual: str = "per_branch",
        histogram_bins: int = 1000,
        initializer: str = "none",
        init_gain: float = 0.02,
        input_shape=None,
    ):
        if mode not in MODES:
            raise ValueError(f"teleport.mode: {mode!r} not allowed; allowed: {', '.join(MODES)}")
        if every_n_epochs < 0:
            raise ValueError(f"teleport.every_n_epochs must be >= 0; got {every_n_epochs}")
        if initializer not in INITIALIZERS:
            raise ValueError(
                f"teleport.initializer: {initializer!r} not allowed; allowed: "
                f"{', '.join(INITIALIZERS)}"
            )
        self.mode, self.sampling, self.cob_range, self.center = mode, sampling, cob_range, center
        self.every_n_epochs, self.norm_inputs = every_n_epochs, norm_inputs
        self.residual = residual
        self.histogram_bins, self.input_shape = histogram_bins, input_shape
        self.initializer, self.init_gain = initializer, init_gain
        self.preconditioner: Preconditioner | None = None
        self._optimizer = None

    def is_teleport_epoch(self, epoch: int) -> bool:
        if self.every_n_epochs == 0:
            return epoch == 0
        return epoch % self.every_n_epochs == 0

    def cob(self, structure: NeuronStructure, seed: int, epoch: int) -> ChangeOfBasis:
        """The CoB drawn at the start of ``epoch``."""
        gen = seeding.generator(seed, "teleport", epoch)
        return sample(
            structure,
            self.sampling,
            self.cob_range,
            gen,
            self.center,
            self.norm_inputs,
            self.residual,
        )

    def _structure(self, model):
        if self.input_shape is None and getattr(model, "_neuron_structure", None) is None:
            raise ValueError(
                "TeleportCallback: the model's neuron structure is not derived (give "
                "input_shape; a model without a structure cannot be teleported)"
            )
        return neuron_structure(model, self.input_shape)

    def _start(self, model, optimizer, seed, epochs) -> None:
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"teleport.mode teleport trains as the teleported network with SGD "
                f"only; got {type(optimizer).__name__}"
            )
        structure = self._structure(model)
        self.preconditioner = Preconditioner(model, structure)
        for e in epochs:
            if self.is_teleport_epoch(e):
                self.preconditioner.teleport(self.cob(structure, seed, e))
        self.preconditioner.attach(optimizer)
        self._optimizer = optimizer

    def on_resume(self, run) -> None:
        """Engine hook (:mod:`pipeline.train.engine`): a resume state was loaded."""
        self.resume_at(run.epoch, run.batch, run.task.model, run.task.optimizer, run.task.seed)

    def on_epoch_start(self, run) -> None:
        """Engine hook: an epoch's first batch comes next."""
        self.epoch_start(run.epoch, run.task.model, run.task.optimizer, run.task.seed)

    def resume_at(self, epoch: int, batch: int, model, optimizer, seed: int) -> None:
        """After a checkpoint was loaded at (``epoch``, ``batch``): restore the scaling of the
        teleports already applied (those of epochs before ``epoch``, and ``epoch``'s own when
        its first batch is already done)."""
        if self.mode == "teleport":
            self._start(model, optimizer, seed, range(epoch + (1 if batch > 0 else 0)))

    def epoch_start(self, epoch: int, model, optimizer, seed: int) -> None:
        """Before epoch ``epoch``'s first batch: reinitialise (epoch 0), teleport when due."""
        if epoch == 0:
            reinitialise_(
                model, self.initializer, self.init_gain, seeding.generator(seed, "initializer")
            )
        if self.mode == "none":
            return
        if self.mode == "teleport":
            if self._optimizer is not optimizer:
                self._start(model, optimizer, seed, range(epoch))
            if self.is_teleport_epoch(epoch):
                structure = self.preconditioner.structure
                self.preconditioner.teleport(self.cob(structure, seed, epoch))
            return
        if not self.is_teleport_epoch(epoch):
            return
        structure = self._structure(model)
        cob = self.cob(structure, seed, epoch)
        gen = seeding.generator(seed, self.mode, epoch)
        if self.mode == "pseudo":
            pseudo_teleport_(model, structure, cob, gen)
        else:
            same_distribution_(model, structure, cob, gen, self.histogram_bins)


@register_extension("teleport")
def teleport_extension(section: dict, hparams: dict) -> TeleportCallback:
    """The callback of a run's ``teleport`` hyperparameter section (:mod:`.hparams`)."""
    return TeleportCallback(**section)
