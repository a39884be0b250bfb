"""Counter-based random numbers: every draw is a hash of integers, never of generator state.

A task is a pure function of (seed, stream, iteration, task index), so any process can build any
shard of a meta-batch, on any device, and get exactly the tasks a single process would have built.
The hash runs on int64 tensors (CPU and CUDA give the same bits) and keeps every intermediate below
2**63, so no step relies on signed overflow.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF

# Named streams keep training, evaluation and plotting tasks apart for the same seed.
STREAM_TRAIN = 0
STREAM_EVAL = 1
STREAM_PLOT = 2


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x < 2**32, split in 16-bit halves so nothing overflows int64."""
    low = (x & 0xFFFF) * constant
    high = ((x >> 16) * constant) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (Wellons' 'lowbias32'): each input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_u32(*keys: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Hash integer keys (Python ints or int64 tensors, broadcast together) to uniform 32-bit values.

    Keys are absorbed one at a time, 32 bits per round, so (1, 2) and (2, 1) differ and keys of any
    size below 2**63 are allowed (a 64-bit key takes two rounds).
    """
    state = torch.full((), 0x9E3779B9, dtype=torch.int64, device=device)
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.int64, device=state.device)
        for word in (key & _MASK32, (key >> 32) & _MASK32):
            state = _mix32(((state ^ word) + 0x6A09E667) & _MASK32)
    return state


def uniform(low: float, high: float, *keys: int | torch.Tensor, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform values in [low, high) keyed by integers; 24 random bits, exact in float32."""
    bits = hash_u32(*keys, device=device) >> 8
    unit = bits.to(torch.float64) * (1.0 / (1 << 24))
    return (low + (high - low) * unit).to(dtype)
