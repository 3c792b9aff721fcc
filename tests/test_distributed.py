"""DDP, FSDP2 and ZeRO on 2 CPU ranks (gloo) equal a single-process run on the full batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_scenarios
from dist_scenarios import SCENARIOS, single_process

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
WORLD = 2
CASES = [
    (name, blocks) for name, (_, modes) in SCENARIOS.items() for blocks in modes if name != "guard"
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(
        dist_scenarios.worker, args=(WORLD, str(out), str(out / "init")), nprocs=WORLD, join=True
    )
    return out


def _load(results: Path, name: str, blocks: str, rank: int) -> dict[str, list[torch.Tensor]]:
    assert (results / f"{name}-{blocks}.done").is_file()
    loaded: dict[str, list[torch.Tensor]] = torch.load(
        results / f"{name}-{blocks}-{rank}.pt", weights_only=True
    )
    return loaded


@pytest.mark.parametrize(("name", "blocks"), CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_equals_single_process_on_the_full_batch(results: Path, name: str, blocks: str) -> None:
    params, sizes = single_process(blocks)
    for rank in range(WORLD):
        got = _load(results, name, blocks, rank)
        for mine, reference in zip(got["params"], params, strict=True):
            torch.testing.assert_close(mine, reference, rtol=0, atol=1e-9)
        if name != "zero" or blocks != "tensor":  # ZeRO's tensor blocks are rank-local
            assert len(got["sizes"]) == len(sizes)
            for mine, reference in zip(got["sizes"], sizes, strict=True):
                torch.testing.assert_close(mine, reference, rtol=0, atol=1e-9)
    # the step sizes really moved, so the meta-gradient reduction was exercised
    moved = torch.cat([s.flatten() for s in sizes])
    assert (moved - 0.01).abs().max() > 1e-3


@pytest.mark.parametrize(("name", "blocks"), CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_ranks_agree_and_resume_is_exact(results: Path, name: str, blocks: str) -> None:
    ranks = [_load(results, name, blocks, rank) for rank in range(WORLD)]
    for rank_result in ranks:
        for resumed, uninterrupted in zip(
            rank_result["resumed_params"], rank_result["params"], strict=True
        ):
            assert torch.equal(resumed, uninterrupted)
        for resumed, uninterrupted in zip(
            rank_result["resumed_sizes"], rank_result["sizes"], strict=True
        ):
            assert torch.equal(resumed, uninterrupted)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    if name != "zero" or blocks != "tensor":
        for a, b in zip(ranks[0]["sizes"], ranks[1]["sizes"], strict=True):
            assert torch.equal(a, b)


def test_fsdp2_keeps_only_the_local_shard_of_the_trace(results: Path) -> None:
    numels = [_load(results, "fsdp2", "scalar", rank)["local_trace_numel"] for rank in range(WORLD)]
    # hidden.weight (4x5), hidden.bias (4), out.weight (1x4), out.bias (1): rank 1 holds no row
    # of the output layer, an empty shard that must still join the collective.
    assert numels[0] == [10, 2, 4, 1]
    assert numels[1] == [10, 2, 0, 0]


@pytest.mark.parametrize("blocks", ["scalar", "weight"])
def test_a_non_finite_shard_on_one_rank_is_skipped_on_every_rank(
    results: Path, blocks: str
) -> None:
    ranks = [
        torch.load(results / f"guard-{blocks}-{rank}.pt", weights_only=True)
        for rank in range(WORLD)
    ]
    params, sizes = single_process(blocks)  # the same 12 batches without the poisoned step
    for got in ranks:
        assert got["skipped"] == 1
        for mine, reference in zip(got["params"], params, strict=True):
            torch.testing.assert_close(mine, reference, rtol=0, atol=1e-9)
        for mine, reference in zip(got["sizes"], sizes, strict=True):
            torch.testing.assert_close(mine, reference, rtol=0, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp2.py"])
def test_examples_run_under_torchrun(script: str) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / script
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(example),
            "--steps",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 20" in result.stdout
    assert ("ranks agree: True" in result.stdout) or ("restored exactly: True" in result.stdout)
