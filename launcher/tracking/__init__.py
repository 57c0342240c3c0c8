"""What a run leaves for people to look at and compare.

- `tracker`: the `Tracker` that `fit` talks to (`WandbTracker` on rank 0, `NullTracker` elsewhere),
  `start_tracker`, run metadata (git commit, SLURM ids) and credential scrubbing;
- `wandb_records`: a reader for W&B's local `run-<id>.wandb` files (tests, offline inspection);
- `compare`: `launcher compare`: runs side by side from `metrics.jsonl` and `config.json`.
"""
