"""launcher.checkpoint.relaunch.reconcile and the schedule re-plan, without launching anything."""

from pathlib import Path

import pytest
import torch

from launcher.config import TrainConfig
from launcher.errors import UsageError
from launcher.checkpoint.relaunch import reconcile
from launcher.schedulers import replan, warmup_cosine

CKPT = Path("runs/x/checkpoints/step-00000023")


def stored(**changes):
    return TrainConfig(epochs=2, seed=1, batch_size=16, **changes).to_dict()


def test_keys_not_given_come_from_the_checkpoint():
    config, notices = reconcile({"output_dir": "runs/x"}, stored(), checkpoint=CKPT, mid_epoch=True,
                                eval_only=False)
    assert (config.epochs, config.seed, config.batch_size, config.output_dir) == (2, 1, 16, "runs/x")
    assert notices == []


def test_apply_keys_change_with_one_notice_each():
    config, notices = reconcile({"epochs": 4, "log_every": 5}, stored(), checkpoint=CKPT, mid_epoch=True,
                                eval_only=False)
    assert (config.epochs, config.log_every) == (4, 5)
    assert notices == ["relaunch: --epochs 2 -> 4 (applies from now on)",
                       "relaunch: --log-every 50 -> 5 (applies from now on)"]


@pytest.mark.parametrize("given,mid_epoch,needle", [
    ({"dataset": "other.csv"}, False, "--dataset other.csv differs from digits stored in"),
    ({"seed": 0}, False, "--seed 0 differs from 1 stored in"),
    ({"batch_size": 64}, True, "--batch-size 64 differs from 16 stored in"),
])
def test_refused_changes_name_the_key_and_the_stored_value(given, mid_epoch, needle):
    with pytest.raises(UsageError, match=needle):
        reconcile(given, stored(), checkpoint=CKPT, mid_epoch=mid_epoch, eval_only=False)


def test_batch_size_applies_at_an_epoch_boundary_and_eval_only_prints_no_notices():
    config, notices = reconcile({"batch_size": 64}, stored(), checkpoint=CKPT, mid_epoch=False, eval_only=False)
    assert config.batch_size == 64 and "re-planned" in notices[0]
    _, notices = reconcile({"eval_batch_size": 7, "eval_only": True, "resume": str(CKPT)}, stored(),
                           checkpoint=CKPT, mid_epoch=True, eval_only=True)
    assert notices == []


def test_a_loaded_cosine_keeps_the_old_length_until_replanned():
    """LambdaLR's state_dict carries its schedule object's attributes: total_steps comes back from a checkpoint."""
    def scheduler(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return warmup_cosine()(opt, total)

    old = scheduler(10)
    for _ in range(10):
        old.optimizer.step()
        old.step()
    new = scheduler(20)
    new.optimizer.load_state_dict(old.optimizer.state_dict())  # as a checkpoint restores both
    new.load_state_dict(old.state_dict())
    assert new.lr_lambdas[0].total_steps == 10 and new.get_last_lr()[0] == pytest.approx(0.0)
    assert replan(new, 20) == (10, pytest.approx(0.0), pytest.approx(0.5))
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.5) and new.get_last_lr()[0] == pytest.approx(0.5)
    assert replan(new, 20) is None  # an unchanged plan changes nothing
