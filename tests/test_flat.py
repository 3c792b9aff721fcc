"""Small CPU tensors stepped as one flat tensor (metaoptimize._kernels.flat).

The default CPU path merges a bucket's small tensors: their state lives in flat buffers whose
views are the state dict's entries. The oracle is the per-tensor kernel with host scalars
(``foreach=False``, which merges nothing), in float64.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers import DTYPE, TinyNet, batches, flat_step_sizes, nan_out_bias, step_together
from metaoptimize import MetaOptimize
from metaoptimize._kernels.flat import FLAT_MAX_NUMEL, FlatState, flat_member
from metaoptimize._types import Entry


def _pair(**kwargs: Any) -> tuple[TinyNet, MetaOptimize, TinyNet, MetaOptimize]:
    """(per-tensor oracle, merged) on equal models."""
    oracle_model, model = TinyNet(), TinyNet()
    oracle = MetaOptimize(oracle_model.parameters(), **{**kwargs, "foreach": False})
    merged = MetaOptimize(model.parameters(), **kwargs)
    return oracle_model, oracle, model, merged


def _assert_equal(
    oracle_model: nn.Module,
    oracle: MetaOptimize,
    model: nn.Module,
    opt: MetaOptimize,
    rtol: float = 1e-12,
) -> None:
    for a, b in zip(oracle_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * 1e-2)
        assert oracle.state[a].keys() == opt.state[b].keys()
        for key, value in oracle.state[a].items():
            torch.testing.assert_close(opt.state[b][key], value, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(flat_step_sizes(opt), flat_step_sizes(oracle), rtol=rtol, atol=0)


def _train_against_the_oracle(
    models: list[nn.Module], input_shape: tuple[int, ...], steps: int
) -> tuple[MetaOptimize, MetaOptimize]:
    """Train two equal models, the first per tensor (the oracle), the second by default."""
    oracle = MetaOptimize(models[0].parameters(), foreach=False, weight_decay=0.01)
    opt = MetaOptimize(models[1].parameters(), weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(input_shape, generator=generator, dtype=DTYPE)
        for model, o in zip(models, (oracle, opt), strict=True):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    _assert_equal(models[0], oracle, models[1], opt)
    return oracle, opt


def _merged(opt: MetaOptimize, p: Tensor) -> bool:
    """Whether ``p``'s state lives in flat buffers."""
    return opt.state[p]["exp_avg" if "exp_avg" in opt.state[p] else "trace"]._base is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_decay": 0.01},  # the defaults: AdamW, the auto meta rule, one step size
        {"weight_decay": 0.01, "blocks": "weight"},
        {"meta": "lion", "blocks": "weight", "alpha0": 1e-3, "gamma": 0.99},
        {"base": "adam", "meta": "adam", "weight_decay": 0.05, "blocks": "group"},
        {"base": "rmsprop", "meta": "sgd", "weight_decay": 0.05, "alpha0": 1e-3},
        {"base": "sgdm", "meta": "lion", "blocks": "weight", "alpha0": 1e-2},
        {"base": "lion", "meta": "fixed", "weight_decay": 0.1, "alpha0": 1e-3},
        {"base": "adamw", "weight_decay": 0.01, "foreach": True},
    ],
    ids=["defaults", "weight", "lion-weight", "adam-l2", "rmsprop", "sgdm", "lion", "foreach"],
)
def test_merged_steps_equal_the_per_tensor_kernel_in_float64(kwargs: dict[str, Any]) -> None:
    oracle_model, oracle, model, opt = _pair(**kwargs)
    for batch in batches(8):
        step_together([(oracle_model, oracle), (model, opt)], batch)
        _assert_equal(oracle_model, oracle, model, opt)
    if kwargs.get("base") != "lion" or kwargs.get("meta") != "fixed":  # Lion w/o trace: 1 key
        assert all(_merged(opt, p) for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "kernel"),
    [
        ({}, "host"),  # one merged tensor: the per-tensor kernel (fewer passes)
        ({"blocks": "weight"}, "foreach"),  # measured faster there
        ({"foreach": True}, "foreach"),  # asked for
    ],
)
def test_the_kernel_of_a_merged_bucket(kwargs: dict[str, Any], kernel: str) -> None:
    model = TinyNet()
    opt = MetaOptimize(model.parameters(), weight_decay=0.01, **kwargs)
    ran: list[tuple[str, int]] = []
    run = opt._kernels.run

    def spy(bucket: Any, scalars: Any) -> None:
        ran.append((bucket.kernel, len(bucket.entries)))
        run(bucket, scalars)

    opt._kernels.run = spy  # type: ignore[method-assign]
    step_together([(model, opt)], batches(1)[0])
    assert ran == [(kernel, 1)]


def test_two_small_tensors_merge_unless_foreach_is_off() -> None:
    """One linear layer (the plan runs two small tensors per tensor): merged by default, not
    with ``foreach=False``, which asks for one step per tensor."""
    models = [nn.Linear(5, 3).to(DTYPE) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    oracle, opt = _train_against_the_oracle(models, (8, 5), steps=5)
    assert all(_merged(opt, p) for p in models[1].parameters())
    assert not any(_merged(oracle, p) for p in models[0].parameters())


def test_tensor_blocks_merge_nothing() -> None:
    """Each tensor its own block: no part of two, so every tensor steps on its own."""
    oracle_model, oracle, model, opt = _pair(blocks="tensor", weight_decay=0.01)
    for batch in batches(4):
        step_together([(oracle_model, oracle), (model, opt)], batch)
    _assert_equal(oracle_model, oracle, model, opt)
    assert not any(_merged(opt, p) for p in model.parameters())


def test_steps_taken_apart_split_by_step_count() -> None:
    """A step without the output bias's gradient: the counts differ, and the other three
    tensors go on merged while the bias steps on its own."""
    oracle_model, oracle, model, opt = _pair(weight_decay=0.01)

    def drop_bias(m: nn.Module) -> None:
        m.out.bias.grad = None  # type: ignore[union-attr]

    for index, batch in enumerate(batches(6)):
        step_together(
            [(oracle_model, oracle), (model, opt)], batch, drop_bias if index == 2 else None
        )
        _assert_equal(oracle_model, oracle, model, opt)
    assert {opt.state[p]["step"].item() for p in model.parameters()} == {5.0, 6.0}
    parts, rest = list(opt._kernels.flat._kept.values())[-1]
    assert [len(positions) for positions, _ in parts] == [3]
    assert len(rest) == 1


def test_merging_stops_where_the_tensors_with_gradients_keep_changing() -> None:
    """A different tensor without a gradient on every step (a mixture of experts, say) would
    rebuild the flat state every step: merging stops, and the steps stay exact."""
    oracle_model, oracle, model, opt = _pair(weight_decay=0.01)
    tensors = ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]

    def drop(index: int) -> Any:
        def tamper(m: nn.Module) -> None:
            m.get_parameter(tensors[index % 4]).grad = None

        return tamper

    for index, batch in enumerate(batches(16)):
        step_together([(oracle_model, oracle), (model, opt)], batch, drop(index))
        _assert_equal(oracle_model, oracle, model, opt)
    assert not opt._kernels.flat.enabled
    stable_model = TinyNet()
    stable = MetaOptimize(stable_model.parameters(), weight_decay=0.01)
    for batch in batches(16):
        step_together([(stable_model, stable)], batch)
    assert stable._kernels.flat.enabled


def test_a_skipped_step_changes_nothing() -> None:
    oracle_model, oracle, model, opt = _pair(weight_decay=0.01, blocks="weight")
    for index, batch in enumerate(batches(5)):
        tamper = nan_out_bias if index == 3 else None
        step_together([(oracle_model, oracle), (model, opt)], batch, tamper)
        _assert_equal(oracle_model, oracle, model, opt)
    assert opt.skipped_steps.item() == 1


def test_changes_made_between_steps_are_seen() -> None:
    """Weights edited in place (also through ``.data``, which no version counter sees), a
    replaced state entry, a new learning rate and reset step counts all reach the next merged
    step."""
    oracle_model, oracle, model, opt = _pair(weight_decay=0.01)
    data = batches(7)
    for index, batch in enumerate(data):
        if index == 2:
            for m in (oracle_model, model):
                m.hidden.weight.data.mul_(0.5)
        if index == 3:
            for m, o in ((oracle_model, oracle), (model, opt)):
                o.state[m.out.weight]["exp_avg"] = torch.zeros_like(m.out.weight)
        if index == 4:
            for o in (oracle, opt):
                o.param_groups[0]["lr"] = 0.3
        if index == 5:  # the step counts reset in place (the bias corrections start over)
            for m, o in ((oracle_model, oracle), (model, opt)):
                for p in m.parameters():
                    o.state[p]["step"].zero_()
        step_together([(oracle_model, oracle), (model, opt)], batch)
        _assert_equal(oracle_model, oracle, model, opt)
    assert all(_merged(opt, p) for p in model.parameters())  # rebuilt after the replacement


def test_state_dict_round_trip_and_resume() -> None:
    """Saved with torch.save, loaded into a new optimizer and into itself: the runs go on as
    one uninterrupted run does."""
    oracle_model, oracle, model, opt = _pair(weight_decay=0.01, blocks="weight")
    data = batches(8)
    for batch in data[:4]:
        step_together([(oracle_model, oracle), (model, opt)], batch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = TinyNet()
    resumed_model.load_state_dict(saved["model"])
    resumed = MetaOptimize(resumed_model.parameters(), weight_decay=0.01, blocks="weight")
    resumed.load_state_dict(saved["opt"])
    opt.load_state_dict(opt.state_dict())  # into itself: new state dicts
    for batch in data[4:]:
        step_together([(oracle_model, oracle), (model, opt), (resumed_model, resumed)], batch)
    _assert_equal(oracle_model, oracle, model, opt)
    _assert_equal(oracle_model, oracle, resumed_model, resumed)


def test_a_state_dict_holds_its_own_tensors() -> None:
    """The saved entries are copies, each with its own storage, equal to the live state."""
    model = TinyNet()
    opt = MetaOptimize(model.parameters(), weight_decay=0.01, blocks="weight")
    for batch in batches(2):
        step_together([(model, opt)], batch)
    saved = opt.state_dict()["state"]
    storages = set()
    for index, p in enumerate(model.parameters()):
        assert _merged(opt, p)
        for key, value in saved[index].items():
            torch.testing.assert_close(value, opt.state[p][key], rtol=0, atol=0)
            assert not value._is_view()
            storages.add(value.untyped_storage().data_ptr())
    assert len(storages) == sum(len(s) for s in saved.values())


def test_a_deep_copy_continues_the_run_bitwise() -> None:
    model = TinyNet()
    opt = MetaOptimize(model.parameters(), weight_decay=0.01)
    data = batches(6)
    for batch in data[:3]:
        step_together([(model, opt)], batch)
    copied_model, copied = copy.deepcopy((model, opt))
    for batch in data[3:]:
        step_together([(model, opt), (copied_model, copied)], batch)
    _assert_equal(model, opt, copied_model, copied, rtol=0)


def test_entries_that_are_not_merged() -> None:
    """Large tensors, bfloat16 weights, a bfloat16 trace and a learned weight decay's trace
    keep their own kernels."""

    def entry(param: Tensor, state: dict[str, Any]) -> Entry:
        return Entry({}, param, torch.zeros_like(param), state, 0, 1.0)

    small = torch.zeros(3, 4, dtype=DTYPE)
    assert flat_member(entry(small, {"exp_avg": torch.zeros_like(small)}))
    assert flat_member(entry(small, {"step": torch.zeros((), dtype=DTYPE)}))
    large = torch.zeros(FLAT_MAX_NUMEL + 1)
    assert not flat_member(entry(large, {}))
    half = torch.zeros(3, dtype=torch.bfloat16)
    assert not flat_member(entry(half, {}))
    assert not flat_member(entry(small, {"trace": torch.zeros_like(small, dtype=torch.bfloat16)}))
    assert not flat_member(entry(small, {"wd_trace": torch.zeros_like(small)}))
    assert not flat_member(entry(small, {"exp_avg": torch.zeros(4, 3, dtype=DTYPE)}))


def test_flat_state_notices_replaced_entries_keys_and_counts() -> None:
    params = [torch.zeros(3, dtype=DTYPE), torch.ones(2, 2, dtype=DTYPE)]
    states: list[dict[str, Any]] = [
        {"step": torch.tensor(4.0, dtype=DTYPE), "exp_avg": torch.full_like(p, float(i))}
        for i, p in enumerate(params)
    ]
    entries = [Entry({}, p, p * 2.0, s, 0, 1.0) for p, s in zip(params, states, strict=True)]
    flat = FlatState(entries, block=0)
    assert flat.buffers["exp_avg"].tolist() == [0.0] * 3 + [1.0] * 4
    assert states[1]["exp_avg"].shape == (2, 2)
    assert flat.current(entries)
    assert flat.count() == 4.0
    merged = flat.gather(entries)
    assert merged.param.tolist() == [0.0] * 3 + [1.0] * 4
    assert merged.grad.tolist() == [0.0] * 3 + [2.0] * 4
    assert merged.state["step"].item() == 4.0
    merged.param.add_(1.0)
    flat.scatter(entries)
    assert params[1].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert [s["step"].item() for s in states] == [5.0, 5.0]
    assert flat.count() == 5.0
    states[0]["step"].add_(1.0)  # a step taken by another kernel
    assert flat.count() is None
    states[1]["extra"] = torch.zeros(2, 2, dtype=DTYPE)  # a key added
    assert not flat.current(entries)
    del states[1]["extra"]
    assert flat.current(entries)
    entries[0].state = dict(states[0])  # a loaded state dict: new dicts
    assert not flat.current(entries)
    assert flat.holds_views()
    states[1]["exp_avg"] = torch.zeros(2, 2, dtype=DTYPE)  # an entry replaced
    assert not flat.holds_views()


def test_channels_last_and_zero_dim_parameters_merge() -> None:
    """A channels-last convolution weight and a 0-d parameter merge with the rest: the flat
    views follow each tensor's logical order, as its copies in and out do."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3).to(DTYPE, memory_format=torch.channels_last)
            self.temperature = nn.Parameter(torch.tensor(0.7, dtype=DTYPE))
            self.out = nn.Linear(4, 2).to(DTYPE)

        def forward(self, x: Tensor) -> Tensor:
            hidden = self.conv(x.contiguous(memory_format=torch.channels_last)).mean((2, 3))
            return self.out(hidden) * self.temperature

    models = [Net(), Net()]
    _, opt = _train_against_the_oracle(models, (4, 3, 6, 6), steps=6)
    assert all(_merged(opt, p) for p in models[1].parameters())
    assert models[1].conv.weight.is_contiguous(memory_format=torch.channels_last)
