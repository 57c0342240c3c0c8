"""`causal_lm`: next-token prediction, every token weighed the same, whatever the lengths.

Logits (N, T, V) and labels (N, T) with `ignore_index` (-100, as transformers) where no loss is due
(padding, prompt tokens). With `shift=True` (the default, transformers' convention: labels are the
input ids) position t predicts label t+1. The loss is token-level: per sample a sum and a count of valid
tokens, so the loop divides the optimizer step's summed loss by the global count of its valid tokens
(an on-device all-reduce, no host read: torchtitan's global_valid_tokens, transformers'
num_items_in_batch) and the reported loss is the exact mean over every token of the split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from launcher.tasks.base import BatchLoss, TaskMetrics, TaskStats


class LanguageModelingStats(TaskStats):
    """[loss sum, tokens, sequences, correctly predicted tokens]."""

    def __init__(self, task: CausalLM, device: torch.device):
        super().__init__(2, device)
        self.task = task
        self._sequences, self._correct = self.buffer[2:3], self.buffer[3:4]

    def _add(self, batch: BatchLoss) -> None:
        logits, labels = self.task.aligned(batch.outputs.detach(), batch.targets)
        self._sequences.add_(labels.shape[0])
        hits = (logits.argmax(dim=-1) == labels) & (labels != self.task.ignore_index)
        self._correct.add_(hits.sum(dtype=self.buffer.dtype))

    def reduce(self) -> TaskMetrics:
        metrics = super().reduce()
        metrics["perplexity"] = float(torch.tensor(metrics["loss"], dtype=torch.float64).exp())
        return metrics

    def compute(self, total: torch.Tensor) -> dict:
        tokens = float(total[1])
        return {"token_accuracy": float(total[3]) / tokens if tokens else float("nan"),
                "tokens": int(round(tokens)), "samples": int(round(float(total[2])))}


class CausalLM:
    """`causal_lm`: token-level cross-entropy with an ignore index (see the module docstring)."""

    problem_type = "causal_lm"
    token_level = True
    default_monitor = ("val_loss", "min")
    lower_is_better = ("loss", "perplexity")

    def __init__(self, ignore_index: int = -100, shift: bool = True):
        self.ignore_index, self.shift = ignore_index, shift

    def aligned(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"a causal LM needs logits (N, T, V) and labels (N, T); got {tuple(logits.shape)} "
                             f"and {tuple(labels.shape)}")
        return (logits[:, :-1], labels[:, 1:]) if self.shift else (logits, labels)

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        """Valid tokens per sample (what the model's own loss averages over)."""
        labels = labels[:, 1:] if self.shift else labels
        return (labels != self.ignore_index).sum(dim=1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self.aligned(outputs, targets)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                 ignore_index=self.ignore_index, reduction="none")
        return losses.view(labels.shape).sum(dim=1), (labels != self.ignore_index).sum(dim=1)

    def stats(self, device: torch.device) -> LanguageModelingStats:
        return LanguageModelingStats(self, device)

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "perplexity", "token_accuracy", "tokens", "samples")

    def train_row(self, metrics: TaskMetrics) -> dict:
        return {"train_loss": metrics.loss, "train_perplexity": metrics.perplexity,
                "train_samples": metrics.samples, "train_tokens": metrics.tokens}

    def metric_inputs(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        return self.aligned(outputs, targets)

    def summary(self, row: dict) -> str:
        return (f"train_loss {row['train_loss']:.4f} | val_loss {row['val_loss']:.4f} "
                f"val_perplexity {row['val_perplexity']:.2f}")

    def prediction_rows(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, list]:
        """One row per sequence: its summed token loss and its valid tokens (`loss / tokens` is its mean
        negative log-likelihood; scoring text with a language model)."""
        losses, counts = self.loss(outputs, targets)
        return {"loss": losses.tolist(), "tokens": counts.tolist()}
