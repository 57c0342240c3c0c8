"""Memory per rank of FSDP2 against DDP for a language model: parameters, gradients, optimizer state.

    python bench/lm_memory.py                      # both configs on 2 processes, about a minute
    python bench/lm_memory.py --model gpt-mini     # smaller and quicker

Each config runs `accelerate launch --config_file accelerate_configs/cpu_{ddp,fsdp}.yaml` on this script
with `--worker`: the built-in GPT (byte tokenizer, blocks of 64), AdamW, and a few steps of `fit(task=
CausalLM())` on the stdlib corpus, as recipes/lm.py trains. Then every rank counts the bytes it holds
itself: its parameters (the local shard of a DTensor under FSDP2), its gradients (read before the last
step's zero_grad, by a hook on the optimizer), its AdamW state (exp_avg, exp_avg_sq), and its peak RSS
(`ru_maxrss`, which also holds torch itself and the activations). The tensor counts are exact; RSS is what
the operating system saw.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BLOCK = 64


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(model_name: str, steps: int, out: Path) -> None:
    from launcher import CausalLM, fit, make_accelerator
    from launcher.data import make_loader
    from launcher.data.lm.blocks import load_lm_splits
    from launcher.data.lm.corpus import NAME
    from launcher.models import hf
    from launcher.models.gpt import build_gpt
    from launcher.parallel.fsdp import distributed_label

    accelerator = make_accelerator(seed=0)
    world = accelerator.num_processes
    with accelerator.main_process_first():
        data = load_lm_splits(NAME, hf.load_lm_tokenizer("byte"), block_size=BLOCK, seed=0, world_size=world)
    data.train, data.val = data.train.sample(steps * world, 0), data.val.sample(world, 0)
    torch.manual_seed(0)
    model = build_gpt(model_name, vocab_size=len(data.tokenizer), block_size=BLOCK)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grads: dict[str, int] = {}

    def count_grads(*_args, **_kwargs) -> None:  # before optimizer.step: the gradients every step holds
        grads["bytes"] = _local_bytes(p.grad for group in optimizer.param_groups for p in group["params"])

    optimizer.register_step_pre_hook(count_grads)
    fit(model, optimizer, make_loader(data.train, 1, shuffle=True), make_loader(data.val, 1, shuffle=False),
        epochs=1, task=CausalLM(), accelerator=accelerator, progress=False, find_unused_parameters="off")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    result = {"rank": accelerator.process_index, "world_size": world, "distributed": distributed_label(accelerator),
              "parameters": sum(p.numel() for p in model.parameters()) if not hasattr(params[0], "to_local")
              else sum(p.numel() for p in params),
              "param_bytes": _local_bytes(params), "grad_bytes": grads.get("bytes", 0),
              "optimizer_bytes": _local_bytes(state),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt-small")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench" / "lm_memory.json"))
    args = p.parse_args(argv)
    if args.worker:
        worker(args.model, args.steps, Path(args.worker))
        return 0
    results = {}
    for config in ("cpu_ddp", "cpu_fsdp"):
        with tempfile.TemporaryDirectory() as tmp:
            yaml = ROOT / "accelerate_configs" / f"{config}.yaml"
            subprocess.run(["accelerate", "launch", "--config_file", str(yaml), "--num_processes", str(args.nproc),
                            __file__, "--model", args.model, "--steps", str(args.steps), "--worker", tmp],
                           check=True, cwd=ROOT)
            results[config] = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    mib = 2 ** 20
    print(f"{args.model}, {args.nproc} processes, float32, AdamW; MiB per rank (rank 0 / rank 1 ...)")
    print("| config | parameters | gradients | AdamW state | sum | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for ranks in results.values():
        cells = []
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            cells.append(" / ".join(f"{r[key] / mib:.1f}" for r in ranks))
        cells.append(" / ".join(f"{(r['param_bytes'] + r['grad_bytes'] + r['optimizer_bytes']) / mib:.1f}"
                                for r in ranks))
        cells.append(" / ".join(f"{r['peak_rss_bytes'] / mib:.0f}" for r in ranks))
        print(f"| {ranks[0]['distributed']} | " + " | ".join(cells) + " |")
    held = {c: sum(r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] for r in ranks) / len(ranks)
            for c, ranks in results.items()}
    print(f"FSDP2 / DDP, parameters + gradients + optimizer state per rank: {held['cpu_fsdp'] / held['cpu_ddp']:.3f}")
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
