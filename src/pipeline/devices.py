"""The one place where a device name becomes a ``torch.device`` and a dtype name a
``torch.dtype``.

``cpu`` and ``cuda`` are torch's own; ``xla`` (TPUs, or the CPU PJRT device for tests) imports
torch-xla only when asked for, so nothing else needs it installed.
"""

from __future__ import annotations

DEVICES = ("cpu", "cuda", "xla")
DTYPES = ("float32", "float64")


def dtype(name: str, key: str = "dtype"):
    """``torch.float32`` or ``torch.float64`` for ``name``; ``key`` names the config key in the
    error for any other value."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"{key}: {name!r} not allowed; allowed: {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve(name: str):
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for, but torch sees no CUDA GPU here")
        return torch.device("cuda")
    if name == "xla":
        try:
            import torch_xla
        except ImportError as err:
            raise RuntimeError(
                "device: xla needs torch-xla installed (see `make test-xla` for a CPU set-up)"
            ) from err
        return torch_xla.device()
    raise ValueError(f"device: unknown device {name!r}; allowed: {', '.join(DEVICES)}")


def sync(device) -> None:
    """Wait for queued work (CUDA kernels, the lazy XLA graph) to finish."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla

        if hasattr(torch_xla, "sync"):
            torch_xla.sync()
        else:  # torch-xla < 2.5
            import torch_xla.core.xla_model as xm

            xm.mark_step()


def is_xla(device) -> bool:
    return getattr(device, "type", "") == "xla"
