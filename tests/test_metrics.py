"""Metric formulas against scikit-learn, and the padding rule against Accelerate's own sharding."""

import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from launcher.loop import valid_in_batch
from launcher.tasks.classification import ConfusionStats, compute_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 6, (300,), generator=g)
    targets[targets == 4] = 2  # a class that never occurs as a label
    logits = torch.randn(300, 7, generator=g)  # and one that only occurs as a prediction
    losses = torch.rand(300, generator=g, dtype=torch.float64)
    stats = ConfusionStats(7, torch.device("cpu"))
    for chunk in range(0, 300, 37):  # batches that do not divide the data
        stats.update(losses[chunk:chunk + 37], logits[chunk:chunk + 37], targets[chunk:chunk + 37])
    m = stats.reduce()
    preds = logits.argmax(-1).numpy()
    p, r, f, _ = precision_recall_fscore_support(targets.numpy(), preds, average="macro", zero_division=0)
    assert m.samples == 300
    assert m.accuracy == pytest.approx(accuracy_score(targets.numpy(), preds), abs=1e-15)
    assert (m.precision, m.recall, m.f1) == pytest.approx((p, r, f), abs=1e-12)
    assert m.loss == pytest.approx(losses.mean().item(), abs=1e-12)
    assert m.confusion_matrix == confusion_matrix(targets.numpy(), preds, labels=range(7)).tolist()


def test_valid_slices_drop_padding():
    stats = ConfusionStats(3, torch.device("cpu"))
    logits = torch.eye(3)[[0, 1, 2, 0]]
    stats.update(torch.ones(4), logits, torch.tensor([0, 1, 2, 2]), valid=2)
    m = stats.reduce()
    assert m.samples == 2 and m.accuracy == 1.0 and m.loss == 1.0


def test_empty_matrix_gives_nan_not_a_crash():
    m = compute_metrics(torch.zeros(3, 3, dtype=torch.int64), 0.0)
    assert m.samples == 0 and m.loss != m.loss


@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (13, 4, 3), (8, 4, 2), (5, 4, 4), (1, 4, 2)])
def test_valid_in_batch_follows_accelerate_sharding(n, batch, world):
    """Shard like Accelerate's BatchSamplerShard (even_batches): rank r takes global batch k*world + r and
    the last round is filled from the start; the real samples must be counted exactly once."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    counted = []
    for rank in range(world):
        shard = list(BatchSamplerShard(BatchSampler(SequentialSampler(range(n)), batch, False), world, rank))
        for i, idx in enumerate(shard):
            last = i == len(shard) - 1
            valid = valid_in_batch(last, n % (batch * world), len(idx), rank)
            counted += idx if valid is None else idx[:valid]
    assert sorted(counted) == list(range(n)), (n, batch, world)
