"""N-way K-shot Omniglot classification (Finn et al. 2017, section 5.2; Lake et al. 2015).

A task picks N distinct classes, gives them the labels 0..N-1 in a random order, and draws K
support and Q query images of each from that class's 20 drawings (support and query disjoint).
Every choice is a hash of (seed, stream, iteration, global task index), computed for all tasks at
once on the device, so a shard of a meta-batch is exactly a slice of the whole batch.

Class splits (config data.split):
  paper       the MAML paper's protocol: 1200 characters for meta-training and the other 423 for
              testing; each training character's 90, 180 and 270 degree rotations are classes of
              their own (4800 training classes). Test classes are not rotated.
  background  Lake et al.'s split: the 964 characters of images_background for training, the 659 of
              images_evaluation for testing, no rotations.
Episodes come from distmaml.tasks.episodes (image folders use the same sampler).
The paper split's 1200 characters are the same for every seed and machine: the 1200 whose
hash_u32(_SPLIT_SALT, i) is smallest, i the character's index in (split, alphabet, character)
order, which mixes all 50 alphabets into both sides as the MAML reference code's shuffle did.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from distmaml.errors import ConfigError
from distmaml.meta.functional import TaskBatch
from distmaml.tasks.episodes import choose_classes, choose_examples, labels
from distmaml.tasks.omniglot_data import IMAGE_SIZE, OmniglotData, load_omniglot
from distmaml.rng import STREAM_TRAIN, hash_u32

PAPER_TRAIN_CHARACTERS = 1200
DRAWINGS = 20  # drawings of each Omniglot character
_SPLIT_SALT = 0x0D1A6107


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of one task's points."""
    return F.cross_entropy(logits, labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of points whose largest logit is the true class, per task: [..., points, N] -> [...]."""
    return (logits.argmax(-1) == labels).to(logits.dtype).mean(-1)


def paper_train_characters(num_characters: int) -> torch.Tensor:
    """The MAML paper split's 1200 meta-training characters (sorted indices), independent of any seed."""
    order = torch.argsort(hash_u32(_SPLIT_SALT, torch.arange(num_characters)) * num_characters
                          + torch.arange(num_characters))
    return order[:PAPER_TRAIN_CHARACTERS].sort().values


class OmniglotTasks:
    """The family of N-way K-shot Omniglot tasks; `sample` builds any subset of a meta-batch by index.

    Images live on the device as one uint8 tensor [characters, drawings, 28*28]; sampling is
    indexing. Inputs are floats in [0, 1] with strokes 1 on a background of 0.
    """

    loss = staticmethod(cross_entropy)
    accuracy = staticmethod(accuracy)
    is_classification = True
    episodic = True  # few-shot tasks: shots and a query set of a chosen size
    input_shape = (1, IMAGE_SIZE, IMAGE_SIZE)

    def __init__(self, data: OmniglotData, split: str = "paper", ways: int = 5, support: int = 1,
                 query: int = 15, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        num_characters, drawings = data.images.shape[:2]
        if support + query > drawings:
            raise ConfigError(f"support + query = {support + query}: more than the {drawings} drawings of each class")
        self.ways, self.support, self.query, self.seed = ways, support, query, seed
        self.num_outputs = ways
        self.device, self.dtype = torch.device(device), dtype
        self.drawings = drawings
        self.images = torch.as_tensor(data.images).reshape(num_characters, drawings, -1).to(self.device)
        if split == "paper":
            train = paper_train_characters(num_characters)
            test = torch.ones(num_characters, dtype=torch.bool)
            test[train] = False
            train_rotations = 4
            test = test.nonzero()[:, 0]
        elif split == "background":
            train = torch.as_tensor(data.split_indices("images_background"))
            test = torch.as_tensor(data.split_indices("images_evaluation"))
            train_rotations = 1
        else:
            raise ValueError(f"data.split must be paper or background, got {split!r}")
        # A class is (character, quarter turns): class c of a split is character
        # characters[c // rotations] turned (c % rotations) times.
        self._classes = {"train": (train.to(self.device), train_rotations), "test": (test.to(self.device), 1)}
        for name, (characters, rotations) in self._classes.items():
            if len(characters) * rotations < ways:
                raise ConfigError(f"task.ways = {ways}: the Omniglot {name} split has only {len(characters) * rotations} "
                                  "classes")
        # pixel p of an image turned k quarter turns is pixel _rotation[k, p] of the original.
        grid = torch.arange(IMAGE_SIZE * IMAGE_SIZE).reshape(IMAGE_SIZE, IMAGE_SIZE)
        self._rotation = torch.stack([torch.rot90(grid, k).reshape(-1) for k in range(4)]).to(self.device)

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32) -> "OmniglotTasks":
        task, evaluation = config.task, config.eval
        # Support and query images of a class are distinct drawings of its character (20 in Omniglot).
        drawings = DRAWINGS
        shots = task.support if evaluation.shots is None else evaluation.shots
        query = task.query if evaluation.query is None else evaluation.query
        for what, count in (("task.support + task.query", (task.support, task.query)),
                            ("eval shots + query", (shots, query))):
            if sum(count) > drawings:
                raise ConfigError(f"{what} = {count[0]} + {count[1]}: must be <= {drawings}, the drawings of each "
                                  "Omniglot character")
        data = load_omniglot(config.data.root, config.data.cache_dir)
        if data.images.shape[1] < max(task.support + task.query, shots + query):
            raise ConfigError(f"data.root = {config.data.root}: its characters have {data.images.shape[1]} drawings, "
                              f"fewer than support + query = {max(task.support + task.query, shots + query)}")
        return cls(data, split=config.data.split, ways=task.ways, support=task.support, query=task.query,
                   seed=config.train.seed, device=device, dtype=dtype)

    def to(self, device: torch.device | str) -> "OmniglotTasks":
        """The same family sampling on `device` ("meta": shapes only, as the memory check needs)."""
        other = copy.copy(self)
        other.device = torch.device(device)
        other.images = self.images.to(device)
        other._classes = {name: (characters.to(device), rotations)
                          for name, (characters, rotations) in self._classes.items()}
        other._rotation = self._rotation.to(device)
        return other

    def with_seed(self, seed: int) -> "OmniglotTasks":
        """The same family (sharing its images) drawing its tasks from another seed."""
        other = copy.copy(self)
        other.seed = seed
        return other

    def num_classes(self, stream: int) -> int:
        characters, rotations = self.split_classes(stream)
        return len(characters) * rotations

    def sample(self, stream: int, iteration: int | torch.Tensor, indices: torch.Tensor,
               support: int | None = None, query: int | None = None) -> TaskBatch:
        """Tasks `indices` (global task indices, int64) of meta-iteration `iteration` in `stream`.

        x is [n, N*K, 1, 28, 28] (class-major: the K shots of label 0 first), y is [n, N*K].
        """
        support = self.support if support is None else support
        query = self.query if query is None else query
        if support + query > self.drawings:
            raise ValueError(f"support + query = {support + query} exceeds the {self.drawings} drawings per class")
        task = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        classes = self.classes(stream, iteration, task)
        characters, rotations = self.split_classes(stream)
        character, turns = characters[classes // rotations], classes % rotations
        support_at, query_at = choose_examples(self.seed, stream, iteration, task, classes, self.drawings,
                                               self.drawings, support, query)
        return TaskBatch(*self._points(character, turns, support_at), *self._points(character, turns, query_at))

    def classes(self, stream: int, iteration: int | torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """[n, N] class of each label of tasks `indices` (an index into the stream's class list)."""
        task = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        return choose_classes(self.seed, stream, iteration, task, self.num_classes(stream), self.ways)

    def _points(self, character, turns, drawings) -> tuple[torch.Tensor, torch.Tensor]:
        n, ways, count = drawings.shape
        pixels = self.images[character[..., None], drawings]  # [n, N, count, 784]
        pixel_order = self._rotation[turns][:, :, None, :].expand(-1, -1, count, -1)
        pixels = pixels.gather(-1, pixel_order)
        x = pixels.reshape(n, ways * count, 1, IMAGE_SIZE, IMAGE_SIZE).to(self.dtype) / 255
        return x, labels(ways, count, n, self.device)

    def split_classes(self, stream: int) -> tuple[torch.Tensor, int]:
        """(characters, rotations) of the stream's split: class c is character characters[c // rotations]
        turned (c % rotations) quarter turns anticlockwise."""
        return self._classes["train" if stream == STREAM_TRAIN else "test"]
