"""recipes/lm.py end to end, through real `accelerate launch` processes: the default run (shortened), the
built-in GPT on a local corpus (exact evaluation at 1, 2 and 3 processes, bit-identical resume after SIGKILL,
a resume on another world size that trains each block once), a tiny transformers GPT-2 with a tokenizer
trained here (FSDP2 with sharded checkpoints, final/hf reloaded and generating), and bad input."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.tracking.wandb_records import find_run_files, read_run_file
from tests.helpers import (
    ROOT,
    assert_same_weights,
    comparable,
    final_weights,
    make_env,
    read_metrics,
    run,
    signal_tree,
    start,
    wait_for,
)

LM = ROOT / "recipes" / "lm.py"
WORDS = ("the model reads every token once and the loss is a sum over tokens divided by their count so that "
         "any world size gives the same number while blocks are cut from documents joined by an end token").split()


def _document(rng: random.Random) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(3, 9))]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of text files with train/ and validation/ subfolders (each file one document)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for split, count in (("train", 120), ("validation", 12)):
        (root / split).mkdir()
        for i in range(count):
            (root / split / f"doc{i:03}.txt").write_text(_document(rng))
    return root


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, corpus) -> Path:
    """A 1-layer GPT-2 (tied embeddings, 64 positions) from a config, with a byte-level BPE tokenizer trained
    here on the corpus, saved the way the Hub holds a model."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(p) for p in sorted((corpus / "train").iterdir())], vocab_size=300,
              special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=64)
    tokenizer.save_pretrained(folder)
    import torch

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _lm(args: list[str], nproc: int = 1, **kw) -> subprocess.CompletedProcess:
    return run(args, nproc, script=LM, **kw)


def _rows(out: Path) -> list[dict]:
    return read_metrics(out)


# ---------------------------------------------------------------------------------------------------------
# The default run


def test_default_run_shortened_reports_loss_perplexity_tokens_and_a_sample(tmp_path):
    """`accelerate launch recipes/lm.py` as README runs it, with fewer tokens: the embedded stdlib corpus.
    W&B (offline files) gets the epoch's sample continuation as a table."""
    out = tmp_path / "run"
    result = _lm(["--output-dir", str(out), "--train-tokens", "40000", "--epochs", "1", "--block-size", "64",
                  "--sample-tokens", "12", "--wandb-mode", "offline"])
    assert "corpus: " in result.stdout and "Python files of the standard library" in result.stdout
    assert "an epoch trains on a fixed sample of 40,000 of them" in result.stdout  # 625 blocks of 64
    [row] = _rows(out)
    assert row["val_perplexity"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-12)
    assert row["train_tokens"] == 625 * 63  # every block once, T-1 predictions each
    assert row["tokens_per_second"] > 0 and "mfu" not in row  # no peak on a CPU
    assert f"{row['tokens_per_second']:.0f} tokens/s" in result.stdout
    assert "sample of the final weights" in result.stdout
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "gpt_config.json").is_file()
    [run_file] = [read_run_file(p) for p in find_run_files(out / "wandb")]
    [logged] = run_file.history_with("samples")
    assert logged["_step"] == row["step"] and logged["samples"]["_type"] == "table-file"
    table = json.loads((run_file.path.parent / "files" / logged["samples"]["path"]).read_text())
    assert table["columns"] == ["epoch", "step", "prompt", "continuation"]
    [[epoch, step, prompt, text]] = table["data"]
    assert (epoch, step) == (1, row["step"]) and prompt and text


# ---------------------------------------------------------------------------------------------------------
# The built-in GPT on a local corpus: exact and resumable

GPT_ARGS = ["--model", "gpt-nano", "--block-size", "32", "--batch-size", "8", "--epochs", "2",
            "--save-every-steps", "10", "--keep-last", "2", "--sample-tokens", "0", "--wandb-mode", "disabled"]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """The uninterrupted reference: 2 processes, 2 epochs."""
    out = tmp_path_factory.mktemp("gpt") / "run"
    _lm(["--dataset", str(corpus), "--output-dir", str(out), *GPT_ARGS], nproc=2)
    return out


@pytest.mark.slow
def test_eval_only_gives_the_same_loss_on_1_2_and_3_processes(corpus, trained, tmp_path):
    evals = []
    for nproc in (1, 2, 3):
        target = tmp_path / f"eval{nproc}"
        _lm(["--dataset", str(corpus), "--eval-only", "--resume", str(trained / "checkpoints" / "best"),
             "--output-dir", str(target), "--wandb-mode", "disabled"], nproc=nproc)
        evals.append(json.loads((target / "eval.json").read_text()))
    best = json.loads((trained / "checkpoints" / "best" / "trainer_state.json").read_text())["best_epoch"]
    validated = _rows(trained)[best - 1]
    blocks = json.loads((trained / "config.json").read_text())["run_info"]["train_blocks"]
    for row in _rows(trained):  # every block once per epoch, its 31 predictions counted once (2 processes)
        assert (row["train_samples"], row["train_tokens"]) == (blocks, blocks * 31)
    for one in evals:
        assert one["val_tokens"] == evals[0]["val_tokens"] == validated["val_tokens"]  # every token once
        # Every block's forward pass in a batch of the same shape at any world size: the losses are the same to
        # the bit, only the order of the float64 sum differs.
        assert one["val_loss"] == pytest.approx(evals[0]["val_loss"], rel=1e-12)
        assert one["val_loss"] == pytest.approx(validated["val_loss"], rel=1e-12)
        assert one["val_perplexity"] == pytest.approx(math.exp(one["val_loss"]), rel=1e-12)


def _kill_after_first_step_checkpoint(args: list[str], out: Path, nproc: int) -> None:
    proc = start(args, nproc=nproc, script=LM)
    reached = wait_for(lambda: (out / "checkpoints").exists() and any(
        p.name.startswith("step-") for p in (out / "checkpoints").iterdir()), timeout=120, proc=proc)
    signal_tree(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert reached and proc.returncode != 0, output[-3000:]


@pytest.mark.slow
def test_sigkill_then_resume_auto_ends_bit_identical(corpus, trained, tmp_path):
    args = ["--dataset", str(corpus), "--output-dir", str(tmp_path), *GPT_ARGS]
    _kill_after_first_step_checkpoint(args, tmp_path, nproc=2)
    result = _lm(args, nproc=2)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(tmp_path), final_weights(trained))
    assert comparable(_rows(tmp_path)) == comparable(_rows(trained))


@pytest.mark.slow
def test_a_resume_on_3_processes_continues_the_epoch_with_each_block_once(corpus, trained, tmp_path):
    args = ["--dataset", str(corpus), "--output-dir", str(tmp_path), *GPT_ARGS]
    _kill_after_first_step_checkpoint(args, tmp_path, nproc=2)
    result = _lm(args, nproc=3)
    assert "resumed from" in result.stdout
    rows, reference = _rows(tmp_path), _rows(trained)
    # each training block once per epoch, whichever world size trained which part of it
    assert [r["train_tokens"] for r in rows] == [r["train_tokens"] for r in reference]
    assert rows[-1]["world_size"] == 3 and rows[-1]["val_tokens"] == reference[-1]["val_tokens"]


@pytest.mark.slow
def test_streaming_resumes_mid_epoch_bit_identical(corpus, tmp_path):
    """--streaming: documents tokenized and packed per rank as they are read; killed after a step checkpoint
    and resumed on the same world size, the run ends as the uninterrupted one."""
    args = ["--dataset", str(corpus), *GPT_ARGS, "--streaming", "--scheduler", "constant"]
    clean = tmp_path / "clean"
    _lm([*args, "--output-dir", str(clean)], nproc=2)
    killed = tmp_path / "killed"
    _kill_after_first_step_checkpoint([*args, "--output-dir", str(killed)], killed, nproc=2)
    assert "resumed from" in _lm([*args, "--output-dir", str(killed)], nproc=2).stdout
    assert_same_weights(final_weights(killed), final_weights(clean))
    assert comparable(_rows(killed)) == comparable(_rows(clean))


@pytest.mark.slow
def test_two_processes_accumulating_under_ddp_and_fsdp2_train_what_one_process_trains_on_the_batch(corpus, tmp_path):
    """1 process x 8 blocks, and 2 processes x 2 blocks x 2 accumulated micro-batches under DDP and under
    FSDP2: the same 8 blocks per optimizer step, every token weighted the same (the token count all-reduced
    and the gradients rescaled, sharded or not), so the same weights after an epoch (float32 summation order
    aside; gradient clipping and AdamW included)."""
    args = ["--dataset", str(corpus), "--model", "gpt-nano", "--block-size", "32", "--epochs", "1",
            "--sample-tokens", "0", "--wandb-mode", "disabled"]
    _lm([*args, "--batch-size", "8", "--output-dir", str(tmp_path / "one")], nproc=1)
    accumulating = [*args, "--batch-size", "2", "--grad-accum", "2"]
    _lm([*accumulating, "--output-dir", str(tmp_path / "two")], nproc=2)
    _lm([*accumulating, "--output-dir", str(tmp_path / "fsdp")], nproc=2, config="cpu_fsdp")
    one = final_weights(tmp_path / "one")
    for run_dir in ("two", "fsdp"):
        _assert_close_weights(one, final_weights(tmp_path / run_dir))
        [row_one], [row] = _rows(tmp_path / "one"), _rows(tmp_path / run_dir)
        assert (row_one["step"], row_one["train_tokens"]) == (row["step"], row["train_tokens"])
        assert row["val_loss"] == pytest.approx(row_one["val_loss"], rel=1e-4)


def _assert_close_weights(one: dict, two: dict) -> None:
    assert one.keys() == two.keys()
    for key in one:
        a, b = one[key], two[key]
        if key.endswith("attn.qkv.bias"):
            # The key bias shifts every score of a query equally, which softmax ignores: its true gradient is 0
            # and AdamW's step on it is float noise (grad / sqrt(v) of noise), different for any summation order.
            third = a.numel() // 3
            a, b = torch.cat([a[:third], a[2 * third:]]), torch.cat([b[:third], b[2 * third:]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------------------
# A transformers causal LM: FSDP2, sharded checkpoints, final/hf

HF_ARGS = ["--block-size", "32", "--batch-size", "8", "--lr", "3e-3", "--sample-tokens", "8",
           "--wandb-mode", "disabled"]


@pytest.mark.slow
def test_hf_gpt2_under_fsdp2_saves_sharded_resumes_and_exports_a_generating_model(corpus, tiny_gpt2, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", str(corpus), "--model", f"hf:{tiny_gpt2}", "--output-dir", str(out), *HF_ARGS]
    first = _lm([*args, "--epochs", "1"], nproc=2, config="cpu_fsdp")
    assert "FSDP2" in first.stdout
    checkpoint = (out / "checkpoints" / "best").resolve()  # the epoch's end
    assert sorted(p.name for p in checkpoint.rglob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a shard each
    # the second epoch recomputes each block in the backward pass (a flag a relaunch may change)
    second = _lm([*args, "--epochs", "2", "--activation-checkpointing"], nproc=2, config="cpu_fsdp")
    assert "resumed from" in second.stdout and "sample of the final weights" in second.stdout
    assert "relaunch: --activation-checkpointing False -> True" in second.stdout
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["val_loss"] < rows[0]["val_loss"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final" / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out / "final" / "hf")
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = tokenizer("the model reads", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    # the exported model scores validation as the run did: evaluate it on 1 process from its checkpoint
    target = tmp_path / "eval"
    _lm(["--dataset", str(corpus), "--model", f"hf:{tiny_gpt2}", "--eval-only", "--resume",
         str(out / "checkpoints" / "best"), "--output-dir", str(target), *HF_ARGS])
    assert json.loads((target / "eval.json").read_text())["val_loss"] == pytest.approx(rows[1]["val_loss"], rel=1e-6)
    # `launcher export` turns the sharded checkpoint into one plain file: the final weights, tie included
    from safetensors.torch import load_file

    exported = tmp_path / "exported.safetensors"
    subprocess.run([sys.executable, "-m", "launcher", "export", str(out / "checkpoints" / "best"), str(exported)],
                   check=True, env=make_env(), capture_output=True, timeout=120)
    assert_same_weights(load_file(exported), final_weights(out))


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, corpus, tiny_gpt2) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "numbers.csv").write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(20)))
    no_tokenizer = folder / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_gpt2 / name).exists():
            (no_tokenizer / name).write_bytes((tiny_gpt2 / name).read_bytes())
    for split in ("train", "validation"):
        (folder / "short" / split).mkdir(parents=True)
        (folder / "short" / split / "a.txt").write_text("too short for a block\n")
    return folder


BAD = [
    (["--dataset", "{bad}/numbers.csv"], "no text column found"),
    (["--dataset", "{corpus}", "--model", "hf:{gpt2}", "--block-size", "128"],
     "--block-size 128 is beyond the 64 positions of model hf:"),
    (["--dataset", "{corpus}", "--model", "hf:{bad}/no-tokenizer"], "has no tokenizer"),
    (["--dataset", "{bad}/short", "--block-size", "64"], "makes 0 block(s) of 64 tokens"),
    (["--model", "gpt-nano", "--from-scratch"], "--from-scratch is for hf: models"),
    (["--image-column", "x"], "unrecognized arguments: --image-column"),
    (["--streaming"], "--scheduler cosine needs the number of training steps"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=["no-text-column", "block-beyond-positions", "no-tokenizer",
                                                   "too-small", "from-scratch-builtin", "classify-flag",
                                                   "streaming-cosine"])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(bad_inputs, corpus, tiny_gpt2, tmp_path, args, needle):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = [a.format(bad=bad_inputs, corpus=corpus, gpt2=tiny_gpt2) for a in args]
    proc = subprocess.run([sys.executable, str(LM), *args, "--output-dir", str(out), "--wandb-mode", "disabled"],
                          env=make_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert needle in lines[-1], lines[-3:]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_sample_longer_than_the_context_and_best_metric_perplexity_end_the_run_cleanly(corpus, tiny_gpt2, tmp_path):
    """Two bugs a user met: a 32-token prompt plus 120 sampled tokens exceed the tiny GPT-2's 64 positions (the
    sample crashed a finished run with IndexError), and --best-metric val_perplexity was refused by argparse."""
    out = tmp_path / "run"
    args = ["--dataset", str(corpus), "--model", f"hf:{tiny_gpt2}", "--block-size", "32", "--batch-size", "8",
            "--epochs", "1", "--sample-tokens", "120", "--best-metric", "val_perplexity", "--wandb-mode", "disabled",
            "--output-dir", str(out)]
    result = subprocess.run([sys.executable, str(LM), *args], env=make_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sample of the final weights" in result.stdout and "warning: no sample" not in result.stdout
    best = json.loads((out / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert best["best_value"] == pytest.approx(_rows(out)[0]["val_perplexity"])
    proc = subprocess.run([sys.executable, str(LM), "--best-metric", "val_accuracy", "--output-dir",
                           str(tmp_path / "x")], env=make_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "val_perplexity" in proc.stderr.splitlines()[-1]  # the choices it offers exist
