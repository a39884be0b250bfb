"""Counter-based random numbers: every draw is a hash of integers, never of generator state.

A task is a pure function of (seed, stream, iteration, task index), so any process can build any
shard of a meta-batch, on any device, and get exactly the tasks a single process would have built.
Keys are 32-bit words (Python ints or int64 tensors holding values in [0, 2**32)); leading Python
int keys are mixed in plain Python, the rest with int64 tensor arithmetic whose products stay below
2**63 (multipliers < 2**31), so CPU and CUDA give the same bits and nothing relies on overflow.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_START = 0x9E3779B9
_ABSORB = 0x6A09E667

# Named streams keep training, evaluation and plotting tasks apart for the same seed.
STREAM_TRAIN = 0
STREAM_EVAL = 1
STREAM_PLOT = 2
STREAM_ONLINE = 3  # a persistent run's key: (seed, stream, life, global run index)
STREAM_NOISE = 4  # evolution strategies' perturbations: (seed, stream, iteration), then (pair, entry)


def _mix32(x):
    """A 32-bit avalanche mix (hash-prospector constants [16 21f0aaad 15 735a2d97 15], bias ~0.11):
    each input bit flips about half the output bits. Works on Python ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def seed_words(seed: int) -> tuple[int, int]:
    """A 64-bit seed as the two 32-bit key words it is hashed as."""
    seed &= (1 << 64) - 1
    return seed & _MASK32, seed >> 32


def hash_u32(*keys: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Hash 32-bit integer keys (Python ints or int64 tensors, broadcast together) to uniform
    32-bit values, as an int64 tensor. Keys are absorbed in order, so (1, 2) and (2, 1) differ."""
    state: int | torch.Tensor = _START
    for key in keys:
        if isinstance(key, int) and not 0 <= key <= _MASK32:
            raise ValueError(f"hash keys are 32-bit words, got {key}")
        # A Python int state meets a tensor key as a scalar operand: no host-to-device copy, so
        # sampling can be captured in a CUDA graph with the iteration as a device tensor.
        state = _mix32(((key ^ state if torch.is_tensor(key) else state ^ key) + _ABSORB) & _MASK32)
    if not torch.is_tensor(state):
        state = torch.tensor(state, dtype=torch.int64, device=device)
    return state


def uniform(low: float, high: float, *keys: int | torch.Tensor, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform values in [low, high) keyed by integers; 24 random bits, exact in float32."""
    unit = (hash_u32(*keys, device=device) >> 8).to(dtype) * (1.0 / (1 << 24))
    return low + (high - low) * unit


def normal(*keys: int | torch.Tensor, dtype: torch.dtype = torch.float32,
           device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal values keyed by integers (Box-Muller on two keyed uniforms in (0, 1])."""
    radius = torch.sqrt(-2.0 * torch.log(1.0 - uniform(0.0, 1.0, *keys, 0, dtype=torch.float64, device=device)))
    angle = (2.0 * torch.pi) * uniform(0.0, 1.0, *keys, 1, dtype=torch.float64, device=device)
    return (radius * torch.cos(angle)).to(dtype)
