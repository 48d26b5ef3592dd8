"""The "onecycle" schedule (SPRC's torch OneCycleLR, beta1 cycling included) in the training loop: step by step equal
to torch's OneCycleLR on a plain AdamW called as SPRC calls it, across resumes, and its settings checked."""
from __future__ import annotations

import json

import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR

from cirlib.train.loop import TrainConfig, checkpoint_dir, fit, read_metrics
from cirlib.train.schedules import make_scheduler
from cirlib.workbook import steps
from cirlib.workbook.config import Stage1Config
from test_train_loop import ToyTask, _assert_same_optimizer, _assert_same_state, _cfg, _optimizer_state, \
    _strip_time, _weights

STEPS_PER_EPOCH = 8  # ToyTask: 64 items, batch 8
LR, BETAS = 1e-2, (0.9, 0.98)  # SPRC's AdamW betas


def _sprc_values(n_steps: int, make) -> list[tuple[float, float]]:
    """(lr, beta1) of each of the first n_steps optimizer steps of SPRC's loop (optimizer.step, then
    scheduler.step) on a plain AdamW; `make(optimizer)` builds the scheduler as SPRC's code does."""
    p = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([{"params": [p], "lr": LR, "betas": BETAS, "eps": 1e-7, "weight_decay": 0.05}])
    scheduler = make(optimizer)
    values = []
    for _ in range(n_steps):
        values.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
        p.grad = torch.ones(1)
        optimizer.step()
        scheduler.step()
    return values


def _cirr(num_epochs: int = 2, momentum: bool = True) -> tuple[TrainConfig, object]:
    """SPRC's CIRR call: a cycle of 80 epochs whatever the run's length, pct_start 1/50, torch's div_factor."""
    cfg = _cfg(epochs=num_epochs, max_epoch=80, lr=LR, betas=BETAS, schedule="onecycle", onecycle_pct_start=1 / 50,
               onecycle_momentum=momentum, log_every=1)
    return cfg, lambda opt: OneCycleLR(opt, max_lr=LR, pct_start=1 / 50, steps_per_epoch=STEPS_PER_EPOCH, epochs=80,
                                       cycle_momentum=momentum)


def _fashioniq(num_epochs: int = 4) -> tuple[TrainConfig, object]:
    """SPRC's FashionIQ call: the run's own epochs (max_epoch None), pct_start 1.5/epochs, div_factor 100."""
    cfg = _cfg(epochs=num_epochs, max_epoch=None, lr=LR, betas=BETAS, schedule="onecycle",
               onecycle_pct_start=1.5 / num_epochs, onecycle_div_factor=100.0, log_every=1)
    return cfg, lambda opt: OneCycleLR(opt, max_lr=LR, pct_start=1.5 / num_epochs, div_factor=100.,
                                       steps_per_epoch=STEPS_PER_EPOCH, epochs=num_epochs)


def _logged(run) -> list[tuple[float, float | None]]:
    return [(r["lr"], r.get("beta1")) for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.parametrize("setting", ["cirr", "cirr_no_momentum", "fashioniq"])
def test_every_step_equals_torch_onecycle_as_sprc_calls_it(tmp_path, setting):
    cfg, sprc = {"cirr": _cirr, "cirr_no_momentum": lambda: _cirr(momentum=False), "fashioniq": _fashioniq}[setting]()
    result = fit(ToyTask(), cfg, tmp_path / "run")
    n = cfg.epochs * STEPS_PER_EPOCH
    assert result.global_step == n
    expected = _sprc_values(n, sprc)
    if setting == "cirr_no_momentum":
        assert {b for _, b in expected} == {BETAS[0]}
        expected = [(lr, None) for lr, _ in expected]  # beta1 is logged only when it cycles
    else:
        assert len({b for _, b in expected}) > n // 2  # beta1 does move
    assert _logged(tmp_path / "run") == expected  # exact, every step
    lrs = [lr for lr, _ in expected]
    assert lrs[0] < max(lrs) == pytest.approx(LR, rel=1e-3) and lrs[-1] < max(lrs)  # the rise, the peak, the fall
    epochs = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert [r["lr"] for r in epochs] == [lrs[(e + 1) * STEPS_PER_EPOCH - 1] for e in range(cfg.epochs)]


def test_resumed_runs_continue_with_the_same_lr_and_beta1(tmp_path):
    """Stopped mid-epoch (time budget, after step 1), then crashed in epoch 1 (resumed from step 8, inside the rise of
    SPRC's CIRR cycle): the same values, weights and optimizer state as an uninterrupted run."""
    cfg, _ = _cirr(num_epochs=3)
    straight = ToyTask()
    fit(straight, cfg, tmp_path / "straight")

    run = tmp_path / "resumed"
    stopped = fit(ToyTask(), TrainConfig(**{**cfg.to_dict(), "time_budget_s": 1e-9}), run)
    assert stopped.status == "time_budget" and stopped.global_step == 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(ToyTask(fail_at_step=(STEPS_PER_EPOCH - 1) + 4), cfg, run)  # the rest of epoch 0, then 4 steps of 1
    assert json.loads((checkpoint_dir(run, "last") / "info.json").read_text())["global_step"] == STEPS_PER_EPOCH
    resumed = ToyTask()
    assert fit(resumed, cfg, run).status == "finished"

    assert _logged(run) == _logged(tmp_path / "straight")
    assert _strip_time(read_metrics(run)) == _strip_time(read_metrics(tmp_path / "straight"))
    _assert_same_state(_weights(resumed.model), _weights(straight.model))
    _assert_same_optimizer(_optimizer_state(run), _optimizer_state(tmp_path / "straight"))


def test_scheduler_built_at_a_step_has_that_steps_values():
    cfg, sprc = _fashioniq()
    expected = _sprc_values(4 * STEPS_PER_EPOCH, sprc)
    for step in (0, 5, 13, 31):
        optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=LR, betas=BETAS)
        make_scheduler(optimizer, cfg, STEPS_PER_EPOCH, global_step=step)
        assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]) == expected[step]


@pytest.mark.parametrize("fields, message", [
    (dict(onecycle_pct_start=0.02), r"onecycle_pct_start only apply to schedule='onecycle'"),
    (dict(onecycle_div_factor=100.0, onecycle_momentum=False),
     r"onecycle_div_factor, onecycle_momentum only apply to schedule='onecycle'"),
    (dict(schedule="onecycle", onecycle_pct_start=0.0), r"onecycle_pct_start must be in \(0, 1\), got 0.0"),
    (dict(schedule="onecycle", onecycle_pct_start=1.0), r"onecycle_pct_start must be in \(0, 1\), got 1.0"),
    (dict(schedule="onecycle", onecycle_div_factor=0.5), r"onecycle_div_factor must be >= 1, got 0.5"),
    (dict(schedule="onecycle", onecycle_final_div_factor=0), r"onecycle_final_div_factor must be >= 1, got 0"),
    (dict(schedule="onecycle", onecycle_momentum="yes"), r"onecycle_momentum must be True or False"),
    (dict(schedule="onecycle", min_lr=1e-6), r"min_lr=1e-06 is not used by schedule='onecycle'"),
    (dict(schedule="onecycle", epochs=50, max_epoch=40),
     r"cannot run past its cycle: max_epoch=40 epochs, epochs=50; set max_epoch >= epochs"),
])
def test_invalid_onecycle_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_a_cycle_whose_rise_is_one_step_is_refused_before_torch_divides_by_zero():
    cfg = TrainConfig(epochs=2, schedule="onecycle", onecycle_pct_start=0.25)
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match=r"onecycle_pct_start=0.25 puts exactly 1 of the cycle's 4 steps"):
        make_scheduler(optimizer, cfg, steps_per_epoch=2)


def test_a_longer_run_under_a_cycle_of_its_epochs_is_refused_without_a_max_epoch_hint(tmp_path):
    cfg, _ = _fashioniq(num_epochs=2)
    fit(ToyTask(), cfg, tmp_path / "run")
    longer = TrainConfig(**{**cfg.to_dict(), "epochs": 3})
    with pytest.raises(ValueError, match=r"horizon \(max_epoch\): 2 epochs in the run vs 3 now") as err:
        fit(ToyTask(), longer, tmp_path / "run")
    assert "set max_epoch" not in str(err.value)  # max_epoch=2 with epochs=3 would be refused: no such advice


def test_stage1_config_passes_sprcs_schedule_to_the_loop():
    cfg = Stage1Config(epochs=50, max_epoch=80, schedule="onecycle", lr=1e-5, adam_beta2=0.98, adam_eps=1e-7,
                       onecycle_pct_start=0.02, onecycle_div_factor=25.0, onecycle_final_div_factor=10000.0,
                       onecycle_momentum=False)
    train = steps._stage1_train_config(cfg)
    assert (train.schedule, train.epochs, train.cosine_epochs, train.lr, train.betas, train.eps) == \
        ("onecycle", 50, 80, 1e-5, (0.9, 0.98), 1e-7)
    assert (train.onecycle_pct_start, train.onecycle_div_factor, train.onecycle_final_div_factor,
            train.onecycle_momentum) == (0.02, 25.0, 10000.0, False)
    with pytest.raises(ValueError, match="cannot run past its cycle"):
        steps._stage1_train_config(Stage1Config(epochs=30, max_epoch=20, schedule="onecycle"))
