"""The elastic batch sampler as a pure function: orders, shares, positions (no processes needed)."""

import pickle

import pytest
import torch

from launcher.data import sampling
from launcher.data.sampling import RANDPERM_LIMIT, ElasticBatchSampler, EpochIndices, EpochOrder, epoch_order, share

# Both orders: torch.randperm (every dataset below RANDPERM_LIMIT samples) and the keyed bijection (at and
# above it; a limit of 0 makes every dataset use it).
LIMITS = pytest.mark.parametrize("limit", [RANDPERM_LIMIT, 0], ids=["randperm", "bijection"])


def batches(n, batch_size, world, *, epoch=0, start=0, seed=0, shuffle=True, drop_last=False, limit=RANDPERM_LIMIT):
    """Every rank's batches, as lists: result[rank][k] is rank's share of global batch k."""
    out = []
    for rank in range(world):
        sampler = ElasticBatchSampler(n, batch_size, rank=rank, world_size=world, seed=seed, shuffle=shuffle,
                                      drop_last=drop_last, randperm_limit=limit)
        sampler.set_epoch(epoch, start=start)
        got = [list(b) for b in sampler]
        assert len(got) == len(sampler)
        out.append(got)
    return out


def global_order(per_rank):
    """The ids in the order the ranks consumed them together: global batch k is rank 0's, rank 1's, ..."""
    return [i for k in range(len(per_rank[0])) for rank in per_rank for i in rank[k]]


@LIMITS
@pytest.mark.parametrize("n,batch_size,world", [(100, 8, 1), (100, 8, 3), (97, 16, 3), (7, 4, 4), (64, 8, 2)])
def test_each_epoch_is_the_permutation_of_seed_and_epoch_at_any_world_size(n, batch_size, world, limit):
    order = epoch_order(n, seed=5, epoch=2, randperm_limit=limit).tolist()
    per_rank = batches(n, batch_size, world, epoch=2, seed=5, limit=limit)
    assert global_order(per_rank) == order
    assert sorted(order) == list(range(n))
    assert len({len(r) for r in per_rank}) == 1, "every rank yields the same number of batches"


def test_orders_differ_between_epochs_and_seeds_and_none_without_shuffle():
    a, b, c = epoch_order(50, 0, 0), epoch_order(50, 0, 1), epoch_order(50, 1, 0)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(epoch_order(50, 0, 1), b)
    assert global_order(batches(50, 4, 3, shuffle=False)) == list(range(50))


@LIMITS
@pytest.mark.parametrize("old_world,new_world", [(2, 3), (3, 2), (2, 1), (1, 4)])
def test_resume_at_a_global_position_on_another_world_size_sees_every_sample_once(old_world, new_world, limit,
                                                                                 monkeypatch):
    monkeypatch.setattr(sampling, "CHUNK", 40)  # the bijection's chunks end inside the epoch, 2 batches each
    n, batch_size = 359, 17
    before = batches(n, batch_size, old_world, epoch=1, limit=limit)
    steps_done = 3
    consumed = global_order([r[:steps_done] for r in before])
    start = len(consumed)
    after = global_order(batches(n, batch_size, new_world, epoch=1, start=start, limit=limit))
    assert sorted(consumed + after) == list(range(n))
    assert consumed + after == epoch_order(n, 0, 1, randperm_limit=limit).tolist()


def test_a_full_global_batch_gives_every_rank_the_batch_size():
    per_rank = batches(96, 16, 3)
    assert all(len(b) == 16 for rank in per_rank for b in rank)


def test_the_short_last_batch_is_split_as_evenly_as_possible():
    per_rank = batches(100, 16, 3)  # 2 full global batches of 48, then 4 samples
    assert [len(rank[-1]) for rank in per_rank] == [2, 1, 1]
    assert [share(4, r, 3) for r in range(3)] == [(0, 2), (2, 1), (3, 1)]


def test_fewer_samples_than_ranks_gives_empty_batches_not_repeats():
    per_rank = batches(98, 16, 3)  # 2 full global batches, then 2 samples for 3 ranks
    assert [len(rank[-1]) for rank in per_rank] == [1, 1, 0]
    assert sorted(global_order(per_rank)) == list(range(98))


def test_drop_last_drops_only_a_short_last_global_batch():
    per_rank = batches(100, 16, 3, drop_last=True)
    assert len(per_rank[0]) == 2 and sorted(global_order(per_rank)) == sorted(epoch_order(100, 0, 0)[:96].tolist())
    assert len(batches(96, 16, 3, drop_last=True)[0]) == 2


def test_yields_epoch_indices_that_pickle_with_their_epoch():
    sampler = ElasticBatchSampler(10, 4, seed=1)
    sampler.set_epoch(7, start=2)
    first = next(iter(sampler))
    assert isinstance(first, EpochIndices) and first.epoch == 7 and len(first) == 4
    again = pickle.loads(pickle.dumps(first))
    assert again == first and again.epoch == 7
    assert global_order([[list(b) for b in sampler]]) == epoch_order(10, 1, 7).tolist()[2:]


def test_len_and_global_sizes_follow_the_position():
    sampler = ElasticBatchSampler(100, 16, rank=1, world_size=3)
    sampler.set_epoch(0, start=40)
    assert len(sampler) == 2 and sampler.global_sizes() == [48, 12]
    sampler.set_epoch(0, start=100)
    assert len(sampler) == 0 and list(sampler) == []


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="rank 3"):
        ElasticBatchSampler(10, 2, rank=3, world_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        ElasticBatchSampler(10, 0)
    with pytest.raises(ValueError, match="start 11"):
        ElasticBatchSampler(10, 2).set_epoch(0, start=11)


class EpochEcho(torch.utils.data.Dataset):
    """Returns the indices it was asked for and the epoch that came with them."""

    def __len__(self):
        return 10

    def __getitems__(self, indices):
        return torch.tensor(list(indices)), getattr(indices, "epoch", -1)


@pytest.mark.parametrize("workers", [0, 2])
def test_make_loader_shards_by_rank_and_hands_the_epoch_to_workers(workers):
    from launcher.data import make_loader
    from launcher.data.sampling import iterate

    loader = make_loader(EpochEcho(), 4, shuffle=True, num_workers=workers, seed=2, rank=1, world_size=2)
    loader.batch_sampler.set_epoch(3)
    order = epoch_order(10, 2, 3).tolist()
    for batches_ in (list(loader), list(iterate(loader))):
        assert [e for _, e in batches_] == [3, 3]
        # global batches of 8 then 2: rank 1 takes order[4:8], then the second sample of the last one
        assert torch.cat([i for i, _ in batches_]).tolist() == order[4:8] + order[9:10]


def test_loader_draws_nothing_from_the_global_rng():
    from launcher.data import make_loader

    loader = make_loader(EpochEcho(), 4, shuffle=True, num_workers=1)
    before = torch.get_rng_state()
    list(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_batches_per_epoch_does_not_depend_on_the_position():
    sampler = ElasticBatchSampler(100, 16, world_size=3)
    sampler.set_epoch(0, start=60)
    assert sampler.batches_per_epoch == 3 and len(sampler) == 1
    assert ElasticBatchSampler(100, 16, world_size=3, drop_last=True).batches_per_epoch == 2


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 13])
def test_evaluation_loaders_pad_every_share_to_the_batch_size_and_say_what_is_real(n, world):
    """Every rank yields the same number of batches, each of exactly the batch size (a sharded model's ranks
    run the same forward passes on the same shapes); the real samples of all ranks are each sample once, in
    order, and `real_samples` names them. Training keeps short (or empty) shares instead."""
    from launcher.data.sampling import ElasticBatchSampler

    batch = 3
    real_ids, counts = [], set()
    for rank in range(world):
        evaluation = ElasticBatchSampler(n, batch, rank=rank, world_size=world, shuffle=False, skip_empty=True)
        plain = [list(b) for b in evaluation]  # iterated directly: each sample once, no padding
        with evaluation.padded():
            batches = [list(b) for b in evaluation]
            counts.add(len(batches))
            assert len(batches) == len(evaluation) == -(-n // (batch * world))
            reals = [evaluation.real_samples(k) for k in range(len(batches))]
        assert all(len(b) == batch for b in batches)
        for k, (ids, real) in enumerate(zip(batches, reals)):
            real_ids.append((k, rank, ids if real is None else ids[:real]))
            if real is not None:
                assert ids[real:] == [0] * (batch - real)  # padding: copies of sample 0
        assert [i for ids, real in zip(batches, reals) for i in (ids if real is None else ids[:real])] == \
            [i for ids in plain for i in ids]
        assert all(plain) and evaluation.real_samples(len(plain) - 1) is None  # outside padded(): no padding
        train = ElasticBatchSampler(n, batch, rank=rank, world_size=world, shuffle=False)
        assert len(list(train)) == len(batches)
    assert len(counts) == 1
    in_order = [i for _, _, ids in sorted(real_ids, key=lambda t: (t[0], t[1])) for i in ids]
    assert in_order == list(range(n))


def test_evaluation_loaders_skip_empty_shares_training_loaders_keep_them():
    """7 samples, 2 per rank, 3 ranks: the second global batch has 1 sample. Training yields an empty batch
    on ranks 1 and 2 (every rank takes part in each step); an evaluation loader iterated directly skips it."""
    from launcher.data.sampling import ElasticBatchSampler

    for rank, expected in ((0, [[0, 1], [6]]), (1, [[2, 3]]), (2, [[4, 5]])):
        train = ElasticBatchSampler(7, 2, rank=rank, world_size=3, shuffle=False)
        evaluation = ElasticBatchSampler(7, 2, rank=rank, world_size=3, shuffle=False, skip_empty=True)
        assert [list(b) for b in evaluation] == expected and len(evaluation) == len(expected)
        assert len(train) == len(list(train)) == 2
        assert sum(len(b) for b in train) == sum(len(b) for b in evaluation)


def test_below_the_limit_the_order_is_randperm_byte_for_byte():
    """Every dataset under RANDPERM_LIMIT samples keeps the order it always had."""
    for n, seed, epoch in ((240, 0, 1), (1000, 3, 0), (5, 7, 9)):
        generator = torch.Generator().manual_seed(sampling.epoch_seed(seed, epoch))
        assert torch.equal(epoch_order(n, seed, epoch), torch.randperm(n, generator=generator))
        assert global_order(batches(n, 16, 3, epoch=epoch, seed=seed)) == epoch_order(n, seed, epoch).tolist()
    assert EpochOrder(RANDPERM_LIMIT - 1, 0, 0, randperm_limit=RANDPERM_LIMIT).perm is not None
    big = EpochOrder(RANDPERM_LIMIT, 0, 0)  # at the limit: nothing materialized, each position on demand
    assert big.perm is None and big[torch.tensor([0, RANDPERM_LIMIT - 1])].tolist() != [0, RANDPERM_LIMIT - 1]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 63, 64, 65, 1000, 4097, 65537])
def test_the_bijection_is_a_permutation_whose_pieces_agree_with_the_whole(n):
    order = EpochOrder(n, seed=3, epoch=1, randperm_limit=0)
    whole = order[:]
    assert sorted(whole.tolist()) == list(range(n))
    picked = torch.tensor([i for i in (n - 1, 0, n // 3) if 0 <= i < n], dtype=torch.int64)
    assert torch.equal(order[picked], whole[picked])  # a rank computing only its positions gets the same
    assert torch.equal(order[n // 4: n // 2], whole[n // 4: n // 2])


def test_the_bijection_shuffles_like_randperm():
    """No visible structure, on a large domain and on the small ones where a weak few-bit shuffle shows it:
    the sample at a position is uncorrelated with the position and with the sample at the next position,
    neighbouring positions hold samples from all over the dataset, and over many epochs every sample lands
    at every position about equally often (chi-square against the uniform)."""
    n = 20_000
    order = epoch_order(n, seed=0, epoch=0, randperm_limit=0).double()
    positions = torch.arange(n, dtype=torch.float64)
    assert abs(torch.corrcoef(torch.stack([positions, order]))[0, 1].item()) < 0.03
    assert abs(torch.corrcoef(torch.stack([order[:-1], order[1:]]))[0, 1].item()) < 0.03
    assert order[:256].min() < n * 0.05 and order[:256].max() > n * 0.95  # a batch spans the dataset
    assert (order[1:] - order[:-1]).abs().median() > n / 5  # neighbours are far apart, as in a random order
    for small, epochs in ((240, 400), (64, 1000)):
        orders = torch.stack([epoch_order(small, seed=0, epoch=e, randperm_limit=0) for e in range(epochs)])
        lag = torch.stack([torch.corrcoef(torch.stack([o[:-1], o[1:]]).double())[0, 1] for o in orders])
        # randperm's own: mean -1/(n-1), spread 1/sqrt(n*epochs); 3 Feistel rounds miss this by over 10 spreads
        assert abs(lag.mean().item() + 1 / (small - 1)) < 4 / (small * epochs) ** 0.5
        adjacent = ((orders[:, 1:] - orders[:, :-1]).abs() == 1).sum().item() / epochs
        assert adjacent < 2 * 2 * (small - 1) / small  # neighbouring ids side by side: ~2 per epoch at random
        counts = torch.zeros(small, small)
        counts.index_put_((torch.arange(small).repeat(epochs), orders.reshape(-1)), torch.ones(small * epochs),
                          accumulate=True)
        expected = epochs / small
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        dof = (small - 1) ** 2
        assert chi2 < dof + 5 * (2 * dof) ** 0.5  # 5 sigma above the mean of the chi-square distribution
