"""launcher.tracking.throughput: FLOPs per token against counted FLOPs, the peak table, MFU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from launcher.models.gpt import build_gpt
from launcher.tracking.throughput import (
    describe_peak,
    flops_per_token,
    matmul_params,
    mfu,
    peak_flops,
    transformer_shape,
)


def test_flops_per_token_of_gpt_nano_by_hand():
    model = build_gpt("gpt-nano", vocab_size=257, block_size=256)
    layers, d, vocab, seq = 3, 48, 257, 256
    weights = layers * 12 * d * d + vocab * d  # qkv, proj, fc, proj per block; the tied output matrix
    small = layers * 13 * d + 2 * d  # biases and LayerNorms
    assert matmul_params(model) == model.flop_params() == weights + small  # the position table left out
    assert transformer_shape(model) == (layers, d)
    assert flops_per_token(weights + small, layers, d, seq) == 6 * (weights + small) + 12 * layers * d * seq
    # torch's FLOP counter on a real forward and backward counts exactly the 6 x weights of the matmuls
    # (it does not count the CPU attention kernel, checked separately below).
    x = torch.randint(0, vocab, (2, seq))
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert counter.get_total_flops() == 6 * weights * x.numel()


def test_attention_term_is_the_counted_flops_of_its_two_matmuls():
    seq, heads, head_dim = 64, 4, 8
    q, k, v = (torch.randn(1, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        ((q @ k.transpose(-2, -1)).softmax(-1) @ v).sum().backward()
    per_token = counter.get_total_flops() / seq
    assert per_token == flops_per_token(0, 1, heads * head_dim, seq)  # 12 * L * d * T


def test_matmul_params_of_transformers_models_tied_and_not():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    tied = transformers.GPT2LMHeadModel(config)
    total = sum(p.numel() for p in tied.parameters())
    assert matmul_params(tied) == total - 32 * 16  # wte counts once, as the output projection
    untied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config.to_dict(), "tie_word_embeddings": False}))
    total = sum(p.numel() for p in untied.parameters())
    assert matmul_params(untied) == total - 32 * 16 - 100 * 16  # the lookup table is no matmul
    assert transformer_shape(untied) == (2, 16)


@pytest.mark.parametrize(("name", "expected"), [
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12),
    ("Tesla V100-SXM2-16GB", 125e12),
    ("Tesla V100-PCIE-32GB", 112e12),
    ("NVIDIA L40S", None),  # not "L4"
    ("NVIDIA A10G", None),  # not "A10": no agreed datasheet number, pass --peak-flops
    ("NVIDIA GH200 480GB", None),
    ("cpu", None),
    (None, None),
])
def test_peak_flops_table(name, expected):
    assert peak_flops(name) == expected


def test_override_mfu_and_the_log_line():
    assert peak_flops("cpu", 1e12) == 1e12 and peak_flops("NVIDIA A100", 2e14) == 2e14
    with pytest.raises(ValueError, match="--peak-flops must be positive"):
        peak_flops("cpu", 0)
    assert mfu(1000.0, 6_000_000, None) is None
    assert mfu(50_000.0, 1_000_000_000, 100e12) == pytest.approx(0.5)
    assert describe_peak("cpu", None) == "MFU: none on a CPU (no peak FLOP/s to compare with)"
    assert "--peak-flops" in describe_peak("NVIDIA A10G", None)
    assert "312 TFLOP/s" in describe_peak("NVIDIA A100", 312e12)
