"""MetaOptimize inside PyTorch Lightning, Accelerate, the transformers Trainer and TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metaoptimize import MetaOptimize
from metaoptimize.monitor import log_step_sizes, step_size_scalars

KWARGS: dict[str, Any] = {
    "base": "adamw",
    "meta": "lion",
    "alpha0": 1e-3,
    "meta_lr": 1e-2,
    "gamma": 0.99,
    "weight_decay": 0.01,
}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def _dataset(size: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(size, 4, generator=generator)
    return TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])


def _plain_training(steps: int, batch_size: int = 8) -> tuple[nn.Module, MetaOptimize]:
    model = _net()
    opt = MetaOptimize(model.parameters(), **KWARGS)
    batches = list(DataLoader(_dataset(), batch_size=batch_size, shuffle=False))
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


# Lightning reports environment facts (no GPU, few dataloader workers) as warnings.
LIGHTNING_WARNINGS = [
    "ignore::UserWarning",
    "ignore::DeprecationWarning",
    "ignore::ResourceWarning",
    "ignore::FutureWarning",  # raised inside lightning's pytree use with torch 2.13
]


@pytest.mark.filterwarnings(*LIGHTNING_WARNINGS)
def test_lightning_trains_logs_the_step_size_and_restores_state(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log_dict(step_size_scalars(self.optimizers()), on_step=True)
            return loss

        def configure_optimizers(self) -> MetaOptimize:
            return MetaOptimize(self.parameters(), **KWARGS)

    def trainer(steps: int, root: Path) -> Any:
        return lightning.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            deterministic=True,
        )

    def loader() -> DataLoader[Any]:
        return DataLoader(_dataset(), batch_size=8, shuffle=False)

    uninterrupted = Module()
    run = trainer(16, tmp_path / "a")
    run.fit(uninterrupted, loader())
    assert "step_size/all" in run.callback_metrics
    assert run.callback_metrics["step_size/all"].item() != pytest.approx(1e-3)

    # Resume: Lightning restores MetaOptimize's state exactly (step sizes, meta state, trace,
    # moments). Bitwise-identical *continued* training is not a Lightning guarantee: with a
    # plain DataLoader it restarts the epoch's data on resume (torch's AdamW diverges the
    # same way), so the restored state is what is compared here.
    first = Module()
    run = trainer(8, tmp_path / "b")
    run.fit(first, loader())
    checkpoint = tmp_path / "half.ckpt"
    run.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]
    resumed = Module()
    restore = trainer(8, tmp_path / "c")  # max_steps already reached: restore only
    restore.fit(resumed, loader(), ckpt_path=checkpoint)
    restored = restore.optimizers[0].state_dict()
    assert restored["param_groups"][0]["metaoptimize"]["log_alpha"].equal(
        saved["param_groups"][0]["metaoptimize"]["log_alpha"]
    )
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][index][key], value), key
    for a, b in zip(first.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    trainer(16, tmp_path / "d").fit(resumed, loader(), ckpt_path=checkpoint)
    assert all(torch.isfinite(p).all() for p in resumed.parameters())

    plain_model, _ = _plain_training(16)
    for a, b in zip(uninterrupted.net.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_accelerate_prepare_keeps_the_algorithm() -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = _net()
    opt = MetaOptimize(model.parameters(), **KWARGS)
    loader = DataLoader(_dataset(), batch_size=8, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    batches = list(loader)
    for step in range(16):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
    plain_model, plain_opt = _plain_training(16)
    for a, b in zip(model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert step_size_scalars(opt) == step_size_scalars(plain_opt)
    restored = MetaOptimize(_net().parameters(), **KWARGS)
    restored.load_state_dict(opt.state_dict())
    assert step_size_scalars(restored) == step_size_scalars(plain_opt)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_transformers_trainer_accepts_metaoptimize(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")

    class Regressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    dataset = [{"x": x, "labels": y} for x, y in _dataset()]
    model = Regressor()
    opt = MetaOptimize(model.parameters(), **KWARGS)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=16,
        per_device_train_batch_size=8,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        dataloader_drop_last=False,
        seed=0,
        data_seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset, optimizers=(opt, None)
    )
    trainer.train()
    sizes = step_size_scalars(trainer.optimizer)
    assert sizes["step_size/all"] != pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == 1.0  # a constant schedule leaves the multiplier at 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tensorboard_helper_writes_every_block(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _net()
    opt = MetaOptimize(model.named_parameters(), blocks="tensor", **KWARGS)
    writer = SummaryWriter(str(tmp_path))
    expected = {}
    for step, (x, y) in enumerate(DataLoader(_dataset(), batch_size=8)):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        expected[step] = log_step_sizes(writer, opt, step)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"step_size/{n}" for n, _ in model.named_parameters()}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert event.value == pytest.approx(expected[event.step][tag], rel=1e-6)


def test_step_size_scalars_rejects_other_optimizers() -> None:
    with pytest.raises(TypeError, match=r"Invalid optimizer: SGD holds no MetaOptimize"):
        step_size_scalars(torch.optim.SGD(_net().parameters(), lr=0.1))
