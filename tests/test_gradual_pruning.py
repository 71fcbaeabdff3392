"""Gradual pruning: schedules, masks that follow them and stay fixed while training, and the Trainer callback."""

from __future__ import annotations

import pytest
import torch

import hf_optim
from hf_optim.compression.algorithms.nm import follows_nm
from hf_optim.compression.pruning import sparsity_report
from hf_optim.compression.schedule import ConstantSparsity, GradualPruner, GradualPruningCallback, PolynomialDecay
from hf_optim.compression.targets import linear_weight
from hf_optim.core.errors import ConfigError
from tests.helpers import tiny_model


def test_polynomial_decay_is_cubic_at_update_steps_and_holds_between():
    schedule = PolynomialDecay(initial_sparsity=0.1, final_sparsity=0.7, begin_step=10, end_step=50, frequency=10)
    assert [s for s in range(0, 70) if schedule.is_update_step(s)] == [10, 20, 30, 40, 50]
    for step in (10, 20, 30, 40):
        expected = 0.7 + (0.1 - 0.7) * (1 - (step - 10) / 40) ** 3
        assert schedule.sparsity_at(step) == pytest.approx(expected)
        assert schedule.sparsity_at(step + 9) == schedule.sparsity_at(step)
    assert schedule.sparsity_at(9) == 0.0 and schedule.sparsity_at(50) == schedule.sparsity_at(1000) == 0.7
    # an end step off the frequency grid is still an update step, so training ends at the final sparsity
    assert PolynomialDecay(0.0, 0.5, 0, 25, frequency=10).is_update_step(25)
    assert PolynomialDecay(0.0, 0.5, 0, 100, frequency=10, power=1).sparsity_at(55) == pytest.approx(0.25)


def test_constant_sparsity():
    schedule = ConstantSparsity(0.4, begin_step=3)
    assert [schedule.sparsity_at(s) for s in (2, 3, 100)] == [0.0, 0.4, 0.4]
    assert [s for s in range(10) if schedule.is_update_step(s)] == [3]


@pytest.mark.parametrize("make, message", [
    (lambda: PolynomialDecay(0.5, 0.2, 0, 10), "can only rise"),
    (lambda: PolynomialDecay(0.0, 1.0, 0, 10), r"final_sparsity=1.0 must be in \[0, 1\)"),
    (lambda: PolynomialDecay(0.0, 0.5, 10, 10), "begin_step < end_step"),
    (lambda: PolynomialDecay(0.0, 0.5, 0, 10, frequency=0), "frequency=0"),
    (lambda: ConstantSparsity(0.5, begin_step=-1), "begin_step=-1"),
])
def test_bad_schedules(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_pruner_checks_config_before_touching_weights():
    model = tiny_model("llama")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ConfigError, match="schedule ends at sparsity 0.5 but MagnitudeConfig asks for 0.6"):
        GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.6), ConstantSparsity(0.5))
    with pytest.raises(ConfigError, match="use MagnitudeConfig"):
        GradualPruner(model, hf_optim.WandaConfig(sparsity=0.5), ConstantSparsity(0.5))
    with pytest.raises(ConfigError, match="in_features=64"):
        GradualPruner(model, hf_optim.MagnitudeConfig(pattern="3:6"), ConstantSparsity(0.5))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def lm_batch(step: int) -> torch.Tensor:
    return torch.randint(2, 512, (4, 16), generator=torch.Generator().manual_seed(step))


def zero_masks(pruner: GradualPruner) -> list[torch.Tensor]:
    return [linear_weight(module) == 0 for _, module in pruner.targets]


def test_sgd_loop_follows_schedule_and_keeps_pruned_weights_zero():
    torch.manual_seed(0)
    model = tiny_model("llama")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    schedule = PolynomialDecay(0.1, 0.6, begin_step=2, end_step=8, frequency=2)
    pruner = GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.6), schedule)
    assert pruner.step(0) == 0.0 and pruner.masks is None
    previous = zero_masks(pruner)
    regrown = 0
    for step in range(1, 13):
        ids = lm_batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        # momentum moves pruned weights away from zero: the pruner must undo that
        regrown += sum(int((linear_weight(m)[old] != 0).sum()) for (_, m), old in zip(pruner.targets, previous))
        in_force = pruner.step(step)
        assert in_force == schedule.sparsity_at(step)
        for (name, module), old in zip(pruner.targets, previous):
            weight = linear_weight(module)
            assert int((weight == 0).sum()) == round(in_force * weight.numel()), (step, name)
            assert (weight[old] == 0).all(), (step, name)  # once pruned, always zero
        previous = zero_masks(pruner)
    assert regrown > 0
    assert sparsity_report(model)["sparsity"] == pytest.approx(0.6, abs=1e-4)  # per-layer rounding of one weight
    assert torch.count_nonzero(model.lm_head.weight) == model.lm_head.weight.numel()


def test_nm_and_global_gradual_pruning():
    model = tiny_model("llama")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=2)
    pruner = GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.5, pattern="2:4"), schedule)
    for step in range(0, 6):
        if step:
            ids = lm_batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        pruner.step(step)
        # N:M follows the schedule to the nearest 1/M: 0 -> 0.25 (3:4) at step 2 (s=0.4375) -> 0.5 (2:4)
        assert sparsity_report(model)["sparsity"] == round(schedule.sparsity_at(step) * 4) / 4
    for _, module in pruner.targets:
        assert follows_nm(linear_weight(module), 2, 4)

    model = tiny_model("llama")
    pruner = GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.5, scope="global"), ConstantSparsity(0.5, 1))
    pruner.step(1)
    report = sparsity_report(model)
    assert report["zeros"] == report["weights"] // 2 and len(set(report["layers"].values())) > 1


def test_pruner_created_mid_schedule_rebuilds_masks_from_the_weights():
    model = tiny_model("llama")
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=10, frequency=5)
    first = GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.5), schedule)
    first.step(5)
    pruned = zero_masks(first)
    resumed = GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.5), schedule)  # e.g. after a restart
    assert resumed.step(7) == schedule.sparsity_at(7)  # not an update step, but it has no masks yet
    with torch.no_grad():  # what an optimizer step does to the pruned weights
        for _, module in resumed.targets:
            module.weight.add_(0.01)
    resumed.step(8)
    assert all(torch.equal(now, old) for now, old in zip(zero_masks(resumed), pruned))


def test_trainer_callback(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = tiny_model("llama")
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=2)
    pruner = GradualPruner(model, hf_optim.MagnitudeConfig(sparsity=0.5), schedule)
    seen: dict[int, float] = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = sparsity_report(model)["sparsity"]

    data = [{"input_ids": ids, "labels": ids} for ids in lm_batch(0).repeat(6, 1)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2, weight_decay=0.1,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[GradualPruningCallback(pruner), Record()]).train()
    assert list(seen) == [1, 2, 3, 4, 5, 6]
    for step, sparsity in seen.items():
        assert sparsity == pytest.approx(schedule.sparsity_at(step), abs=1e-3), step
    final = sparsity_report(model)
    assert all(s == 0.5 for s in final["layers"].values())
