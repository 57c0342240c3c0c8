"""Start-up probe: runs recipes/classify.py unchanged and records when it reaches its first training step.

    accelerate launch bench/first_step.py --timestamps out.json [recipe flags]

Writes wall-clock timestamps (time.time(), comparable with the launching process's) to --timestamps:
script_start (the interpreter runs this file), imports_done (torch, accelerate, datasets, launcher and the
recipe imported), fit_called (data loaded, model built, fit entered) and first_step (the first optimizer
step has run), then exits at once: the rest of training is not part of start-up.
"""

import time

SCRIPT_START = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--timestamps")
    out = Path(argv[i + 1])
    del argv[i:i + 2]
    marks = {"script_start": SCRIPT_START}

    from torch.optim.optimizer import register_optimizer_step_post_hook

    import launcher
    import launcher.loop

    sys.path.insert(0, str(ROOT / "recipes"))
    import classify

    marks["imports_done"] = time.time()
    fit = classify.fit

    def timed_fit(*args, **kwargs):
        marks["fit_called"] = time.time()
        return fit(*args, **kwargs)

    def first_step(optimizer, args, kwargs):
        marks["first_step"] = time.time()
        if int(os.environ.get("RANK", 0)) == 0:
            out.write_text(json.dumps(marks))
        # Every rank stops here; torchrun sees a clean exit of each.
        sys.stdout.flush()
        os._exit(0)

    classify.fit = launcher.fit = launcher.loop.fit = timed_fit
    register_optimizer_step_post_hook(first_step)
    sys.exit(classify.main(argv))


if __name__ == "__main__":
    main()
