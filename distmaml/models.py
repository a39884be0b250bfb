"""Plain nn.Modules. Meta-learning never mutates them: the engine runs them on explicit parameter
dicts through torch.func.functional_call, so one module serves every task and every inner step."""

from __future__ import annotations

import math

import torch
from torch import nn

from distmaml.errors import ConfigError
from distmaml.imports import call_user, resolve

OMNIGLOT_IMAGE_SIZE = 28


class LearnedActivation(nn.Module):
    """ELU plus a learned offset, f(x) = elu(x) + g(x) with g a small MLP applied to every unit alone
    (MNIST-1D's meta-learned activation). g's last layer starts at zero: the function starts as ELU."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.offset = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.offset[2].weight)
        nn.init.zeros_(self.offset[2].bias)

    # Behind the zero-initialised last layer the first layer gets no gradient until that layer moves
    # (distmaml.meta.reachability).
    zero_at_start = ("offset.0.weight", "offset.0.bias")

    def forward(self, x):
        return nn.functional.elu(x) + self.offset(x.unsqueeze(-1)).squeeze(-1)


ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "swish": nn.SiLU, "learned": LearnedActivation}


class MLP(nn.Module):
    """Fully connected network, 1 -> 40 -> 40 -> 1 with ReLUs for the MAML paper's sine regression.

    With activation="learned" every hidden layer shares one LearnedActivation, registered first as
    `activation` so that its parameters are named "activation.*" (a problem can make them phi).
    """

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] | list[int] = (40, 40), out_features: int = 1,
                 activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if activation == "learned":
            self.activation = LearnedActivation()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out),
                       self.activation if activation == "learned" else ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Conv1dNet(nn.Module):
    """MNIST-1D's convolutional network (Greydanus and Kobak 2024): three 1-D convolutions of
    `channels` filters (kernel 5 then 3, stride 2, padding 1) with ReLUs, then a linear layer."""

    def __init__(self, length: int, num_outputs: int, channels: int = 25):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        size = length
        for kernel in (5, 3, 3):
            size = (size + 2 - kernel) // 2 + 1
        if size < 1:
            raise ValueError(f"sequences of length {length} are too short for three stride-2 convolutions")
        self.classifier = nn.Linear(channels * size, num_outputs)

    def forward(self, x):
        return self.classifier(self.features(x.unsqueeze(-2)))


class BatchStatNorm2d(nn.Module):
    """BatchNorm2d that always normalises with the current batch's mean and (biased) variance and
    keeps no running averages: the same function as nn.BatchNorm2d(track_running_stats=False).

    Written with plain tensor operations because PyTorch's fused batch_norm gives wrong
    second-order gradients under vmap (relative errors of 1e-2 in float64 against the per-task
    loop and finite differences, torch 2.13; cf. pytorch/functorch#534, its backward batching
    rule); composed of means and products, vmap and double backward are exact.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        centred = x - mean
        variance = (centred * centred).mean(dim=(0, 2, 3), keepdim=True)
        scale = self.weight[:, None, None] * torch.rsqrt(variance + self.eps)
        return centred * scale + self.bias[:, None, None]


class Conv4(nn.Module):
    """The MAML paper's convolutional network: 4 blocks of (3x3 conv with `channels` filters,
    BatchNorm, ReLU), halving the resolution in each block, then a linear layer to the N ways.

    pool="stride" halves with stride-2 convolutions, as the paper's Omniglot network (28 -> 14 -> 7
    -> 4 -> 2 pixels); pool="max" with a stride-1 convolution and 2x2 max-pooling, as its
    mini-ImageNet network (84 -> 42 -> 21 -> 10 -> 5, 32 filters there). Max-pooling keeps the
    strongest response of each window and is what the published mini-ImageNet numbers used; the
    strided form costs a quarter of the convolution arithmetic, which is why Omniglot, where it
    matches the paper's accuracy, keeps it.

    BatchNorm always normalises with the current batch's statistics and keeps no running
    averages (BatchStatNorm2d), as in the MAML reference code: running averages would be written
    from inside vmap and again by every recomputed inner step, and so would be wrong.
    """

    def __init__(self, ways: int, channels: int = 64, in_channels: int = 1, image_size: int = OMNIGLOT_IMAGE_SIZE,
                 pool: str = "stride"):
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"pool must be stride or max, got {pool!r}")
        blocks: list[nn.Module] = []
        size = image_size
        for block_in in (in_channels, channels, channels, channels):
            # No convolution bias: BatchNorm subtracts the batch mean right after, so a bias
            # would have an exactly zero gradient and never move.
            stride = 2 if pool == "stride" else 1
            blocks += [nn.Conv2d(block_in, channels, 3, stride=stride, padding=1, bias=False),
                       BatchStatNorm2d(channels), nn.ReLU()]
            if pool == "max":
                blocks.append(nn.MaxPool2d(2))
            size = (size + 1) // 2 if pool == "stride" else size // 2
        if size < 1:
            raise ValueError(f"{image_size}x{image_size} images are too small for four halvings")
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.classifier = nn.Linear(channels * size * size, ways)

    def forward(self, x):
        return self.classifier(self.features(x))


class ResidualBlock(nn.Module):
    """ResNet-12's stage: three 3x3 convolutions with BatchNorm and leaky ReLU, a 1x1 projection
    of the input added back, then 2x2 max-pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for index, width_in in enumerate((in_channels, out_channels, out_channels)):
            layers += [nn.Conv2d(width_in, out_channels, 3, padding=1, bias=False), BatchStatNorm2d(out_channels)]
            if index < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      BatchStatNorm2d(out_channels))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 as few-shot learning uses it (Oreshkin et al. 2018, Lee et al. 2019): four residual
    stages of widths 64-160-320-640, each halving the resolution, global average pooling, then a
    linear layer to the N ways.

    Normalisation uses batch statistics (BatchStatNorm2d), as Conv4 does, for the same reasons. No
    DropBlock: its random masks are refused inside vmap (randomness="error"), would differ between
    the forward pass and the recomputation of a checkpointed inner step (breaking the exactness of
    inner.checkpoint), and regularise the large-data training MAML's inner loop does not do.
    """

    def __init__(self, ways: int, widths: tuple[int, ...] | list[int] = (64, 160, 320, 640), in_channels: int = 3):
        super().__init__()
        stages, width_in = [], in_channels
        for width in widths:
            stages.append(ResidualBlock(width_in, width))
            width_in = width
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width_in, ways)

    def forward(self, x):
        return self.classifier(self.features(x))


# ------------------------------------------------------------------------------------ builders
# A builder makes a network for a task family's inputs and outputs:
#     build(input_shape=(3, 84, 84), num_outputs=5, **options) -> nn.Module
# Users name their own in model.kind as an import path; model.args are its options.


def _image_shape(input_shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise ConfigError(f"model.kind = {kind} takes square images (channels, height, width); the task family's "
                          f"inputs have shape {tuple(input_shape)}")
    return input_shape[0], input_shape[1]


def build_mlp(input_shape: tuple[int, ...], num_outputs: int, hidden=(40, 40), activation: str = "relu") -> nn.Module:
    """An MLP on the inputs, flattened (images too)."""
    mlp = MLP(math.prod(input_shape), hidden, num_outputs, activation)
    return mlp if len(input_shape) == 1 else nn.Sequential(nn.Flatten(), mlp)


def build_conv1d(input_shape: tuple[int, ...], num_outputs: int, channels: int = 25) -> nn.Module:
    if len(input_shape) != 1:
        raise ConfigError(f"model.kind = conv1d takes sequences (one dimension); the task family's inputs have shape "
                          f"{tuple(input_shape)}")
    return Conv1dNet(input_shape[0], num_outputs, channels)


def build_conv4(input_shape: tuple[int, ...], num_outputs: int, channels: int = 64, pool: str = "stride") -> nn.Module:
    in_channels, size = _image_shape(input_shape, "conv4")
    if (pool == "max" and size < 16) or size < 2:
        raise ConfigError(f"model.kind = conv4 with model.pool = {pool}: {size}x{size} images are too small for "
                          "four halvings")
    return Conv4(num_outputs, channels, in_channels, size, pool)


def build_resnet12(input_shape: tuple[int, ...], num_outputs: int, widths=(64, 160, 320, 640)) -> nn.Module:
    in_channels, size = _image_shape(input_shape, "resnet12")
    if size < 16:
        raise ConfigError(f"model.kind = resnet12: {size}x{size} images are too small for four 2x2 poolings")
    return ResNet12(num_outputs, widths, in_channels)


MODELS = {"mlp": "distmaml.models:build_mlp", "conv4": "distmaml.models:build_conv4",
          "resnet12": "distmaml.models:build_resnet12", "conv1d": "distmaml.models:build_conv1d"}
# The typed config keys each built-in reads (a user's builder reads model.args instead).
BUILT_IN_OPTIONS = {"mlp": ("hidden", "activation"), "conv4": ("channels", "pool"), "resnet12": ("widths",),
                    "conv1d": ("channels",)}


def build_model(config, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The network config.model names, sized for the family's inputs and outputs, initialised as
    config.model.init says. A network that cannot take those inputs, or gives the wrong number of
    outputs, is refused in one line."""
    kind = config.model.kind
    builder = resolve(kind, MODELS, "model.kind")
    options = {name: getattr(config.model, name) for name in BUILT_IN_OPTIONS.get(kind, ())}
    model = call_user(builder, f"model.kind = {kind!r}: its builder, for inputs of shape {tuple(input_shape)} and "
                               f"{num_outputs} outputs,", ConfigError,
                      input_shape=tuple(input_shape), num_outputs=num_outputs, **options, **config.model.args)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.kind = {kind!r}: the builder returned {type(model).__name__}, not an nn.Module")
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as err:  # noqa: BLE001 - any failure means the shapes do not fit; say which
        raise ConfigError(f"model.kind = {kind!r} cannot take the task family's inputs of shape "
                          f"{tuple(input_shape)} ({type(err).__name__}: {str(err).splitlines()[0][:150]})") from None
    if tuple(out.shape) != (2, num_outputs):
        raise ConfigError(f"model.kind = {kind!r}: gives outputs of shape {tuple(out.shape[1:])} per example; the "
                          f"task family needs {num_outputs}")
    return initialise(model, config.model.init, config.model.init_std)


def initialise(model: nn.Module, scheme: str = "pytorch", std: float = 0.01) -> nn.Module:
    """Re-draw the initial weights of every linear and convolutional layer as `scheme` says.

    "pytorch" keeps the layers' own defaults (Kaiming-uniform weights and biases); "truncated_normal"
    is the MAML reference code's (cbfinn/maml, construct_fc_weights): weights from a normal of
    standard deviation `std` re-drawn beyond 2 std, biases zero. Normalisation layers keep scale 1
    and shift 0. Draws from torch's global generator, so the seed set before decides them.
    """
    if scheme == "pytorch":
        return model
    if scheme != "truncated_normal":
        raise ValueError(f"model.init must be pytorch or truncated_normal, got {scheme!r}")
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
