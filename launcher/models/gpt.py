"""A decoder-only transformer (GPT) in torch alone, the built-in model for language models.

Read it like nanoGPT's model.py: token embeddings, positions (learned, or rotary as in RoFormer/LLaMA),
`n_layer` pre-norm blocks of causal self-attention (`F.scaled_dot_product_attention(is_causal=True)`, which
picks the flash or memory-efficient kernel where one exists) and a GELU MLP, a final LayerNorm, and the
output projection that reuses the token embedding matrix (tied weights, Press & Wolf 2017).

The tie is one `nn.Parameter` (`embed`) on the root module, used by `F.embedding` on the way in and by
`F.linear` on the way out, not an `nn.Embedding` and an `nn.Linear` sharing a tensor. So:

- the state dict has one key for it: safetensors' shared-tensor rule ("Some tensors share memory, this will
  lead to duplicate memory on disk") never applies, `load_state_dict(strict=True)` needs no re-tying, and
  DCP's sharded checkpoints see one tensor;
- FSDP2 cannot put the two uses into different groups: accelerate's size-based wrap would shard an
  `nn.Embedding` above `min_num_params` as a unit of its own, and a tied head outside it would then see a
  sharded weight (torch >= 2.13 refuses a parameter visible to two groups). A root parameter stays in the
  root group; blocks (`_no_split_modules`) get units of their own under either wrap policy.

`activation_checkpointing = True` recomputes each block in the backward pass (torch.utils.checkpoint,
non-reentrant, the RNG state preserved, so dropout masks and gradients are identical). The checkpoint is
taken around the block's own call, so FSDP2's hooks on a sharded block run again for the recomputation and
DDP's reducer sees each parameter once.

Sizes by name (parameters with the byte-level vocabulary of 257 and `block_size` 256; `num_params()`
counts them, the tied matrix once):

| name      | layers | heads | width | parameters |
| --------- | ------ | ----- | ----- | ---------- |
| gpt-nano  | 3      | 3     | 48    | 0.11 M     |
| gpt-micro | 4      | 4     | 128   | 0.86 M     |
| gpt-mini  | 6      | 6     | 192   | 2.77 M     |
| gpt-small | 12     | 12    | 768   | 85.4 M     |

(gpt-small is GPT-2 small's shape; with GPT-2's 50257-token vocabulary and 1024 positions it is the
124.44 M model.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from launcher.errors import UsageError

POSITIONS = ("learned", "rotary")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 257
    block_size: int = 256  # the longest sequence the model takes (its position limit)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms, as GPT-2
    positions: str = "learned"  # "learned" (GPT-2) or "rotary" (RoPE, no position parameters)
    rope_base: float = 10000.0


SIZES: dict[str, dict[str, int]] = {
    "gpt-nano": {"n_layer": 3, "n_head": 3, "n_embd": 48},
    "gpt-micro": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "gpt-mini": {"n_layer": 6, "n_head": 6, "n_embd": 192},
    "gpt-small": {"n_layer": 12, "n_head": 12, "n_embd": 768},
}


def is_gpt(name: str) -> bool:
    return name in SIZES


def build_gpt(name: str, *, vocab_size: int, block_size: int, dropout: float = 0.0, positions: str = "learned",
              activation_checkpointing: bool = False) -> GPT:
    """The built-in model `name` (a key of SIZES) for a tokenizer of `vocab_size` ids and blocks of
    `block_size` tokens."""
    if name not in SIZES:
        raise UsageError(f"unknown model {name!r}: use one of {', '.join(SIZES)} or hf:NAME_OR_PATH")
    if positions not in POSITIONS:
        raise UsageError(f"--positions must be one of {', '.join(POSITIONS)} (got {positions!r})")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1) (got {dropout})")
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, dropout=dropout, positions=positions,
                          **SIZES[name]))
    model.activation_checkpointing = activation_checkpointing
    return model


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin of RoPE's angles, (seq_len, head_dim // 2) each, in float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, d) by each position's angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(batch, seq, width)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary)
        return x + self.mlp(self.ln_2(x))


class Blocks(nn.ModuleList):
    """The stack of blocks, with a forward of its own: FSDP2's size-based wrapping may make it a unit, and
    `fully_shard` refuses a container without a forward (a plain ModuleList)."""

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                recompute: bool = False) -> torch.Tensor:
        for block in self:
            # The checkpoint wraps the block's own call, so FSDP2's hooks on a sharded block run in it.
            x = checkpoint(block, x, rotary, use_reentrant=False) if recompute else block(x, rotary)
        return x


class GPT(nn.Module):
    """`model(input_ids)` -> logits (B, T, vocab_size). Batches of `{"input_ids", "labels"}` follow
    transformers' convention: labels are the inputs, and the loss shifts them (position t predicts t+1)."""

    # What FSDP's transformer-based wrap policy makes a unit of (accelerate reads it as from transformers).
    _no_split_modules = ["Block"]

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        # The tied input/output matrix (see the module docstring for why it is a root parameter).
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.n_embd))
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = Blocks(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.reset_parameters()

    @property
    def max_positions(self) -> int:
        """The longest input the model takes: `--block-size` may not exceed it."""
        return self.config.block_size

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), the residual projections scaled by 1/sqrt(2 * n_layer)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.embed, mean=0.0, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flop_params(self) -> int:
        """Parameters that take part in a matrix multiply per token (the N of 6N FLOPs per token): all but
        the learned position table, which is only looked up. The tied matrix counts: it is the output
        projection."""
        return self.num_params() - (self.wpe.weight.numel() if self.wpe is not None else 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position. `attention_mask` is accepted for batches padded on the right and
        ignored: causal attention never lets a real token see the padding after it."""
        seq = input_ids.shape[1]
        if seq > self.config.block_size:
            raise ValueError(f"sequence of {seq} tokens is longer than the model's {self.config.block_size} "
                             f"positions (max_positions)")
        x = F.embedding(input_ids, self.embed)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(seq, device=input_ids.device))
        else:
            rotary = rotary_tables(seq, self.config.n_embd // self.config.n_head, self.config.rope_base,
                                   input_ids.device)
        x = self.drop(x)
        x = self.blocks(x, rotary, recompute=self.activation_checkpointing and torch.is_grad_enabled())
        return F.linear(self.ln_f(x), self.embed)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, top_k: int | None = 1,
                 temperature: float = 1.0, seed: int = 0, eos_token_id: int | None = None) -> torch.Tensor:
        """`input_ids` (B, T) followed by up to `max_new_tokens` sampled tokens.

        top_k=1 (the default) is greedy; top_k=k samples among the k likeliest tokens, top_k=None from the
        whole distribution, with a generator seeded by `seed` (the same continuation on every call and rank).
        The context is cut to the last `max_positions` tokens. Stops early once every row has produced
        `eos_token_id`. The model's train/eval mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        try:
            for _ in range(max_new_tokens):
                logits = self(input_ids[:, -self.max_positions:])[:, -1, :].float()
                if top_k == 1:
                    token = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / max(temperature, 1e-6)
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
                input_ids = torch.cat((input_ids, token), dim=1)
                if eos_token_id is not None:
                    finished |= token.squeeze(1) == eos_token_id
                    if bool(finished.all()):
                        break
        finally:
            self.train(was_training)
        return input_ids

    def config_dict(self) -> dict:
        """The model's shape as plain data (saved beside the weights so the model can be rebuilt)."""
        return asdict(self.config)

    @classmethod
    def from_config_dict(cls, values: dict) -> GPT:
        return cls(replace(GPTConfig(), **values))


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence `model` takes: `max_positions` of a built-in GPT, a transformers config's
    `n_positions` / `max_position_embeddings`, else None (no known limit: rotary models without one)."""
    limit = getattr(model, "max_positions", None)
    if isinstance(limit, int):
        return limit
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_block_size(block_size: int, model: nn.Module, model_name: str) -> None:
    limit = position_limit(model)
    if limit is not None and block_size > limit:
        raise UsageError(f"--block-size {block_size} is beyond the {limit} positions of model {model_name}; "
                         f"use --block-size {limit} or less")
