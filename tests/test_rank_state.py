"""What each rank contributes to a checkpoint (launcher.checkpoint.rank_state): both layouts read back."""

import torch

from launcher.checkpoint.rank_state import (
    STATS_REDUCED,
    read_rank_file,
    read_rank_rng,
    read_stats,
    reduce_with_flags,
    rng_file,
    sum_saved,
    write_rank_rng,
)


def test_statistics_are_summed_whatever_their_type():
    stats = {"buffer": [1.0, 2.0, 0.5], "extra": torch.tensor([[1.0, 2.0]], dtype=torch.float64)}
    summed, flags = reduce_with_flags(stats, [0.0, 1.0])  # one process: the sum is itself
    assert summed["buffer"] == [1.0, 2.0, 0.5] and torch.equal(summed["extra"], stats["extra"])
    assert flags == [0.0, 1.0]
    assert reduce_with_flags(None, [1.0]) == (None, [1.0])


def test_reduced_stats_go_to_rank_0_and_per_rank_ones_add_up():
    reduced = {"train_stats": {"buffer": [3.0, 4.0]}, STATS_REDUCED: True}
    assert read_stats(reduced, 0) == {"buffer": [3.0, 4.0]} and read_stats(reduced, 1) is None
    assert sum_saved(reduced) == {"buffer": [3.0, 4.0]}
    per_rank = {"train_stats": [{"buffer": [1.0, 1.5]}, {"buffer": [2.0, 2.5]}]}  # the older layout
    assert read_stats(per_rank, 1) == {"buffer": [2.0, 2.5]} and read_stats(per_rank, 2) is None
    assert sum_saved(per_rank) == {"buffer": [3.0, 4.0]}


def test_each_rank_reads_its_own_rng_file_and_the_older_layout(tmp_path):
    states = [{"torch": torch.tensor([r], dtype=torch.uint8)} for r in range(3)]
    for rank, state in enumerate(states):
        write_rank_rng(tmp_path, rank, state)
    assert rng_file(0) == "rng.pt" and rng_file(2) == "rng-00002.pt"
    assert [read_rank_rng(tmp_path, r)["torch"].item() for r in range(3)] == [0, 1, 2]
    assert read_rank_rng(tmp_path, 3) is None  # a rank the checkpoint did not have
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"ranks": states[:2]}, old / "rng.pt")
    assert read_rank_rng(old, 1)["torch"].item() == 1 and read_rank_rng(old, 2) is None


def test_each_rank_keeps_its_loader_position_in_its_own_file(tmp_path):
    """A stream's position (its state_dict: ints, strings, lists) comes back from that rank's file alone,
    through the weights-only loader; files without one (any other loader, older checkpoints) say None."""
    positions = [{"epoch": 1, "consumed": {"0": 8 * r, "1": 16}, "done": False, "world_size": 2,
                  "position": [r, 3]} for r in range(2)]
    for rank, position in enumerate(positions):
        write_rank_rng(tmp_path, rank, {"torch": torch.tensor([rank], dtype=torch.uint8)}, None, position)
    (tmp_path / rng_file(1)).rename(tmp_path / "moved")  # rank 0 must not need rank 1's file
    assert read_rank_file(tmp_path, 0).loader == positions[0]
    (tmp_path / "moved").rename(tmp_path / rng_file(1))
    assert read_rank_file(tmp_path, 1).loader == positions[1]
    write_rank_rng(tmp_path, 2, {"torch": torch.tensor([2], dtype=torch.uint8)})
    assert read_rank_file(tmp_path, 2).loader is None
