"""The configuration's schema: one dataclass per section, a one-line doc per field (`distmaml config`).

Loading (YAML, dotted overrides, types) is distmaml.config.loading; impossible values and
contradictions are distmaml.config.checks. A component that owns settings (a hypergradient method,
a problem) reads them from its section; nothing here knows torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


def _opt(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its one-line description (and allowed values, for strings)."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dir: str = _opt("runs/sine_maml", "run directory: config.yaml, metrics.jsonl, checkpoints/, summary.json")
    resume: bool | str = _opt(
        "auto", "auto: continue from the newest complete checkpoint in run.dir if any; true: must "
        "continue; false: start fresh; or the path of a checkpoint to continue from")
    user_code: str = _opt("same", "files named by path in problem.name, task.family, model.kind, inner.mode: same: "
                          "resuming or evaluating a checkpoint refuses a file changed since it was written; any: runs "
                          "the file as it is now", ("same", "any"))


@dataclass
class ProblemConfig:
    name: str = _opt("maml", "bi-level problem: maml (initial weights that adapt in a few steps: MAML and its family); "
                     "on networks trained from scratch: learning_rate (the rule's learned rates), activation (a "
                     "learned activation function), weight_decay (a learned L2 decay), hyperclean (a learned weight "
                     "per training example), weighting_net (Meta-Weight-Net: a net from an example's loss to its weight), "
                     "learning_to_reweight (Ren et al.'s per-batch weights; online only), distill (a few learned "
                     "examples per class); or your own builder as an "
                     "import path 'package.module:build' called as build(model=..., family=..., **problem.args); a "
                     "built-in problem's settings are in its own section (maml.*, training_run.*, weight_decay.*, "
                     "hyperclean.*, weighting_net.*, distill.*; online schedules: online.*)")
    args: dict = _opt({}, "keyword arguments for your own problem builder (problem.args.<name>=value)")


@dataclass
class MamlConfig:
    proximal: float = _opt(0.0, "maml: strength lam of the inner loss's pull lam/2 ||w - phi||^2 towards phi (iMAML; "
                           "implicit modes need it > 0, 0 is plain MAML)")


@dataclass
class TrainingRunConfig:
    batch_size: int = _opt(0, "training-run problems: examples per inner step, drawn with replacement from the "
                           "training split (0: the whole split: gradient descent); distill: the real mini-batch of "
                           "the outer loss")
    outer: str = _opt("loss", "training-run problems: the outer loss on held-out data: the task family's loss, or "
                      "soft_error = 1 - mean softmax probability of the true class (classification; for "
                      "hyperparameters chosen for accuracy rather than cross-entropy); or, online only, "
                      "next_batch: the training loss on the run's next mini-batch after the unroll (Baydin et al.'s "
                      "hypergradient descent)", ("loss", "soft_error", "next_batch"))


@dataclass
class WeightDecayConfig:
    per: str = _opt("weight", "weight_decay: one learned decay per weight element, per input element of each "
                    "weight (per feature), per tensor, or one for all", ("weight", "input", "tensor", "global"))
    init: float = _opt(1e-3, "weight_decay: every decay's initial value (phi holds its log)")


@dataclass
class HypercleanConfig:
    init: float = _opt(0.0, "hyperclean: every example's weight logit starts here (weight sigmoid(logit))")
    weighting: str = _opt("normalised", "hyperclean: a mini-batch's weighted loss is sum w_i l_i / sum w_i "
                          "(normalised: the weights choose which examples train the network, not how fast; "
                          "Ren et al. 2018) or the mean of w_i l_i", ("normalised", "mean"))


@dataclass
class WeightingNetConfig:
    hidden: int = _opt(100, "weighting_net: hidden ReLU units of the net from an example's loss to its weight "
                       "(Meta-Weight-Net: 100)")
    classes: bool = _opt(False, "weighting_net: the net also reads the example's label (one-hot)")


@dataclass
class OnlineConfig:
    runs: int = _opt(0, "online bi-level optimisation: this many inner runs persist across outer steps (0: "
                     "episodic, every outer step starts its tasks again); online, train.meta_batch is the runs and "
                     "inner.steps the unroll")
    unroll: int = _opt(1, "online: inner steps per run per outer step (U), through which phi's hypergradient is "
                       "taken (1 with sgd: a one-step lookahead, Learning to Reweight's and Meta-Weight-Net's)")
    horizon: int = _opt(0, "online: a run starts again from fresh weights after this many inner steps (H, a multiple "
                        "of online.unroll; 0: never, phi is learned while one training goes on)")
    burn_in: bool = _opt(True, "online: the runs' first counters are spread over the horizon; true trains each run "
                         "to its counter at the initial phi before the first outer step, false starts it fresh there")
    max_resets: float = _opt(0.5, "online: a run whose state is not finite starts again (counted); past this fraction "
                             "of run-steps reset in a logging window the training stops as diverged")


@dataclass
class DistillConfig:
    per_class: int = _opt(1, "distill: synthetic examples per class (M)")
    init: str = _opt("real", "distill: synthetic inputs start as random real examples of their class, or as "
                     "Gaussian noise", ("real", "noise"))
    fixed_init: bool = _opt(False, "distill: every task starts from one fixed initialisation (Wang et al.'s known "
                            "init) instead of its own random one")


# The sections each built-in problem reads besides problem.*, as data: a key of another problem's
# section is one the run does not use (said at load), and training_run.* is refused outside the
# training runs (distmaml.config.checks). Your own problem reads problem.args only.
PROBLEM_SECTIONS = {
    "maml": ("maml",),
    "learning_rate": ("training_run",),
    "activation": ("training_run",),
    "weight_decay": ("training_run", "weight_decay"),
    "hyperclean": ("training_run", "hyperclean"),
    "distill": ("training_run", "distill"),
    "weighting_net": ("training_run", "hyperclean", "weighting_net"),
    "learning_to_reweight": ("training_run",),
}


@dataclass
class TaskConfig:
    family: str = _opt("sine", "task family: sine, omniglot, image_folder; training runs on a data set: logistic, "
                       "mnist1d, digits; or your own as an import path "
                       "'package.module:Name' or 'path/to/file.py:Name' (see distmaml.tasks.TaskFamily)")
    args: dict = _opt({}, "keyword arguments for your own family's from_config (task.args.<name>=value)")
    support: int = _opt(10, "support examples per task (per class for classification): the K in K-shot")
    query: int = _opt(10, "query examples per task (per class for classification)")
    ways: int = _opt(5, "classes per task (classification only): the N in N-way")
    amplitude: list[float] = _opt([0.1, 5.0], "sine: amplitude range [low, high)")
    phase: list[float] = _opt([0.0, math.pi], "sine: phase range [low, high)")
    x_range: list[float] = _opt([-5.0, 5.0], "sine: input range [low, high)")
    image_size: int = _opt(84, "image_folder: images are resized to image_size x image_size")
    channels: int = _opt(3, "image_folder: 3 (RGB) or 1 (grey)")
    invert: bool = _opt(False, "image_folder: 255 - pixel (dark strokes on white paper become bright on 0)")


@dataclass
class ModelConfig:
    kind: str = _opt("mlp", "network: mlp, conv4, resnet12, conv1d (MNIST-1D's CNN), or your own builder as an import path "
                     "'package.module:build' called as build(input_shape=..., num_outputs=..., **model.args)")
    args: dict = _opt({}, "keyword arguments for your own model builder (model.args.<name>=value)")
    hidden: list[int] = _opt([40, 40], "mlp: hidden layer widths ([]: a linear model)")
    activation: str = _opt("relu", "mlp: activation of the hidden layers; learned: ELU plus an offset given by a small "
                           "MLP whose weights are meta-parameters (problem.name = activation)",
                           ("relu", "elu", "swish", "learned"))
    channels: int = _opt(64, "conv4 and conv1d: filters per convolution (MNIST-1D's CNN: 25)")
    pool: str = _opt("stride", "conv4: halve the resolution with stride-2 convolutions (the MAML paper's "
                     "Omniglot network) or 2x2 max-pooling (its mini-ImageNet network)", ("stride", "max"))
    widths: list[int] = _opt([64, 160, 320, 640], "resnet12: channels of its four residual stages")
    init: str = _opt("pytorch", "initial weights: PyTorch's layer defaults, or the MAML reference code's "
                     "truncated normal (std model.init_std, cut at 2 std) for weights with zero biases",
                     ("pytorch", "truncated_normal"))
    init_std: float = _opt(0.01, "model.init=truncated_normal: standard deviation of the weights")


@dataclass
class InnerConfig:
    steps: int = _opt(1, "inner steps per task during meta-training (K)")
    lr: float = _opt(0.01, "inner step size (alpha); the initial value of learned step sizes (meta_sgd, lslr)")
    rule: str = _opt("sgd", "inner update: plain SGD, a learned step size per weight (Meta-SGD) or per tensor and "
                     "step (MAML++'s LSLR), a learned learning-rate schedule (one log rate per block of steps), "
                     "heavy-ball momentum, or Adam; all differentiable",
                     ("sgd", "meta_sgd", "lslr", "schedule", "momentum", "adam"))
    schedule_blocks: int = _opt(1, "inner.rule=schedule: blocks of equal length over the inner.steps, each with its "
                                "own learned rate (1: one learned learning rate)")
    momentum: Optional[float] = _opt(None, "inner.rule=momentum: heavy-ball coefficient in [0, 1), e.g. 0.9")
    betas: list[float] = _opt([0.9, 0.999], "inner.rule=adam: decay rates of Adam's two moments, each in [0, 1)")
    eps: float = _opt(1e-8, "inner.rule=adam: added to the root of the second moment")
    adapt: list[str] = _opt([], "name prefixes of the weights the inner loop adapts (ANIL: the head); [] adapts all")
    mode: str = _opt("second_order", "hypergradient method: second_order (through every inner step), first_order, "
                     "truncated (the last inner.truncate steps), implicit (conjugate gradient; implicit.*), neumann "
                     "(a Neumann series; neumann.*), finite_difference (the last step's second derivatives by central "
                     "differences; finite_difference.eps), reptile (phi - w_K), es (antithetic evolution strategies over the "
                     "episode, or truncated online; es.*), pes (persistent evolution strategies, online; es.*), or your own as an import path "
                     "'package.module:Name' (a Method object, or a class called without arguments)")
    truncate: int = _opt(1, "truncated mode: backpropagate through the last T inner steps only")
    checkpoint: str = _opt("none", "recompute inner steps in the backward pass instead of storing them (auto: the "
                           "trainer stores them where the memory estimate says they fit, else about sqrt(K) segments)",
                           ("none", "every_step", "segments", "auto"))
    checkpoint_segment: Optional[int] = _opt(None, "checkpoint=segments: inner steps per recomputed segment")
    multi_step_loss: bool = _opt(False, "MAML++'s multi-step loss: the meta-objective weights the query loss after "
                                 "every inner step, annealed towards the last over inner.multi_step_anneal iterations")
    multi_step_anneal: int = _opt(10000, "inner.multi_step_loss: iterations until the earlier steps' weights reach "
                                  "their floor (0.03 / K); 0 keeps every step's weight 1 / K")
    first_order_iterations: int = _opt(0, "derivative-order annealing (MAML++): first-order meta-gradients for this "
                                       "many iterations, then inner.mode")


@dataclass
class ImplicitConfig:
    # Each section below holds a method's settings; the method's dataclass (distmaml.meta.methods) is
    # their one source of defaults and range checks, and tests/meta/test_methods_settings.py holds these to it.
    cg_steps: int = _opt(5, "implicit mode: conjugate-gradient iterations per task (the CG solver's)")
    cg_tol: float = _opt(1e-10, "implicit mode: stop CG once the squared residual falls below this (the CG "
                          "solver's)")
    damping: float = _opt(0.0, "implicit and neumann modes (the Implicit method's, whichever solver): added to the "
                          "diagonal of the inner Hessian before solving (stability where it is far from positive "
                          "definite)")
    inner_safeguard: bool = _opt(True, "implicit and neumann modes (the Implicit method's safeguard): cap each plain "
                                 "SGD inner step at the exact line minimiser of the local quadratic model (one "
                                 "Hessian-vector product), so a sharp task cannot diverge; the inner problem's "
                                 "solution is unchanged")


@dataclass
class NeumannConfig:
    terms: int = _opt(20, "neumann mode: terms of the series alpha sum_j (I - alpha H)^j b after the first")
    alpha: float = _opt(0.1, "neumann mode: its step; the series converges while alpha times the inner Hessian's "
                        "largest eigenvalue stays below 2 (checked before training)")


@dataclass
class FiniteDifferenceConfig:
    eps: float = _opt(0.01, "finite_difference mode: length of the central difference's step in weight space; its "
                      "error shrinks like eps^2 until rounding")


@dataclass
class EsConfig:
    sigma: float = _opt(0.01, "es and pes modes: the perturbations' standard deviation in phi's units, for every "
                        "tensor of phi that es.sigma_of does not name")
    sigma_of: list[str] = _opt([], "es and pes modes: a tensor's own perturbation scale, 'name-prefix=sigma' (the "
                               "longest matching prefix wins), e.g. ['inner.lr=0.3']")
    pairs: int = _opt(8, "es mode: antithetic pairs of perturbations per task (or per online run); pes pairs the "
                      "online runs themselves (online.runs: the particles)")
    reuse_noise: bool = _opt(False, "pes mode: noise-reuse ES: a pair keeps one perturbation for its whole life "
                             "(drawn at its start) and weights its estimate by it, instead of a fresh one per "
                             "truncation summed")


@dataclass
class TrainConfig:
    iterations: int = _opt(70000, "meta-iterations (outer Adam steps)")
    meta_batch: int = _opt(25, "tasks per meta-iteration, over all processes")
    lr: float = _opt(1e-3, "outer Adam learning rate (beta)")
    betas: list[float] = _opt([0.9, 0.999], "outer Adam's decay rates of its two moments (dataset distillation: "
                              "[0.5, 0.999])")
    lr_schedule: str = _opt("constant", "outer learning-rate schedule", ("constant", "cosine"))
    lr_min: float = _opt(0.0, "cosine schedule: learning rate at the last iteration")
    grad_clip: float = _opt(0.0, "clip the meta-gradient to this global L2 norm (0: off)")
    seed: int = _opt(0, "seed of the weights and of every task")
    log_every: int = _opt(100, "iterations between metrics.jsonl lines")
    checkpoint_every: int = _opt(1000, "iterations between checkpoints (0: only at the end)")
    keep_checkpoints: int = _opt(3, "newest checkpoints kept in run.dir/checkpoints")
    check_every: int = _opt(0, "iterations between cross-process weight checksums (0: off)")
    time_limit: float = _opt(0.0, "stop cleanly (checkpoint, evaluate) after this many seconds of training (0: off)")
    max_meta_loss: float = _opt(0.0, "stop as diverged once the meta-batch's mean query loss after adaptation "
                                "exceeds this (0: only a non-finite loss or gradient stops the run)")
    max_meta_loss_factor: float = _opt(100.0, "stop as diverged once the meta-loss of an iteration exceeds this many "
                                       "times its median over the first logged window (train.log_every iterations; "
                                       "0: off)")
    max_grad_norm_factor: float = _opt(1000.0, "stop as diverged once the meta-gradient's norm exceeds this many times its "
                                        "median over the previous logged window (within the first window: the "
                                        "median of its norms so far, from the third on; 0: off); a run stopped by it names the last checkpoint "
                                        "written before the runaway")
    allow_unreached: list[str] = _opt([], "names (or name prefixes) of phi's tensors whose hypergradient may be exactly "
                                      "0 on the first meta-batch and for whole logging windows (entries only some "
                                      "tasks use); any other such tensor stops the run before its first outer step")


@dataclass
class EvalConfig:
    tasks: int = _opt(600, "fresh tasks to evaluate on")
    steps: int = _opt(10, "inner steps at test time; losses are reported after 0..steps")
    shots: Optional[int] = _opt(None, "support examples at test time (default: task.support)")
    query: Optional[int] = _opt(None, "query examples at test time (default: task.query)")
    at_end: bool = _opt(True, "evaluate on fresh tasks when training ends and write it to summary.json")
    seed: int = _opt(0, "seed of the evaluation tasks: the same for every train.seed, so runs are compared "
                     "on the same tasks")
    lr_grid: list[float] = _opt([], "also train the evaluation tasks by plain SGD at each of these fixed rates and "
                                "report their accuracy: the grid search beside a learned learning rate")
    diverged_factor: float = _opt(10.0, "a task counts as diverged once its query loss is non-finite or above "
                                  "this many times its loss before adaptation (or the median task's, if larger)")


@dataclass
class EngineConfig:
    device: str = _opt("auto", "auto: cuda:LOCAL_RANK when CUDA is present, else cpu; or cpu, cuda")
    dtype: str = _opt("float32", "weights and data: float32, float64, or bf16 (float32 weights and Adam, "
                      "bfloat16 autocast of the model's matmuls and convolutions)", ("float32", "float64", "bf16"))
    batched: bool | str = _opt(True, "true: adapt a process's tasks together (vmap over tasks); false: one task "
                               "after another (the per-task loop); auto: time a short probe of each on the first batch "
                               "and take the faster, recorded in the checkpoints so that a resume takes it again (two "
                               "runs may then take different paths, which round differently)")
    cuda_graph: bool = _opt(False, "capture the whole meta-iteration as one CUDA graph (CUDA only)")
    memory_check: bool = _opt(True, "before the first iteration, estimate its peak memory and refuse a run that "
                              "would not fit (with what would)")
    memory_budget: float = _opt(0.0, "GiB one process may use for the memory check (0: the memory available: "
                                "free device memory, or the machine's or job's available RAM)")
    threads: int = _opt(1, "CPU threads of this process (0: PyTorch's default, one per core); bitwise-equal "
                        "results need the same thread count and torch build")


@dataclass
class DistConfig:
    timeout: float = _opt(600.0, "seconds a collective waits for the other processes before the run fails "
                          "(rank 0 says so after a minute without progress)")


@dataclass
class LoggingConfig:
    progress: bool = _opt(True, "live progress bar on a terminal")
    sharpness: bool = _opt(True, "at each log step, the top Hessian eigenvalue of the support loss at theta "
                           "(mean over the meta-batch; inner SGD steps are unstable above 2 / inner.lr)")
    wandb: bool = _opt(False, "also log metrics to Weights & Biases (main process only)")
    wandb_project: str = _opt("distmaml", "wandb project")
    wandb_name: Optional[str] = _opt(None, "wandb run name (default: the run directory's name)")
    wandb_mode: str = _opt("auto", "auto: online with an API key, else offline",
                           ("auto", "online", "offline", "disabled"))
    wandb_timeout: float = _opt(30.0, "seconds wandb may take to reach its server; past that the run logs offline")


@dataclass
class DataConfig:
    root: str = _opt("data/omniglot", "folder with the data set (Omniglot: the two zips or their folders; "
                     "image_folder: train/val/test class folders or mini-ImageNet's csv files and images/)")
    cache_dir: Optional[str] = _opt(None, "where the preprocessed array is cached (default: user cache)")
    split: str = _opt("paper", "omniglot class split: paper (1200 train characters + rotations) or background",
                      ("paper", "background"))
    eval_split: str = _opt("test", "image_folder: the split evaluation draws its classes from", ("test", "val"))
    storage: str = _opt("auto", "image_folder: keep the images on the training device, in pinned host memory "
                        "(copied per episode), or auto: the device unless they take over half its free memory",
                        ("auto", "device", "host"))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    problem: ProblemConfig = field(default_factory=ProblemConfig)
    maml: MamlConfig = field(default_factory=MamlConfig)
    training_run: TrainingRunConfig = field(default_factory=TrainingRunConfig)
    weight_decay: WeightDecayConfig = field(default_factory=WeightDecayConfig)
    hyperclean: HypercleanConfig = field(default_factory=HypercleanConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    weighting_net: WeightingNetConfig = field(default_factory=WeightingNetConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)
    neumann: NeumannConfig = field(default_factory=NeumannConfig)
    finite_difference: FiniteDifferenceConfig = field(default_factory=FiniteDifferenceConfig)
    es: EsConfig = field(default_factory=EsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
