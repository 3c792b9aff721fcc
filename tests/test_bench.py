"""Harness pieces: tasks, real-data readers on generated files, optimizers, suite, report."""

from __future__ import annotations

import itertools
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from metaoptimize.bench import data as datasets
from metaoptimize.bench.optimizers import OPTIMIZERS, get_optimizer
from metaoptimize.bench.report import aggregate, summarize
from metaoptimize.bench.runner import RunConfig, run_one
from metaoptimize.bench.suite import DEFAULT_TASKS, compare_configs
from metaoptimize.bench.tasks import TASKS, ContinualDigits, Quadratic, Tracking


def _write_cifar(root: Path, per_batch: int = 6) -> tuple[np.ndarray, list[int]]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = [], []
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch_images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch_labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with (root / name).open("wb") as handle:
            pickle.dump(
                {b"data": batch_images, b"labels": batch_labels, b"batch_label": name.encode()},
                handle,
                protocol=2,
            )
        images.append(batch_images)
        labels += batch_labels
    return np.concatenate(images), labels


def test_cifar10_reader_reads_the_python_batches(tmp_path: Path) -> None:
    images, labels = _write_cifar(tmp_path / "cifar-10-batches-py")
    x_train, y_train, x_test, y_test = datasets.read_cifar10(tmp_path)  # parent folder works
    assert x_train.shape == (12, 3, 32, 32)
    assert x_test.shape == (6, 3, 32, 32)
    expected = torch.tensor(images[:12].reshape(12, 3, 32, 32), dtype=torch.float32) / 255
    assert torch.equal(x_train, expected)
    assert y_train.tolist() == labels[:12]
    assert y_test.tolist() == labels[12:]


@pytest.mark.parametrize(
    ("layout", "pattern"),
    [
        ("missing", r"is not a directory"),
        ("empty", r"expected data_batch_1\.\.5 and test_batch"),
        ("corrupt", r"cannot read"),
    ],
)
def test_cifar10_reader_errors(tmp_path: Path, layout: str, pattern: str) -> None:
    root = tmp_path / "cifar"
    if layout != "missing":
        root.mkdir()
    if layout == "corrupt":
        (root / "data_batch_1").write_bytes(b"not a pickle")
        (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(datasets.DataError, match=pattern):
        datasets.read_cifar10(root)


def test_token_shards_follow_llama2c(tmp_path: Path) -> None:
    val = np.array([1, 2, 65535, 4], dtype=np.uint16)
    train = np.arange(100, 140, dtype=np.uint16)
    val.tofile(tmp_path / "data00.bin")
    train.tofile(tmp_path / "data01.bin")
    got_train, got_val = datasets.read_token_shards(tmp_path)
    assert got_val.tolist() == val.tolist()  # first shard is validation, as in llama2.c
    assert got_train.tolist() == train.tolist()


def test_token_shard_errors(tmp_path: Path) -> None:
    with pytest.raises(datasets.DataError, match=r"no \.bin shards"):
        datasets.read_token_shards(tmp_path)
    (tmp_path / "data00.bin").write_bytes(b"abc")
    with pytest.raises(datasets.DataError, match=r"odd number of bytes"):
        datasets.read_token_shards(tmp_path)
    with pytest.raises(datasets.DataError, match=r"is not a directory"):
        datasets.read_token_shards(tmp_path / "nowhere")


def test_real_data_tasks_train_on_generated_files(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar", per_batch=70)
    record = run_one(
        RunConfig("cifar10", "mo-adamw-lion", steps=3, data_dir=str(tmp_path / "cifar"))
    )
    assert 0.0 <= record["metric"] <= 1.0
    shards = tmp_path / "stories"
    shards.mkdir()
    rng = np.random.default_rng(1)
    for index in range(2):
        rng.integers(0, 500, 4000, dtype=np.uint16).tofile(shards / f"data{index:02d}.bin")
    record = run_one(RunConfig("tinystories", "adamw", steps=2, data_dir=str(shards)))
    assert math.isfinite(record["metric"])


def test_quadratic_metric_is_zero_at_the_optimum() -> None:
    task = Quadratic(seed=0, steps=1)
    model = task.model()
    with torch.no_grad():
        model.w.copy_(task.optimum)
    assert task.final_metrics(model, torch.zeros(1), None)["suboptimality"] == pytest.approx(
        0.0, abs=1e-10
    )
    eigenvalues = torch.linalg.eigvalsh(task.hessian)
    assert float(eigenvalues.max() / eigenvalues.min()) == pytest.approx(100.0, rel=1e-3)


def test_tracking_targets_flip_one_sign_every_20_examples() -> None:
    task = Tracking(seed=3, steps=200)
    signs = []
    for block in range(10):
        x = task.inputs[20 * block : 20 * block + 20, :5]
        y = task.targets[20 * block : 20 * block + 20]
        signs.append(torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).round())
    assert torch.equal(signs[0], torch.ones(5))
    for before, after in itertools.pairwise(signs):
        assert int((before != after).sum()) == 1
        assert set(after.abs().tolist()) == {1.0}
    assert torch.equal(task.inputs[:, 5:] @ torch.zeros(15), torch.zeros(200))


def test_continual_digits_is_a_stream_of_two_class_tasks() -> None:
    task = ContinualDigits(seed=0, steps=100)
    assert task.per_task == 10
    assert set(task.stream_y.tolist()) == {0, 1}
    model = task.model()
    record_correct = []
    for step in range(100):
        _, correct = task.step_loss(model, step)
        assert correct is not None
        record_correct.append(float(correct))
        task.after_step(model, step)
    metrics = task.final_metrics(model, torch.zeros(100), torch.tensor(record_correct))
    assert metrics["online_accuracy"] == pytest.approx(sum(record_correct) / 100)
    assert len(task.end_of_task_accuracy) == 10


@pytest.mark.parametrize("task", sorted(t for t in TASKS if not TASKS[t].needs_data_dir))
def test_every_offline_task_trains_and_reports_its_metric(task: str) -> None:
    for optimizer in ("mo-adamw-lion-blockwise", "adamw"):
        record = run_one(RunConfig(task, optimizer, steps=5, log_every=2))
        assert math.isfinite(record["metric"])
        assert record["metric_name"] == TASKS[task].metric
        assert record["steps_completed"] == 5
        assert record["seed"] == 0
        assert "torch" in record["versions"]
    assert record["step_sizes"] == {}


def test_runs_are_deterministic() -> None:
    first = run_one(RunConfig("digits-mlp", "mo-adamw-adam", steps=20))
    second = run_one(RunConfig("digits-mlp", "mo-adamw-adam", steps=20))
    assert first["metric"] == second["metric"]
    assert first["curve"] == second["curve"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_runs(name: str) -> None:
    spec = get_optimizer(name)
    if spec.package:
        pytest.importorskip(
            {"dog-optimizer": "dog", "mechanic-pytorch": "mechanic_pytorch"}.get(
                spec.package, spec.package
            )
        )
    record = run_one(RunConfig("quadratic", name, steps=4))
    assert record["steps_completed"] >= 1


def test_compare_suite_shape() -> None:
    full = compare_configs()
    quick = compare_configs(seeds=1, quick=True)
    assert {c.task for c in full} == set(DEFAULT_TASKS)
    assert len({c.run_id() for c in full}) == len(full)
    assert len(quick) < len(full) / 2
    sensitivity = sorted({c.value for c in full if c.optimizer == "metaoptimize"})
    assert sensitivity == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    quick_sensitivity = sorted({c.value for c in quick if c.optimizer == "metaoptimize"})
    assert quick_sensitivity == [1e-6, 1e-3, 1e-1]  # the default alpha0 stays in the grid
    horizons = compare_configs(("charlm",), seeds=1, horizons=(1, 5))
    assert sorted({c.resolved().steps for c in horizons}) == [400, 2000]


def test_overall_table_ratios_to_the_tuned_baselines() -> None:
    from metaoptimize.bench.report import aggregate, overall

    records = []
    for optimizer, value, error, family in (
        ("adamw", 1e-3, 0.10, "fixed"),
        ("adamw", 1e-2, 0.05, "fixed"),
        ("adamw-cosine", 1e-2, 0.04, "schedule"),
        ("prodigy", 1.0, 0.06, "lr-free"),
        ("metaoptimize", 1e-3, 0.055, "metaoptimize"),
        ("metaoptimize", 1e-1, 0.10, "metaoptimize"),
    ):
        record = _record(optimizer, value, 0, 1.0 - error, family=family)
        record["config"]["task"] = "digits-mlp"
        record["curve"] = [2.3]
        records.append(record)
    table = {line["optimizer"]: line for line in overall(aggregate(records))}
    assert table["adamw"]["worst vs adamw"] == pytest.approx(1.0)
    assert table["adamw-cosine"]["worst vs adamw"] == pytest.approx(0.8)
    assert table["prodigy"]["median vs adamw-cosine"] == pytest.approx(1.5)
    assert table["metaoptimize"]["worst vs adamw"] == pytest.approx(1.1)  # default alpha0
    assert table["metaoptimize"]["within 1.1x of adamw"] == 1
    assert table["metaoptimize, worst alpha0"]["worst vs adamw"] == pytest.approx(2.0)
    assert table["prodigy"]["mean rank"] == 4.0


def _record(
    optimizer: str,
    value: float,
    seed: int,
    metric: float,
    family: str = "fixed",
    higher: bool = True,
) -> dict[str, Any]:
    return {
        "config": {"task": "t", "optimizer": optimizer, "value": value, "seed": seed},
        "family": family,
        "sweep_key": "lr" if family == "fixed" else "alpha0",
        "metric_name": "m",
        "higher_is_better": higher,
        "metric": metric,
        "time_per_step_ms": 1.0,
        "optimizer_state_mb": 0.5,
    }


def test_summary_picks_best_of_grid_and_counts_its_cost() -> None:
    records = [
        _record("adamw", 1e-3, 0, 0.8),
        _record("adamw", 1e-3, 1, 0.9),
        _record("adamw", 1e-2, 0, 0.95),
        _record("adamw", 1e-2, 1, math.nan),  # diverged once
        _record("adamw", 1e-1, 0, 0.5),
        _record("adamw", 1e-1, 1, 0.6),
        _record("mo-adamw-lion", 1e-6, 0, 0.99, "metaoptimize"),
        _record("mo-adamw-lion", 1e-4, 0, 0.7, "metaoptimize"),
    ]
    summary = summarize(aggregate(records))["t"]
    adamw = next(e for e in summary if e["optimizer"] == "adamw")
    assert adamw["value"] == 1e-3  # the lr with a diverged seed cannot win
    assert adamw["mean"] == pytest.approx(0.85)
    assert adamw["runs_used"] == 6
    assert adamw["setting"] == "lr=0.001 (best of 3)"
    meta = next(e for e in summary if e["optimizer"] == "mo-adamw-lion")
    assert meta["value"] == 1e-4  # the untuned default, not the best of its sweep
    assert meta["runs_used"] == 1
    assert [e["optimizer"] for e in summary] == ["adamw", "mo-adamw-lion"]


def test_runner_passes_a_closure_to_hessian_traces() -> None:
    """trace="hessian" takes its own gradient: the runner hands it the loss as a closure."""
    config = RunConfig("tracking", "mo-sgdm-adam", steps=20, options={"trace": "hessian"})
    record = run_one(config)
    assert record["steps_completed"] == 20
    assert not record["diverged"]
    (sizes,) = record["step_sizes"].values()
    assert sizes[-1] != sizes[0]  # the meta-gradient reached the step size


def test_blew_up_flags_a_rise_above_the_start_or_lost_progress() -> None:
    from metaoptimize.bench.runner import blew_up_curve

    assert not blew_up_curve([2.3, 1.0, 0.5, 0.1, 0.05])
    assert not blew_up_curve([2.3, 1.0, 0.5, 0.6, 0.55])  # noise, most progress kept
    assert blew_up_curve([2.3, 0.1, 1805.0, 2.3, 2.3])  # the spike of issue 19
    assert blew_up_curve([2.3, 0.01, 0.01, 0.01, 1.5])  # ends far above its best
    assert not blew_up_curve([2.3])


class _RunsCode:
    """A pickle payload that calls a function when unpickled (the attack to refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def _cifar_dir(tmp_path: Path, batch: object) -> Path:
    root = tmp_path / "cifar"
    root.mkdir()
    for name in ("data_batch_1", "test_batch"):
        with (root / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return root


def test_cifar10_reader_refuses_to_run_code_from_a_crafted_batch(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    root = _cifar_dir(tmp_path, {b"data": _RunsCode(marker), b"labels": [0]})
    with pytest.raises(datasets.DataError, match=r"data_batch_1: .*is not allowed"):
        datasets.read_cifar10(root)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("batch", "pattern"),
    [
        ([1, 2, 3], r"data_batch_1 is not a batch dict"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"not a multiple of 3072"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"not uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 99]}, r"2 ints in 0\.\.9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"2 ints in 0\.\.9"),
    ],
)
def test_cifar10_reader_names_the_file_of_a_malformed_batch(
    tmp_path: Path, batch: object, pattern: str
) -> None:
    with pytest.raises(datasets.DataError, match=pattern):
        datasets.read_cifar10(_cifar_dir(tmp_path, batch))


def test_token_shards_that_are_empty_or_shorter_than_the_context_are_named(
    tmp_path: Path,
) -> None:
    (tmp_path / "data00.bin").write_bytes(b"")
    with pytest.raises(datasets.DataError, match=r"data00\.bin holds 0 tokens"):
        datasets.read_token_shards(tmp_path)
    np.arange(30, dtype=np.uint16).tofile(tmp_path / "data00.bin")
    with pytest.raises(datasets.DataError, match=r"data00\.bin holds 30 tokens; its 90/10 split"):
        datasets.read_token_shards(tmp_path, min_tokens=20)
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "data01.bin")
    with pytest.raises(datasets.DataError, match=r"data00\.bin holds 30 tokens; need at least 66"):
        datasets.read_token_shards(tmp_path, min_tokens=66)
