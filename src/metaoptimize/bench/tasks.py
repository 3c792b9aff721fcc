"""Benchmark tasks: small, offline, deterministic problems that run on a laptop CPU.

A task owns its data and model. The runner calls, for ``step = 0 .. steps-1``::

    loss, extra = task.step_loss(model, step)   # extra: optional per-step tensor (e.g. correct)
    ... backward, optimizer step ...
    task.after_step(model, step)

and at the end ``task.final_metrics(model, losses, extras)``, whose ``task.metric`` entry is the
task's headline number.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metaoptimize.bench import data as datasets

__all__ = ["TASKS", "Task", "get_task"]


class Task:
    """Base class: subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    log_scale: ClassVar[bool] = False  # plot the metric on a log axis
    full_steps: ClassVar[int]
    quick_steps: ClassVar[int]
    #: learning-rate grid for Adam-family fixed baselines; SGD-family uses ``sgd_lr_grid``.
    lr_grid: ClassVar[tuple[float, ...]] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    sgd_lr_grid: ClassVar[tuple[float, ...]] = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    needs_data_dir: ClassVar[bool] = False
    #: False where the training loss rises by design (drifting targets, task switches): the
    #: runner's "blew up" check (loss above its start, or most progress lost) does not apply.
    stationary: ClassVar[bool] = True
    #: Compare methods by digits of accuracy gained (log10 of start / end), not by the metric's
    #: ratio: for a deterministic problem whose error spans many orders of magnitude.
    compare_digits: ClassVar[bool] = False

    def __init__(self, seed: int, steps: int, data_dir: str | None = None) -> None:
        self.seed = seed
        self.steps = steps
        self.data_dir = data_dir
        self.generator = torch.Generator().manual_seed(1000 + seed)

    @classmethod
    def check_data(cls, data_dir: str) -> None:
        """Raise DataError when ``data_dir`` lacks the files this task reads (cheap check)."""

    def model(self) -> nn.Module:
        """A freshly initialised model (seeded by the task's seed)."""
        raise NotImplementedError

    def step_loss(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | None]:
        """The training loss of this step, and an optional per-step tensor to record."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Hook after each optimizer step (the continual task evaluates at task ends)."""

    def final_metrics(
        self, model: nn.Module, losses: Tensor, extras: Tensor | None
    ) -> dict[str, float]:
        """Metrics at the end of training; must include ``self.metric``."""
        raise NotImplementedError


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class VectorModel(nn.Module):
    """A bare weight vector ``w`` (zero-initialised)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(size))


def _vector(model: nn.Module) -> Tensor:
    assert isinstance(model, VectorModel)
    return model.w


class Quadratic(Task):
    """f(w) = 1/2 (w - w*)^T A (w - w*), condition number 100, dimension 50, full batch."""

    name = "quadratic"
    compare_digits = True
    description = "ill-conditioned convex quadratic (dim 50, condition 100), known optimum"
    metric = "suboptimality"
    higher_is_better = False
    log_scale = True
    full_steps = 500
    quick_steps = 100
    lr_grid = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    sgd_lr_grid = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

    def __init__(self, seed: int, steps: int, data_dir: str | None = None) -> None:
        super().__init__(seed, steps, data_dir)
        dim = 50
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=self.generator))
        eigenvalues = torch.logspace(0, 2, dim)
        self.hessian = q @ torch.diag(eigenvalues) @ q.T
        self.optimum = torch.randn(dim, generator=self.generator)

    def model(self) -> nn.Module:
        _seeded(self.seed)
        return VectorModel(50)

    def _value(self, model: nn.Module) -> Tensor:
        diff = _vector(model) - self.optimum
        value: Tensor = 0.5 * diff @ self.hessian @ diff
        return value

    def step_loss(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | None]:
        return self._value(model), None

    def final_metrics(
        self,
        model: nn.Module,
        losses: Tensor,
        extras: Tensor | None,
    ) -> dict[str, float]:
        with torch.no_grad():
            return {"suboptimality": float(self._value(model))}


class Tracking(Task):
    """Sutton's (1992) IDBD tracking task.

    20 inputs, 5 relevant weights of +-1, one of which flips sign every 20 examples; a linear
    model, batch size 1, squared error.
    """

    name = "tracking"
    stationary = False
    description = "Sutton 1992 IDBD tracking: 20 inputs, 5 relevant (+-1), a sign flip every 20"
    metric = "asymptotic_mse"
    higher_is_better = False
    log_scale = True
    full_steps = 10_000
    quick_steps = 2_000
    lr_grid = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    sgd_lr_grid = (3e-3, 1e-2, 2e-2, 3e-2, 6e-2)

    def __init__(self, seed: int, steps: int, data_dir: str | None = None) -> None:
        super().__init__(seed, steps, data_dir)
        self.inputs = torch.randn(steps, 20, generator=self.generator)
        signs = torch.ones(5)
        targets = torch.empty(steps)
        flips = torch.randint(0, 5, (steps // 20 + 1,), generator=self.generator)
        for t in range(steps):
            if t % 20 == 0 and t > 0:
                signs[flips[t // 20]] *= -1
            targets[t] = self.inputs[t, :5] @ signs
        self.targets = targets

    def model(self) -> nn.Module:
        _seeded(self.seed)
        return VectorModel(20)

    def step_loss(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | None]:
        error = self.inputs[step] @ _vector(model) - self.targets[step]
        return 0.5 * error**2, None

    def final_metrics(
        self,
        model: nn.Module,
        losses: Tensor,
        extras: Tensor | None,
    ) -> dict[str, float]:
        # Squared error (2 x the loss) averaged over the second half of the run.
        tail = losses[len(losses) // 2 :]
        return {"asymptotic_mse": float(2.0 * tail.mean())}


class _Digits(Task):
    metric = "test_accuracy"
    higher_is_better = True
    batch_size = 32

    def __init__(self, seed: int, steps: int, data_dir: str | None = None) -> None:
        super().__init__(seed, steps, data_dir)
        self.x_train, self.y_train, self.x_test, self.y_test = datasets.digits()

    def _inputs(self, x: Tensor) -> Tensor:
        return x

    def step_loss(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | None]:
        index = torch.randint(0, len(self.x_train), (self.batch_size,), generator=self.generator)
        logits = model(self._inputs(self.x_train[index]))
        return F.cross_entropy(logits, self.y_train[index]), None

    def final_metrics(
        self,
        model: nn.Module,
        losses: Tensor,
        extras: Tensor | None,
    ) -> dict[str, float]:
        with torch.no_grad():
            logits = model(self._inputs(self.x_test))
            return {
                "test_accuracy": float((logits.argmax(1) == self.y_test).float().mean()),
                "test_loss": float(F.cross_entropy(logits, self.y_test)),
            }


class DigitsMLP(_Digits):
    """MLP 64-128-10 on the digits, batch 32."""

    name = "digits-mlp"
    description = "MLP 64-128-10 on scikit-learn digits (1347 train / 450 test), batch 32"
    full_steps = 1500
    quick_steps = 150

    def model(self) -> nn.Module:
        _seeded(self.seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


class DigitsCNN(_Digits):
    """Two 3x3 convolutions, max-pool and a linear head on the 8x8 digits, batch 32."""

    name = "digits-cnn"
    description = "CNN (conv16-conv32-pool-linear) on scikit-learn digits, batch 32"
    full_steps = 1000
    quick_steps = 100

    def _inputs(self, x: Tensor) -> Tensor:
        return x.view(-1, 1, 8, 8)

    def model(self) -> nn.Module:
        _seeded(self.seed)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )


class CausalTransformer(nn.Module):
    """A small pre-norm causal transformer language model."""

    def __init__(
        self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 64
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(context, dim) * 0.02)
        block = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:length]
        mask = self.get_buffer("mask")[:length, :length]
        x = self.blocks(x, mask=mask, is_causal=True)
        logits: Tensor = self.head(self.norm(x))
        return logits


class _LanguageModel(Task):
    metric = "val_loss"
    higher_is_better = False
    batch_size = 16
    context = 64
    vocab = 256

    def _tokens(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __init__(self, seed: int, steps: int, data_dir: str | None = None) -> None:
        super().__init__(seed, steps, data_dir)
        self.train_tokens, self.val_tokens = self._tokens()
        val_generator = torch.Generator().manual_seed(7)  # the same validation batches always
        starts = torch.randint(
            0, len(self.val_tokens) - self.context - 1, (64,), generator=val_generator
        )
        self.val_batch = torch.stack([self.val_tokens[s : s + self.context + 1] for s in starts])

    def model(self) -> nn.Module:
        _seeded(self.seed)
        return CausalTransformer(self.vocab, context=self.context)

    def _loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def step_loss(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | None]:
        starts = torch.randint(
            0,
            len(self.train_tokens) - self.context - 1,
            (self.batch_size,),
            generator=self.generator,
        )
        batch = torch.stack([self.train_tokens[s : s + self.context + 1] for s in starts])
        return self._loss(model, batch), None

    def final_metrics(
        self,
        model: nn.Module,
        losses: Tensor,
        extras: Tensor | None,
    ) -> dict[str, float]:
        with torch.no_grad():
            return {"val_loss": float(self._loss(model, self.val_batch))}


class CharLM(_LanguageModel):
    """Byte-level causal transformer on text that ships with Python (stand-in for TinyStories)."""

    name = "charlm"
    description = "byte-level 2-layer transformer (d=64, context 64) on Python's own text files"
    full_steps = 400
    quick_steps = 40

    def _tokens(self) -> tuple[Tensor, Tensor]:
        corpus = torch.frombuffer(bytearray(datasets.byte_corpus()), dtype=torch.uint8).long()
        split = int(len(corpus) * 0.95)
        return corpus[:split], corpus[split:]


class TinyStories(_LanguageModel):
    """The llama2.c TinyStories pipeline's pretokenised shards, read from ``--data-dir``."""

    name = "tinystories"
    description = "TinyStories llama2.c .bin shards from --data-dir (small transformer)"
    full_steps = 2000
    quick_steps = 50
    needs_data_dir = True
    vocab = 32_000

    @classmethod
    def check_data(cls, data_dir: str) -> None:
        datasets.token_shard_paths(data_dir)

    def _tokens(self) -> tuple[Tensor, Tensor]:
        if self.data_dir is None:
            raise datasets.DataError("task 'tinystories' needs --data-dir with .bin shards")
        train, val = datasets.read_token_shards(self.data_dir, min_tokens=self.context + 2)
        largest = int(max(train.max(), val.max()))
        if largest >= self.vocab:
            raise datasets.DataError(f"TinyStories: token id {largest} >= vocabulary {self.vocab}")
        return train, val


class ContinualDigits(Task):
    """The paper's non-stationary protocol at small scale (§7.2).

    Digits are split into 5 two-class tasks that share one 2-way head (labels remapped per
    task, as in the paper's class-incremental CIFAR-100 code). Tasks arrive in sequence, twice
    round, with abrupt and unsignalled switches; batch size 1; every sample is seen once.
    Reports online (prequential) accuracy and each task's test accuracy at its end.
    """

    name = "continual-digits"
    stationary = False
    description = "5 two-class digit tasks x 2 rounds, unsignalled switches, batch 1, online acc"
    metric = "online_accuracy"
    higher_is_better = True
    full_steps = 2000
    quick_steps = 300
    lr_grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    rounds = 2

    def __init__(self, seed: int, steps: int, data_dir: str | None = None) -> None:
        super().__init__(seed, steps, data_dir)
        x_train, y_train, x_test, y_test = datasets.digits()
        order = torch.randperm(10, generator=self.generator)
        self.pairs = [order[2 * k : 2 * k + 2] for k in range(5)]
        blocks = 5 * self.rounds
        self.per_task = max(1, math.ceil(steps / blocks))
        xs, ys = [], []
        self.test_sets = []
        for block in range(blocks):
            pair = self.pairs[block % 5]
            pool = torch.nonzero((y_train == pair[0]) | (y_train == pair[1])).flatten()
            pick = pool[torch.randint(0, len(pool), (self.per_task,), generator=self.generator)]
            xs.append(x_train[pick])
            ys.append((y_train[pick] == pair[1]).long())
        for pair in self.pairs:
            mask = (y_test == pair[0]) | (y_test == pair[1])
            self.test_sets.append((x_test[mask], (y_test[mask] == pair[1]).long()))
        self.stream_x = torch.cat(xs)[:steps]
        self.stream_y = torch.cat(ys)[:steps]
        self.end_of_task_accuracy: list[float] = []

    def model(self) -> nn.Module:
        _seeded(self.seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2))

    def step_loss(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | None]:
        logits = model(self.stream_x[step : step + 1])
        target = self.stream_y[step : step + 1]
        # Prequential: the prediction is scored before the model learns from the sample.
        correct = (logits.detach().argmax(1) == target).float().squeeze(0)
        return F.cross_entropy(logits, target), correct

    def after_step(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.per_task == 0 or step + 1 == self.steps:
            x, y = self.test_sets[(step // self.per_task) % 5]
            with torch.no_grad():
                accuracy = (model(x).argmax(1) == y).float().mean()
            self.end_of_task_accuracy.append(float(accuracy))

    def final_metrics(
        self,
        model: nn.Module,
        losses: Tensor,
        extras: Tensor | None,
    ) -> dict[str, float]:
        assert extras is not None
        return {
            "online_accuracy": float(extras.mean()),
            "mean_end_of_task_accuracy": sum(self.end_of_task_accuracy)
            / max(1, len(self.end_of_task_accuracy)),
        }


class Cifar10(Task):
    """A small CNN on CIFAR-10 read from ``--data-dir`` (python pickle batches)."""

    name = "cifar10"
    description = "small CNN on CIFAR-10 python batches from --data-dir"
    metric = "test_accuracy"
    higher_is_better = True
    full_steps = 2000
    quick_steps = 50
    needs_data_dir = True
    batch_size = 64

    @classmethod
    def check_data(cls, data_dir: str) -> None:
        datasets.cifar10_paths(data_dir)

    def __init__(self, seed: int, steps: int, data_dir: str | None = None) -> None:
        super().__init__(seed, steps, data_dir)
        if data_dir is None:
            raise datasets.DataError("task 'cifar10' needs --data-dir with cifar-10-batches-py")
        self.x_train, self.y_train, self.x_test, self.y_test = datasets.read_cifar10(data_dir)

    def model(self) -> nn.Module:
        _seeded(self.seed)
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def step_loss(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | None]:
        index = torch.randint(0, len(self.x_train), (self.batch_size,), generator=self.generator)
        return F.cross_entropy(model(self.x_train[index]), self.y_train[index]), None

    def final_metrics(
        self,
        model: nn.Module,
        losses: Tensor,
        extras: Tensor | None,
    ) -> dict[str, float]:
        correct, total = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.x_test), 1000):
                x, y = self.x_test[start : start + 1000], self.y_test[start : start + 1000]
                correct += float((model(x).argmax(1) == y).sum())
                total += len(y)
        return {"test_accuracy": correct / max(1, total)}


TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (
        Quadratic,
        Tracking,
        DigitsMLP,
        DigitsCNN,
        CharLM,
        ContinualDigits,
        Cifar10,
        TinyStories,
    )
}


def get_task(name: str) -> type[Task]:
    """The task class registered under ``name``.

    Raises:
        ValueError: unknown task.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def describe() -> list[dict[str, Any]]:
    """One row per task for ``metaoptimize list``."""
    return [
        {
            "name": t.name,
            "metric": t.metric,
            "better": "higher" if t.higher_is_better else "lower",
            "needs_data_dir": t.needs_data_dir,
            "description": t.description,
        }
        for t in TASKS.values()
    ]
