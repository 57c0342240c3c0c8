"""Tokens per second and model FLOPs utilisation (MFU), counted as the field counts them.

FLOPs per token of a decoder-only transformer, forward and backward (Kaplan et al. 2020; PaLM, Chowdhery
et al. 2022, appendix B; nanoGPT's `estimate_mfu`, torchtitan's `get_num_flop_per_token`):

    6 * N  +  12 * n_layer * n_embd * seq_len

- 6N: every parameter that takes part in a matrix multiply costs 2 FLOPs per token forward (multiply and
  add) and 4 backward (the gradients of the input and of the weight). N leaves out tables that are only
  looked up (learned positions; token embeddings when the output projection is a separate matrix); a tied
  embedding counts once, as the output projection.
- 12 * L * d * T: attention's two matmuls (Q K^T and the weighted sum of V) per layer, 2 d T FLOPs each per
  token forward, times 3 for forward and backward. By convention the causal mask's skipped half is not
  subtracted, and a recomputation (activation checkpointing, flash attention's backward) is not added: MFU
  measures the model's FLOPs, not the hardware's.

MFU = achieved model FLOP/s per device / the device's peak dense bf16 FLOP/s. The peaks below are the
vendors' datasheet numbers for dense (not 2:4-sparse) tensor-core math; a CPU has none (MFU None), and any
other device needs `--peak-flops`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# (pattern on the CUDA device name, peak FLOP/s, what it is). Specific names before their prefixes:
# "H100 PCIe" before "H100". Patterns end at a word boundary so that "A10" does not match "A100".
PEAK_FLOPS: tuple[tuple[str, float, str], ...] = (
    (r"B200", 2250e12, "B200, bf16 dense"),
    (r"H200", 989e12, "H200 (SXM), bf16 dense"),
    (r"H100 NVL", 835e12, "H100 NVL, bf16 dense"),
    (r"H100 PCIe", 756e12, "H100 PCIe, bf16 dense"),
    (r"H100", 989e12, "H100 SXM, bf16 dense"),
    (r"A100", 312e12, "A100 (SXM and PCIe), bf16 dense"),
    (r"L4", 121e12, "L4, bf16 dense"),
    (r"A10", 125e12, "A10, bf16 dense"),
    (r"V100S?(-PCIE| PCIe)", 112e12, "V100 PCIe, fp16 dense (V100 has no bf16)"),
    (r"V100", 125e12, "V100 SXM2, fp16 dense (V100 has no bf16)"),
    (r"T4", 65e12, "T4, fp16 dense (T4 has no bf16)"),
)


def flops_per_token(matmul_params: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """Training FLOPs per token (forward and backward): 6N plus attention's 12 * L * d * T."""
    return 6 * int(matmul_params) + 12 * int(n_layer) * int(n_embd) * int(seq_len)


def matmul_params(model: nn.Module) -> int:
    """N of 6N: the model's `flop_params()` where it has one (the built-in GPT), else every parameter
    but the embedding tables that are only looked up: an `nn.Embedding` whose weight is not also the
    output projection (transformers' `get_output_embeddings`)."""
    own = getattr(model, "flop_params", None)
    if callable(own):
        return int(own())
    output = getattr(model, "get_output_embeddings", lambda: None)()
    tied = getattr(output, "weight", None)
    seen: set[int] = set()
    total = 0
    for param in model.parameters():  # parameters() yields a shared tensor once
        seen.add(id(param))
        total += param.numel()
    looked_up = {id(m.weight): m.weight.numel() for m in model.modules()
                 if isinstance(m, nn.Embedding) and m.weight is not tied and id(m.weight) in seen}
    return total - sum(looked_up.values())


def transformer_shape(model: nn.Module) -> tuple[int, int]:
    """(n_layer, n_embd) of the built-in GPT or a transformers decoder (GPT-2 or LLaMA-style names)."""
    config = getattr(model, "config", None)
    for layers, width in (("n_layer", "n_embd"), ("num_hidden_layers", "hidden_size")):
        if hasattr(config, layers) and hasattr(config, width):
            return int(getattr(config, layers)), int(getattr(config, width))
    raise ValueError(f"cannot read the number of layers and the width of {type(model).__name__}'s config")


def peak_flops(device_name: str | None, override: float | None = None) -> float | None:
    """The device's peak dense FLOP/s: `override` (--peak-flops) when given, else the table's entry for a
    CUDA device name (torch.cuda.get_device_name()), else None (a CPU, or a device not in the table)."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"--peak-flops must be positive (got {override})")
        return float(override)
    if not device_name or device_name.lower() == "cpu":
        return None
    for pattern, value, _ in PEAK_FLOPS:
        if re.search(rf"(?<![0-9A-Za-z]){pattern}(?![0-9A-Za-z])", device_name, flags=re.IGNORECASE):
            return value
    return None


def mfu(tokens_per_second_per_device: float, flops_per_token_: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None where the peak is unknown (a CPU)."""
    if peak is None:
        return None
    return tokens_per_second_per_device * flops_per_token_ / peak


def describe_peak(device_name: str | None, peak: float | None) -> str:
    """One line for the log: which peak MFU is measured against, or why there is none."""
    if peak is not None:
        return f"MFU against a peak of {peak / 1e12:g} TFLOP/s per device ({device_name})"
    if not device_name or device_name.lower() == "cpu":
        return "MFU: none on a CPU (no peak FLOP/s to compare with)"
    return f"MFU: peak FLOP/s of {device_name!r} unknown; pass --peak-flops (e.g. 312e12 for an A100)"


@dataclass(frozen=True)
class Throughput:
    """What `fit(throughput=...)` needs to report MFU beside tokens per second: the model's training FLOPs
    per token (`flops_per_token`) and the device's peak (`peak_flops`, None: no MFU, as on a CPU)."""

    flops_per_token: int
    peak_flops: float | None = None

    def mfu(self, tokens_per_second_per_device: float) -> float | None:
        return mfu(tokens_per_second_per_device, self.flops_per_token, self.peak_flops)
