"""Run one configuration, or many in worker processes, and keep every finished run on disk.

A run's directory holds ``result.json``: the resolved configuration, seed, package versions,
metrics, a loss curve, step-size trajectories, time per step and memory. It is written
atomically when the run ends, so an interrupted run leaves nothing half-written and a rerun
skips every run whose ``result.json`` exists.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

from metaoptimize.bench.optimizers import MissingDependency, get_optimizer
from metaoptimize.bench.tasks import get_task
from metaoptimize.optimizer import MetaOptimize

__all__ = [
    "RunConfig",
    "RunOutcome",
    "blew_up_curve",
    "execute",
    "read_record",
    "run_one",
    "stored_record",
]

_OPTIONAL_PACKAGES = (
    "prodigyopt",
    "dadaptation",
    "dog-optimizer",
    "schedulefree",
    "mechanic-pytorch",
    "scikit-learn",
)


@dataclass
class RunConfig:
    """Everything that defines one run.

    Attributes:
        task: task name.
        optimizer: optimizer name (see ``metaoptimize list``).
        seed: seed for data order and initialisation.
        steps: number of optimizer steps; None means the task's default for the mode.
        value: the swept value (``lr`` or ``alpha0``); None means the optimizer's default.
        options: extra optimizer keyword arguments.
        quick: use the task's quick step budget when ``steps`` is None.
        data_dir: folder with real data for tasks that need it.
        log_every: record loss and step sizes every this many steps; 0 means about 100 points.
    """

    task: str
    optimizer: str
    seed: int = 0
    steps: int | None = None
    value: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    data_dir: str | None = None
    log_every: int = 0

    def resolved(self) -> RunConfig:
        """A copy with ``steps``, ``value`` and ``log_every`` filled in."""
        task = get_task(self.task)
        spec = get_optimizer(self.optimizer)
        steps = self.steps or (task.quick_steps if self.quick else task.full_steps)
        value = spec.default if self.value is None else self.value
        log_every = self.log_every or max(1, steps // 100)
        return RunConfig(
            self.task,
            self.optimizer,
            self.seed,
            steps,
            value,
            dict(self.options),
            self.quick,
            self.data_dir,
            log_every,
        )

    def run_id(self) -> str:
        """A readable relative path that identifies the run."""
        spec = get_optimizer(self.optimizer)
        resolved = self.resolved()
        parts = [self.task, self.optimizer.replace(":", "_")]
        if spec.sweep_key:
            parts.append(f"{spec.sweep_key}={resolved.value:.3g}")
        if self.options:
            parts.append(",".join(f"{k}={v}" for k, v in sorted(self.options.items())))
        parts.append(f"steps{resolved.steps}-seed{self.seed}")
        return "/".join(parts)


@dataclass
class RunOutcome:
    """What happened to one configuration."""

    config: RunConfig
    status: str  # "done", "cached", "skipped" or "failed"
    record: dict[str, Any] | None = None
    message: str = ""


def versions() -> dict[str, str]:
    """Versions of Python, torch, metaoptimize and the optional packages that are installed."""
    found = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    for package in ("metaoptimize", *_OPTIONAL_PACKAGES):
        if package in installed:
            found[package] = installed[package]
    return found


def _state_bytes(opt: Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        if isinstance(state, dict):
            total += sum(
                v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)
            )
    return total


def _step_size_snapshot(opt: Optimizer) -> dict[str, float]:
    if not isinstance(opt, MetaOptimize):
        return {}
    snapshot = {}
    for name, value in opt.step_sizes().items():
        # Per-weight step sizes are summarised by their geometric mean.
        snapshot[name] = float(value.log().mean().exp()) if value.dim() else float(value)
    return snapshot


def run_one(config: RunConfig) -> dict[str, Any]:
    """Train once and return the run's record (no files written).

    Raises:
        MissingDependency: the optimizer's optional package is not installed.
        metaoptimize.bench.data.DataError: the task's data could not be read.
    """
    config = config.resolved()
    assert config.steps is not None
    assert config.value is not None
    spec = get_optimizer(config.optimizer)
    task = get_task(config.task)(config.seed, config.steps, config.data_dir)
    model = task.model()
    params: Iterable[Any] = (
        model.named_parameters() if spec.family == "metaoptimize" else model.parameters()
    )
    opt, scheduler = spec.build(params, config.value, config.steps, dict(config.options))
    train_mode = getattr(opt, "train", None)
    if callable(train_mode):  # Schedule-Free's train/eval protocol
        train_mode()
    losses = torch.full((config.steps,), math.nan)
    extras: torch.Tensor | None = None
    trajectory: dict[str, list[float]] = {}
    trajectory_steps: list[int] = []
    diverged = False

    def record_step_sizes(step: int) -> None:
        snapshot = _step_size_snapshot(opt)
        if snapshot:
            trajectory_steps.append(step)
            for name, value in snapshot.items():
                trajectory.setdefault(name, []).append(value)

    record_step_sizes(0)
    start = time.perf_counter()
    completed = 0
    for step in range(config.steps):
        loss, extra = task.step_loss(model, step)
        opt.zero_grad(set_to_none=True)
        if getattr(opt, "requires_closure", False):
            # trace="hessian" takes the gradient (and Hessian-vector products) itself.
            closure: Any = functools.partial(_identity, loss)
            opt.step(closure)
        else:
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        if scheduler is not None:
            scheduler.step()
        losses[step] = loss.detach()
        if extra is not None:
            if extras is None:
                extras = torch.zeros(config.steps)
            extras[step] = extra
        task.after_step(model, step)
        completed = step + 1
        if completed % config.log_every == 0 or completed == config.steps:
            record_step_sizes(completed)
            # The runner (not the optimizer) reads values here, at log points only.
            if not math.isfinite(float(losses[step])):
                diverged = True
                break
    elapsed = time.perf_counter() - start
    eval_mode = getattr(opt, "eval", None)
    if callable(eval_mode):
        eval_mode()
    metrics = task.final_metrics(
        model, losses[:completed], None if extras is None else extras[:completed]
    )
    metric = metrics[task.metric]
    if diverged or not math.isfinite(metric):
        diverged = True
        metric = math.nan
    window = config.log_every
    chunks = losses[:completed].split(window)  # type: ignore[no-untyped-call]
    curve = [float(chunk.mean()) for chunk in chunks]
    blew_up = not diverged and task.stationary and blew_up_curve(curve)
    return {
        "config": asdict(config),
        "run_id": config.run_id(),
        "family": spec.family,
        "sweep_key": spec.sweep_key,
        "metric_name": task.metric,
        "higher_is_better": task.higher_is_better,
        "metric": metric,
        "metrics": metrics,
        "diverged": diverged,
        "blew_up": blew_up,
        "steps_completed": completed,
        "curve_every": window,
        "curve": curve,
        "step_size_steps": trajectory_steps,
        "step_sizes": trajectory,
        "time_per_step_ms": 1e3 * elapsed / max(1, completed),
        "optimizer_state_mb": _state_bytes(opt) / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seed": config.seed,
        "versions": versions(),
    }


def blew_up_curve(curve: list[float]) -> bool:
    """Whether a finite training-loss curve blew up (diverged runs are flagged separately).

    A curve blows up when, after its first 10%, it rises above its first point, or when it
    ends having lost more than half of its progress (final - best > (first - best) / 2).
    """
    if len(curve) < 2:
        return False
    first, best, final = curve[0], min(curve), curve[-1]
    settled = curve[max(1, len(curve) // 10) :]
    return max(settled) > first or final - best > 0.5 * (first - best)


def _identity(loss: torch.Tensor) -> torch.Tensor:
    """A closure that returns an already computed loss (its graph is still alive)."""
    return loss


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``path`` whole or not at all.

    The temporary name is unique to this writer, so two processes writing into one folder
    never share it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(json.dumps(payload, indent=1, allow_nan=True))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record stored at ``path``, or None with a warning naming the file.

    An empty or corrupted file must not block reports or reruns.
    """
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        warnings.warn(f"ignoring unreadable {path}: {error}", stacklevel=2)
        return None
    if not isinstance(record, dict) or "config" not in record or "metric" not in record:
        warnings.warn(f"ignoring {path}: not a run record", stacklevel=2)
        return None
    return record


def result_path(out_dir: Path, config: RunConfig) -> Path:
    """Where the record of ``config`` lives under ``out_dir``."""
    return out_dir / "runs" / config.run_id() / "result.json"


def _run_and_store(config: RunConfig, out_dir: str) -> RunOutcome:
    try:
        record = run_one(config)
    except MissingDependency as error:
        return RunOutcome(config, "skipped", message=str(error))
    except Exception as error:  # noqa: BLE001 - one failing run must not stop the others
        return RunOutcome(config, "failed", message=f"{type(error).__name__}: {error}")
    _write_atomic(result_path(Path(out_dir), config), record)
    return RunOutcome(config, "done", record)


def _init_worker() -> None:
    torch.set_num_threads(1)  # small models: one thread per worker process is fastest
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it (it
    # terminates the workers), so no worker dies with a traceback mid-run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def execute(
    configs: list[RunConfig],
    out_dir: Path,
    jobs: int = 1,
    on_outcome: Callable[[RunOutcome], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
) -> list[RunOutcome]:
    """Run ``configs``, skipping those already stored under ``out_dir``.

    Runs go to ``jobs`` worker processes (in this process when ``jobs`` is 1). Each finished
    run is written atomically as soon as it ends; a stored record that cannot be read is
    reported and run again. ``on_resume`` hears how many runs were already stored, before
    any outcome is reported. On KeyboardInterrupt the workers are terminated at once and the
    exception propagates, with every finished run kept.
    """
    outcomes: list[RunOutcome] = []
    pending: list[RunConfig] = []
    for config in configs:
        record = stored_record(out_dir, config)
        if record is not None:
            outcomes.append(RunOutcome(config, "cached", record))
        else:
            pending.append(config)
    if on_resume:
        on_resume(len(outcomes))
    for outcome in outcomes:
        if on_outcome:
            on_outcome(outcome)
    for outcome in _dispatch(pending, str(out_dir), jobs):
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    return outcomes


def stored_record(out_dir: Path, config: RunConfig) -> dict[str, Any] | None:
    """The finished record of ``config`` under ``out_dir``, if one is stored and readable."""
    path = result_path(out_dir, config)
    return read_record(path) if path.is_file() else None


def _run_and_store_star(arguments: tuple[RunConfig, str]) -> RunOutcome:
    return _run_and_store(*arguments)


def _dispatch(configs: list[RunConfig], out_dir: str, jobs: int) -> Iterator[RunOutcome]:
    if jobs <= 1 or len(configs) <= 1:
        for config in configs:
            yield _run_and_store(config, out_dir)
        return
    # multiprocessing.Pool rather than ProcessPoolExecutor: terminate() stops running workers
    # at once, where the executor lets every started run finish (tens of seconds).
    pool = get_context("spawn").Pool(min(jobs, len(configs)), initializer=_init_worker)
    try:
        work = [(config, out_dir) for config in configs]
        yield from pool.imap_unordered(_run_and_store_star, work, chunksize=1)
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()
