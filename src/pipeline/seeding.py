"""Seeds: every random choice derives from the run's seed and a purpose tag.

Deriving per-purpose seeds (``init``, ``data``, ``epoch 3``...) keeps the streams independent and
makes the data order of epoch ``e`` a function of ``(seed, e)`` alone, which is what lets a
resumed run reproduce the uninterrupted one bit for bit.
"""

from __future__ import annotations

import hashlib


def derive(seed: int, *tags) -> int:
    """A 63-bit seed from ``seed`` and any tags (stable across processes and platforms)."""
    text = "/".join([str(seed), *map(str, tags)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *tags, device="cpu"):
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(derive(seed, *tags))
    return gen
