"""N-way K-shot episodes, chosen by counter-based hashes on the device.

Every choice is a hash of (seed, stream, iteration, global task index, lane, ...), computed for all
tasks of a batch at once, so a shard of a meta-batch is exactly a slice of the whole batch and an
episode costs a few tensor operations, no host loop. Omniglot and image folders share it.

- classes: the N classes of the split with the smallest hashes, in hash order (a uniformly random
  set in a uniformly random order; label j is the class ranked j);
- examples: each class's examples in the order of their hashes; support from the front, query from
  the back, so the two never share an example and a different K at test time keeps the same query
  set. Classes may hold different numbers of examples.
"""

from __future__ import annotations

import torch

from distmaml.rng import hash_u32, seed_words

# Lanes keep a task's draws apart: its classes, and the examples of each class.
LANE_CLASSES, LANE_EXAMPLES = range(2)
_PAST_THE_END = 1 << 62  # sorts after every real key (hash * max_count + index < 2**48)


def choose_classes(seed: int, stream: int, iteration: int | torch.Tensor, tasks: torch.Tensor, num_classes: int,
                   ways: int) -> torch.Tensor:
    """[n, N] class of each label of each task: indices into the split's num_classes classes.

    Adding the class index to the scaled hash breaks ties, so the choice is the same on every device.
    """
    every_class = torch.arange(num_classes, device=tasks.device)
    keys = hash_u32(*seed_words(seed), stream, iteration, tasks[:, None], LANE_CLASSES, every_class,
                    device=tasks.device)
    return torch.topk(keys * num_classes + every_class, ways, dim=-1, largest=False).indices


def choose_examples(seed: int, stream: int, iteration: int | torch.Tensor, tasks: torch.Tensor, classes: torch.Tensor,
                    counts: torch.Tensor | int, longest: int, support: int,
                    query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, N, support], [n, N, query]) positions of examples within their class.

    `counts` is the number of examples of every chosen class ([n, N], or one int for all), and
    `longest` the largest count in the split (a Python int: no host sync, so sampling can be
    captured in a CUDA graph). Each class must have at least support + query examples.
    """
    fixed = isinstance(counts, int)
    position = torch.arange(longest, device=tasks.device)
    keys = hash_u32(*seed_words(seed), stream, iteration, tasks[:, None, None], LANE_EXAMPLES, classes[..., None],
                    position, device=tasks.device) * longest + position
    if not fixed:  # a class's positions past its own count sort to the end
        keys = torch.where(position < counts[..., None], keys, torch.full_like(keys, _PAST_THE_END))
    order = torch.argsort(keys, dim=-1)  # [n, N, longest]
    if fixed:
        return order[..., :support], order[..., longest - query:]
    back = counts[..., None] - query + torch.arange(query, device=tasks.device)
    return order[..., :support], order.gather(-1, back)


def labels(ways: int, per_class: int, num_tasks: int, device: torch.device) -> torch.Tensor:
    """[n, N * per_class] labels of class-major points: the per_class examples of label 0 first."""
    return torch.arange(ways, device=device).repeat_interleave(per_class).expand(num_tasks, -1).contiguous()
