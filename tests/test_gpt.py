"""launcher.models.gpt: the built-in decoder: shapes, the tied matrix, causality, activation checkpointing,
generation, the position limit, and FSDP2/DDP over real gloo groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from launcher.errors import UsageError
from launcher.models.gpt import (
    GPT,
    SIZES,
    GPTConfig,
    apply_rotary,
    build_gpt,
    check_block_size,
    position_limit,
    rotary_tables,
)

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def lm_loss(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_logits_shape_and_it_learns(positions):
    model = tiny(positions=positions)
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    assert model(ids).shape == (4, 16, 50)
    assert model(ids[:, :5]).shape == (4, 5, 50)  # shorter than the block: fine
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = lm_loss(model, ids).item()
    for _ in range(30):
        optimizer.zero_grad()
        lm_loss(model, ids).backward()
        optimizer.step()
    assert lm_loss(model, ids).item() < first / 2  # memorises one batch


def test_sizes_by_name_and_their_parameter_counts():
    # The docstring's table; gpt-small with GPT-2's vocabulary and positions is GPT-2 small (124,439,808).
    counts = {name: build_gpt(name, vocab_size=257, block_size=256).num_params() for name in ("gpt-nano",
                                                                                              "gpt-micro")}
    d, layers = 48, 3  # gpt-nano by hand: per block 12 d^2 weights, 13 d biases and LayerNorm parameters
    block = 12 * d * d + 13 * d
    assert counts["gpt-nano"] == layers * block + 2 * d + 257 * d + 256 * d
    assert counts["gpt-micro"] == 859_008
    assert set(SIZES) >= {"gpt-nano", "gpt-micro", "gpt-mini", "gpt-small"}
    with torch.device("meta"):  # no memory for the big one
        assert build_gpt("gpt-small", vocab_size=50257, block_size=1024).num_params() == 124_439_808
    with pytest.raises(UsageError, match="unknown model 'gpt-huge'"):
        build_gpt("gpt-huge", vocab_size=257, block_size=256)


def test_input_and_output_embeddings_are_one_tensor_that_survives_safetensors(tmp_path):
    model = tiny()
    ids = torch.randint(0, 49, (2, 16))  # never token 49
    # The output projection is the embedding matrix: row 49, never looked up here, is exactly the output
    # weights of token 49, so changing it changes that logit and no other.
    before = model(ids)
    with torch.no_grad():
        model.embed[49] += 1.0
    after = model(ids)
    assert torch.equal(before[..., :49], after[..., :49]) and not torch.allclose(before[..., 49], after[..., 49])
    lm_loss(model, ids).backward()
    assert model.embed.grad is not None and model.embed.grad.abs().sum() > 0
    # One key for the tie: safetensors' shared-tensor rule never applies; strict loading needs no re-tying.
    state = model.state_dict()
    assert sum(v.shape == (50, 16) for v in state.values()) == 1
    save_file(state, tmp_path / "model.safetensors")
    other = tiny(positions="learned")
    torch.nn.init.zeros_(other.embed)
    other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert torch.equal(other(ids), model(ids))
    assert [n for n, _ in other.named_parameters()].count("embed") == 1


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_position_t_never_sees_later_tokens(positions):
    model = tiny(positions=positions).eval()
    ids = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(2))
    for t in (0, 7, 14):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, 50, changed[:, t + 1:].shape)
        assert not torch.equal(changed, ids)
        a, b = model(ids), model(changed)
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # and the later positions do see them


def test_rotary_has_no_position_parameters_and_is_relative():
    model = tiny(positions="rotary").eval()
    assert model.wpe is None and tiny().num_params() - model.num_params() == 16 * 16
    # RoPE rotates queries and keys only: no absolute position reaches the values. With one repeated token
    # every value is the same, so every position's output is too; learned positions make them differ.
    ids = torch.full((1, 8), 3)
    rotary = model(ids)[0]
    assert torch.allclose(rotary, rotary[:1].expand_as(rotary), atol=1e-5)
    learned = tiny().eval()(ids)[0]
    assert not torch.allclose(learned, learned[:1].expand_as(learned), atol=1e-5)
    # The scores see positions through distances only: q_m . k_n after rotation is a function of m - n.
    cos, sin = rotary_tables(12, 8, 10000.0, torch.device("cpu"))
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    scores = apply_rotary(q, cos, sin)[0, 0] @ apply_rotary(k, cos, sin)[0, 0].T
    assert torch.allclose(scores[5, 2], scores[9, 6], atol=1e-5) and torch.allclose(scores[3, 3], scores[8, 8])
    assert not torch.allclose(scores[5, 2], scores[5, 4], atol=1e-3)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_activation_checkpointing_gives_identical_gradients(positions):
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(3))
    grads = []
    for recompute in (False, True):
        model = tiny(positions=positions, dropout=0.2)  # dropout: the recomputation must replay its masks
        model.activation_checkpointing = recompute
        torch.manual_seed(7)
        lm_loss(model, ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_activation_checkpointing_recomputes_blocks():
    model = tiny()
    calls = []
    # A pre-hook: the recomputation stops early once it has what backward needs (checkpoint's early stop).
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 50, (2, 16))
    lm_loss(model, ids).backward()
    assert len(calls) == 1
    model.activation_checkpointing = True
    calls.clear()
    lm_loss(model, ids).backward()
    assert len(calls) == 2  # forward, and again in backward
    calls.clear()
    with torch.no_grad():
        model(ids)
    assert len(calls) == 1  # nothing to recompute without gradients


def test_generate_greedy_and_seeded_top_k():
    model = tiny()
    model.train()
    prompt = torch.tensor([[1, 2, 3]])
    greedy = model.generate(prompt, 10)
    assert greedy.shape == (1, 13) and torch.equal(greedy[:, :3], prompt)
    assert torch.equal(greedy, model.generate(prompt, 10))
    assert model.training  # mode restored
    # Greedy is the argmax of each step's logits.
    with torch.no_grad():
        assert greedy[0, 3] == model(prompt)[0, -1].argmax()
    sampled = [model.generate(prompt, 12, top_k=None, seed=s) for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    top2 = model.generate(prompt, 12, top_k=2, seed=5)
    with torch.no_grad():
        for t in range(3, 15):
            allowed = model(top2[:, :t])[0, -1].topk(2).indices
            assert top2[0, t] in allowed
    # Longer than the position limit: the context is cut, generation goes on.
    assert model.generate(torch.randint(0, 50, (2, 15)), 5).shape == (2, 20)


def test_generate_stops_at_end_of_text():
    model = tiny()
    first = model.generate(torch.tensor([[1]]), 1)[0, -1].item()
    out = model.generate(torch.tensor([[1]]), 10, eos_token_id=first)
    assert out.shape == (1, 2)


def test_position_limit_and_block_size_check():
    model = tiny()
    assert model.max_positions == 16 == position_limit(model)
    with pytest.raises(ValueError, match="longer than the model's 16 positions"):
        model(torch.zeros(1, 17, dtype=torch.long))
    check_block_size(16, model, "tiny")
    with pytest.raises(UsageError, match=r"--block-size 17 is beyond the 16 positions of model tiny; use "
                                         r"--block-size 16 or less"):
        check_block_size(17, model, "tiny")

    class HFLike(torch.nn.Module):
        config = type("Config", (), {"n_positions": 64})()

    assert position_limit(HFLike()) == 64
    assert position_limit(torch.nn.Linear(2, 2)) is None


def _sharded_steps(rank: int, world: int, port: int, out: str) -> None:
    """In one gloo group (one start-up for both): a step under DDP, then under FSDP2."""
    import os

    import torch.distributed as dist

    from launcher.faults.gloo_exit import settle_gloo_workers_at_exit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    settle_gloo_workers_at_exit()  # else a gloo worker can abort the process at exit (launcher.faults.gloo_exit)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for kind in ("ddp", "fsdp2"):
        _sharded_step(rank, kind, True, f"{out}/{kind}.pt")
    dist.destroy_process_group()


def _sharded_step(rank: int, kind: str, recompute: bool, out: str) -> None:
    """One training step of the same model, each rank on its half of the batch, under `kind`."""
    from types import SimpleNamespace

    model = build_gpt("gpt-nano", vocab_size=257, block_size=32)
    torch.manual_seed(0)
    model.reset_parameters()
    model.activation_checkpointing = recompute
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(9))[rank * 2:(rank + 1) * 2]
    if kind == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        # Size-based wrapping with a small threshold: every Linear and the position table become FSDP
        # units of their own, the case a tied nn.Embedding/nn.Linear pair could not survive.
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="size_based_wrap",
                                                min_num_params=1000, reshard_after_forward=True,
                                                cpu_ram_efficient_loading=False)
        shim = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=True,
                               device=torch.device("cpu"), torch_device_mesh=None, parallelism_config=None)
        wrapped = fsdp2_prepare_model(shim, model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    lm_loss(wrapped, ids).backward()
    optimizer.step()
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in wrapped.state_dict().items()}
    if rank == 0:
        torch.save({k.removeprefix("module."): v for k, v in state.items()}, out)


@pytest.mark.slow
def test_ddp_and_fsdp2_with_activation_checkpointing_match_one_process(tmp_path):
    from tests.helpers import free_port

    reference = build_gpt("gpt-nano", vocab_size=257, block_size=32)
    torch.manual_seed(0)
    reference.reset_parameters()
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(9))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    # The mean over 2 ranks of each rank's mean loss equals the global mean (same token count per rank).
    lm_loss(reference, ids).backward()
    optimizer.step()
    expected = reference.state_dict()
    torch.multiprocessing.spawn(_sharded_steps, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for kind in ("ddp", "fsdp2"):
        got = torch.load(tmp_path / f"{kind}.pt")
        assert got.keys() == expected.keys(), kind
        for name, value in expected.items():
            assert torch.allclose(got[name], value, atol=1e-6), (kind, name)
