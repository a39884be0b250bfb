"""N-way K-shot classification on a few-shot image data set: mini-ImageNet, tiered-ImageNet, CIFAR-FS,
or any set of class folders (see distmaml.tasks.image_folder_data for the layouts).

Training tasks draw their classes from the train split, evaluation tasks from data.eval_split
(test, or val), which must share no class with it. A folder holding only the evaluation split can be
evaluated on (distmaml eval --data-root); training tasks then say that the train split is missing. Episodes come from the counter-based sampler Omniglot uses
(distmaml.tasks.episodes), so a shard of a meta-batch is a slice of the whole batch.

Where the images live (data.storage): by default on the training device, as one uint8 array, so
an episode is gathered and scaled there and a GPU never waits for a CPU data loader. A set larger
than half the device's free memory stays in pinned host memory instead; each episode is gathered
there and copied asynchronously (that path cannot be captured in a CUDA graph).
"""

from __future__ import annotations

import copy

import torch

from distmaml.errors import ConfigError, DataError
from distmaml.meta.functional import TaskBatch
from distmaml.tasks.episodes import choose_classes, choose_examples, labels
from distmaml.tasks.image_folder_data import MissingSplit, SplitData, load_split, shared_classes
from distmaml.tasks.omniglot import accuracy, cross_entropy
from distmaml.rng import STREAM_TRAIN


class _Split:
    """One split's images and class layout, on the device the images live on."""

    def __init__(self, data: SplitData, storage: torch.device, device: torch.device, pin: bool):
        self.images = torch.from_numpy(data.images)
        self.images = self.images.pin_memory() if pin else self.images.to(storage)
        self.start = torch.as_tensor(data.class_start, device=device)
        self.count = torch.as_tensor(data.class_count, device=device)
        self.longest = int(data.class_count.max())
        self.fewest = int(data.class_count.min())
        self.num_classes = len(data.class_names)


class ImageFolderTasks:
    """The family of N-way K-shot tasks over an image data set's classes."""

    loss = staticmethod(cross_entropy)
    accuracy = staticmethod(accuracy)
    is_classification = True
    episodic = True  # few-shot tasks: shots and a query set of a chosen size

    def __init__(self, train: SplitData | None, evaluation: SplitData, ways: int = 5, support: int = 1,
                 query: int = 15, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 storage: str = "auto", missing_train: str = "the train split is missing"):
        self.ways, self.support, self.query, self.seed = ways, support, query, seed
        self.num_outputs = ways
        self.device, self.dtype = torch.device(device), dtype
        self.input_shape = tuple(evaluation.images.shape[1:])
        self.missing_train = missing_train  # what sampling training tasks says without a train split
        on_host = _keep_on_host(storage, self.device, evaluation.images.nbytes + (train.images.nbytes if train else 0))
        place = torch.device("cpu") if on_host else self.device
        self.host = on_host and self.device.type == "cuda"
        self._splits = {"train": _Split(train, place, self.device, self.host) if train is not None else None,
                        "eval": _Split(evaluation, place, self.device, self.host)}
        for name, split in self._splits.items():
            if split is not None and split.num_classes < ways:
                raise ConfigError(f"task.ways = {ways}: the {name} split has only {split.num_classes} classes")

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32) -> "ImageFolderTasks":
        task, data = config.task, config.data
        settings = dict(image_size=task.image_size, channels=task.channels, invert=task.invert,
                        cache_dir=data.cache_dir)
        try:
            train, missing = load_split(data.root, "train", **settings), ""
        except MissingSplit as err:  # evaluation needs only its own split; training tasks will say so
            train, missing = None, str(err)
        evaluation = load_split(data.root, data.eval_split, **settings)
        shared = shared_classes(train, evaluation) if train is not None else []
        if shared:
            raise ConfigError(f"data.eval_split = {data.eval_split}: it shares {shared[0]} with the train split of "
                              f"data.root={data.root}; evaluation must draw classes never trained on")
        shots = task.support if config.eval.shots is None else config.eval.shots
        query = task.query if config.eval.query is None else config.eval.query
        for name, split, need in (("train", train, task.support + task.query), (data.eval_split, evaluation,
                                                                                  shots + query)):
            if split is None:
                continue
            fewest = int(split.class_count.min())
            if need > fewest:
                smallest = split.class_names[int(split.class_count.argmin())]
                raise ConfigError(f"support + query = {need} examples per class, but class {smallest!r} of the "
                                  f"{name} split has only {fewest} images")
        if config.engine.cuda_graph and data.storage == "host":
            raise ConfigError("data.storage = host: episodes are gathered on the host, which a CUDA graph cannot "
                              "capture; use data.storage=device or engine.cuda_graph=false")
        return cls(train, evaluation, task.ways, task.support, task.query, config.train.seed, device, dtype,
                   data.storage, missing)

    def with_seed(self, seed: int) -> "ImageFolderTasks":
        """The same family (sharing its images) drawing its tasks from another seed."""
        other = copy.copy(self)
        other.seed = seed
        return other

    def to(self, device: torch.device | str) -> "ImageFolderTasks":
        """The same family sampling on `device` ("meta": shapes only, as the memory check needs)."""
        other = copy.copy(self)
        other.device = torch.device(device)
        other._splits = {}
        for name, split in self._splits.items():
            if split is None:
                other._splits[name] = None
                continue
            moved = copy.copy(split)
            moved.images, moved.start, moved.count = (split.images.to(device), split.start.to(device),
                                                      split.count.to(device))
            other._splits[name] = moved
        other.host = False
        return other

    def sample(self, stream: int, iteration: int | torch.Tensor, indices: torch.Tensor,
               support: int | None = None, query: int | None = None) -> TaskBatch:
        """Tasks `indices` (global task indices, int64) of meta-iteration `iteration` in `stream`.

        x is [n, N*K, C, size, size] in [0, 1] (class-major: the K shots of label 0 first), y is [n, N*K].
        """
        support = self.support if support is None else support
        query = self.query if query is None else query
        split = self._splits["train" if stream == STREAM_TRAIN else "eval"]
        if split is None:
            raise DataError(self.missing_train)
        if support + query > split.fewest:
            raise ValueError(f"support + query = {support + query} exceeds the {split.fewest} images of the "
                             "smallest class")
        task = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        classes = choose_classes(self.seed, stream, iteration, task, split.num_classes, self.ways)
        support_at, query_at = choose_examples(self.seed, stream, iteration, task, classes, split.count[classes],
                                               split.longest, support, query)
        first = split.start[classes][..., None]
        return TaskBatch(*self._points(split, first + support_at), *self._points(split, first + query_at))

    def _points(self, split: _Split, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, ways, count = image.shape
        if self.host:  # gather in pinned host memory, then one asynchronous copy of the episode
            pixels = split.images[image.cpu()].pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = split.images[image]
        x = pixels.reshape(n, ways * count, *self.input_shape).to(self.dtype) / 255
        return x, labels(ways, count, n, self.device)


def _keep_on_host(storage: str, device: torch.device, size: int) -> bool:
    """data.storage as a decision: auto keeps the images on a GPU unless they take over half its free memory."""
    if storage == "host":
        return True
    if storage == "device" or device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return size > free / 2
