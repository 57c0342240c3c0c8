"""What a model is trained to do: its loss and its exact metrics, one module per task.

- `classification`: single-label classification. `ConfusionStats` keeps per-process sums (loss, sample
  count, confusion matrix) on the device and reduces them with one all-reduce, so the metrics are the same
  at any world size and batch size; `ClassificationMetrics` are what it reports.

A task never imports the loop: the loop asks a task for statistics, feeds them batches and reduces them.
"""
