"""The command line: exit codes, one-line errors, records, resume, Ctrl-C, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from metaoptimize import cli
from metaoptimize.bench import runner


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("metaoptimize: error: ")
    return err[0]


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["bogus"], "invalid choice"),
        ([], "required"),
        (["run", "--task", "nope", "--optimizer", "adamw"], "unknown task 'nope'"),
        (["run", "--task", "quadratic", "--optimizer", "nope"], "unknown optimizer 'nope'"),
        (
            ["run", "--task", "quadratic", "--optimizer", "mo-adamw-lion", "--set", "gamma=3"],
            "Invalid gamma: 3",
        ),
        (
            ["run", "--task", "quadratic", "--optimizer", "adamw", "--set", "warp=1"],
            "unexpected keyword argument 'warp'",
        ),
        (
            ["run", "--task", "quadratic", "--optimizer", "adamw", "--set", "novalue"],
            "--set expects key=value",
        ),
        (["run", "--task", "cifar10", "--optimizer", "adamw"], "pass --data-dir"),
        (
            ["run", "--task", "cifar10", "--optimizer", "adamw", "--data-dir", "/nonexistent"],
            "is not a directory",
        ),
        (
            ["sweep", "--task", "quadratic", "--optimizer", "adamw", "--values", "a,b"],
            "--values expects comma-separated numbers",
        ),
        (["sweep", "--task", "quadratic", "--optimizer", "prodigy"], "has no lr or alpha0"),
        (["compare", "--tasks", "quadratic", "--seeds", "0"], "--seeds must be at least 1"),
        (["compare", "--jobs", "0"], "--jobs must be at least 1"),
        (["compare", "--horizons", "0"], "every multiple must be at least 1"),
        (["compare", "--horizons", "1,x"], "expected comma-separated integers"),
        (["report", "/nonexistent"], "has no runs/ folder"),
        (
            ["run", "--task", "quadratic", "--optimizer", "adamw", "--steps", "x"],
            "invalid int value",
        ),
        (["run", "--task", "quadratic", "--optimizer", "adamw", "--steps", "0"], "at least 1"),
        (["sweep", "--task", "quadratic", "--optimizer", "adamw", "--steps", "-5"], "at least 1"),
        (["compare", "--tasks", ""], "--tasks is empty"),
        (["compare", "--tasks", " , "], "--tasks is empty"),
        (
            ["run", "--task", "quadratic", "--optimizer", "metaoptimize", "--value", "-1"],
            "Invalid alpha0: -1.0",
        ),
        (
            ["sweep", "--task", "quadratic", "--optimizer", "adamw", "--values", "0.1,-1"],
            "--values expects positive numbers",
        ),
        (
            ["run", "--task", "quadratic", "--optimizer", "metaoptimize", "--set", "alpha0=0.1"],
            "--set alpha0=... conflicts with the swept value",
        ),
        (
            ["sweep", "--task", "quadratic", "--optimizer", "adamw", "--set", "lr=0.1"],
            "--set lr=... conflicts with the swept value",
        ),
        (
            ["run", "--task", "quadratic", "--optimizer", "metaoptimize", "--set", "gamma=abc"],
            "(--set gamma='abc': not a number)",
        ),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    argv: list[str], pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert pattern in _error_line(capsys)


def test_list_shows_tasks_optimizers_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "tracking",
        "charlm",
        "mo-adamw-lion",
        "adamw-cosine",
        "prodigy",
        "cifar10-adamw-adam",
        "idbd",
    ):
        assert name in out


def test_run_writes_config_versions_and_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "run",
            "--task",
            "quadratic",
            "--optimizer",
            "mo-adamw-adam",
            "--steps",
            "30",
            "--seed",
            "3",
            "--value",
            "0.01",
            "--set",
            "meta_lr=0.05",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    (path,) = tmp_path.glob("runs/**/result.json")
    record = json.loads(path.read_text())
    assert record["seed"] == 3
    assert record["config"] == {
        "task": "quadratic",
        "optimizer": "mo-adamw-adam",
        "seed": 3,
        "steps": 30,
        "value": 0.01,
        "options": {"meta_lr": 0.05},
        "quick": False,
        "data_dir": None,
        "log_every": 1,
    }
    assert {"python", "torch", "metaoptimize"} <= set(record["versions"])
    assert record["step_sizes"]["all"][0] == pytest.approx(0.01)
    assert "suboptimality" in capsys.readouterr().out


def test_sweep_is_resumable_and_survives_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "sweep",
        "--task",
        "quadratic",
        "--optimizer",
        "adamw",
        "--values",
        "0.001,0.01,0.1",
        "--seeds",
        "0,1",
        "--steps",
        "20",
        "--jobs",
        "1",
        "--no-plots",
        "--out",
        str(tmp_path),
    ]
    real_run_one = runner.run_one
    calls = {"n": 0}

    def interrupted_on_third(config: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run_one(config)

    monkeypatch.setattr(runner, "run_one", interrupted_on_third)
    assert cli.main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(list(tmp_path.glob("runs/**/result.json"))) == 2
    assert not list(tmp_path.glob("runs/**/*.tmp"))

    monkeypatch.setattr(runner, "run_one", real_run_one)
    assert cli.main(argv) == 0
    assert len(list(tmp_path.glob("runs/**/result.json"))) == 6

    def must_not_run(config: Any) -> Any:
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(runner, "run_one", must_not_run)
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["rows"]) == 3
    assert (tmp_path / "results.csv").read_text().count("\n") == 4
    assert "best of 3" in (tmp_path / "report.md").read_text()


def test_missing_optional_baseline_is_skipped_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_prodigy(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prodigy)
    monkeypatch.setattr(
        "metaoptimize.bench.optimizers.importlib.import_module", lambda name: no_prodigy(name)
    )
    code = cli.main(
        [
            "compare",
            "--tasks",
            "quadratic",
            "--quick",
            "--jobs",
            "1",
            "--no-plots",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "note: skipped prodigy: prodigyopt is not installed" in out
    assert "skipped prodigy" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_quick_compare_writes_tables_report_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert cli.main(["compare", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("results.json", "results.csv", "report.md"):
        assert (tmp_path / name).is_file()
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "digits-mlp-sensitivity.png" in plots
    assert "tracking-step-sizes.png" in plots
    assert len(plots) == 18
    report = (tmp_path / "report.md").read_text()
    assert "## continual-digits" in report
    assert "![digits-cnn-curves](plots/digits-cnn-curves.png)" in report
    out = capsys.readouterr().out
    assert "digits-mlp: test_accuracy (higher is better)" in out
    # plot and report rebuild from the records alone
    for path in (tmp_path / "plots").glob("*.png"):
        path.unlink()
    (tmp_path / "report.md").unlink()
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert cli.main(["report", str(tmp_path)]) == 0
    assert len(list((tmp_path / "plots").glob("*.png"))) == 18
    assert "![tracking-sensitivity]" in (tmp_path / "report.md").read_text()


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "metaoptimize", "list", "presets"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0
    assert "tinystories-adamw-lion" in result.stdout


def _sweep_argv(out: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        "--task",
        "quadratic",
        "--optimizer",
        "adamw",
        "--values",
        "0.01,0.1",
        "--seeds",
        "1",
        "--steps",
        "10",
        "--jobs",
        "1",
        "--no-plots",
        "--out",
        str(out),
        *extra,
    ]


def test_an_out_that_is_a_file_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "run_one", _must_not_run)
    target = tmp_path / "file"
    target.write_text("")
    assert cli.main(_sweep_argv(target)) == 2
    assert "is a file, not a directory" in _error_line(capsys)


def _must_not_run(config: Any) -> Any:
    raise AssertionError("training started")


def test_a_second_process_writing_the_same_out_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path.joinpath(".metaoptimize.lock").write_text(str(os.getppid()))  # a live process
    monkeypatch.setattr(runner, "run_one", _must_not_run)
    assert cli.main(_sweep_argv(tmp_path)) == 2
    assert f"in use by another metaoptimize (pid {os.getppid()})" in _error_line(capsys)
    # a lock left by a process that has ended is taken over
    tmp_path.joinpath(".metaoptimize.lock").write_text("999999999")
    monkeypatch.undo()
    assert cli.main(_sweep_argv(tmp_path)) == 0
    assert not tmp_path.joinpath(".metaoptimize.lock").exists()


def test_a_corrupted_record_is_named_skipped_and_run_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_sweep_argv(tmp_path)) == 0
    records = sorted(tmp_path.glob("runs/**/result.json"))
    assert len(records) == 2
    records[0].write_text("")
    with pytest.warns(UserWarning, match=r"ignoring unreadable .*result\.json"):
        assert cli.main(["report", str(tmp_path)]) == 0
    with pytest.warns(UserWarning, match=r"ignoring unreadable"):
        assert cli.main(_sweep_argv(tmp_path)) == 0
    assert "1 of 2 runs already done, 1 to go" in capsys.readouterr().err
    assert json.loads(records[0].read_text())["metric"] is not None


def test_compare_without_out_resumes_the_latest_unfinished_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--tasks", "quadratic", "--quick", "--jobs", "1", "--no-plots"]
    real_run_one = runner.run_one
    calls = {"n": 0}

    def interrupted_on_fifth(config: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_run_one(config)

    monkeypatch.setattr(runner, "run_one", interrupted_on_fifth)
    assert cli.main(argv) == 130
    (folder,) = list((tmp_path / "runs").iterdir())
    assert not (folder / ".metaoptimize.lock").exists()
    capsys.readouterr()
    monkeypatch.setattr(runner, "run_one", real_run_one)
    assert cli.main(argv) == 0
    assert f"resuming {Path('runs') / folder.name}: 4 of" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == [folder]
    assert (folder / "report.md").is_file()


def test_ctrl_c_stops_parallel_workers_within_seconds(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "metaoptimize", *_sweep_argv(tmp_path)]
    argv[argv.index("--steps") + 1] = "100000"  # minutes of work per run
    argv[argv.index("--jobs") + 1] = "2"
    # A shell starts background jobs with SIGINT ignored and children inherit that (CI may run
    # this suite so); a terminal's foreground job, which this models, handles it.
    handled = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'metaoptimize'; runpy.run_module('metaoptimize', run_name='__main__')"
    )
    argv = [sys.executable, "-c", handled, *argv[3:]]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(12)  # the workers have started and are training
    assert process.poll() is None
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: the whole process group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert time.monotonic() - started < 10
    assert "interrupted" in err
    assert not list(tmp_path.glob("runs/**/*.tmp"))
    assert not list(tmp_path.glob("runs/**/result.json"))
