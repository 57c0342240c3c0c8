"""The docs stay true: links resolve, the README stays a short front door, no drafts lie at the root, and the
README's tour and the Python examples in docs/ run exactly as written (a renamed flag fails here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, make_env, read_metrics, signal_tree, wait_for

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 12_000
# Markdown files that belong at the root; everything else goes into docs/.
ROOT_MARKDOWN = {"README.md", "CHANGELOG.md", "CONTRIBUTING.md", "LICENSE.md"}

FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def split_fences(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(the lines outside fenced code, the fenced blocks as (language, code))."""
    prose, blocks, language, code = [], [], None, []
    for line in text.splitlines():
        match = FENCE.match(line)
        if language is None and match:
            language, code = match.group(1), []
        elif language is not None and line.strip() == "```":
            blocks.append((language, "\n".join(code) + "\n"))
            language = None
        elif language is not None:
            code.append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    return {slug(line.lstrip("#")) for line in prose if re.match(r"^#{1,6} ", line)}


def test_every_relative_link_resolves_to_a_file_and_its_heading():
    broken = []
    for page in doc_files():
        prose, _ = split_fences(page.read_text())
        for target in LINK.findall("\n".join(prose)):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:: not ours to check offline
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading '{anchor}' in {file_part or page.name})")
    assert not broken, "\n".join(broken)


def test_readme_is_a_short_front_door():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move reference material into docs/"
    assert "docs/README.md" in README.read_text()


def test_no_notes_or_drafts_at_the_root():
    strays = [p.name for p in ROOT.iterdir() if p.is_file()
              and (re.search(r"note|draft|todo|scratch", p.name, re.I)
                   or (p.suffix.lower() == ".md" and p.name not in ROOT_MARKDOWN))]
    assert not strays, f"{strays} at the repository root: merge them into a page under docs/ and delete them"


# --- the README tour --------------------------------------------------------------------------------------


@dataclass
class Step:
    command: str
    interrupt: bool = False  # the README tells the reader to press Ctrl-C while it runs

    @property
    def args(self) -> list[str]:
        return shlex.split(self.command)

    def flag(self, name: str) -> str | None:
        args = self.args
        return args[args.index(name) + 1] if name in args else None


def tour_steps() -> list[Step]:
    text = README.read_text()
    start, end = text.index("<!-- tour -->"), text.index("<!-- /tour -->")
    _, blocks = split_fences(text[start:end])
    steps: list[Step] = []
    for language, code in blocks:
        assert language == "bash", f"the tour's code blocks are commands to run, not {language!r}"
        for line in code.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("#"):
                if "ctrl-c" in line.lower():
                    steps[-1].interrupt = True
            elif line:
                steps.append(Step(line))
    return steps


def test_the_tour_covers_what_the_readme_promises():
    steps = tour_steps()
    commands = [s.command for s in steps]
    assert any("recipes/classify.py" in c and "--num_processes" not in c for c in commands)
    assert any("cpu_ddp.yaml" in c and "--num_processes 2" in c for c in commands)
    interrupted = [i for i, s in enumerate(steps) if s.interrupt]
    assert interrupted and all(steps[i + 1].command == steps[i].command for i in interrupted), \
        "Ctrl-C must be followed by the very same command"
    assert any("--eval-only" in c for c in commands)
    assert any(c.startswith("launcher compare ") for c in commands)
    assert any(c.startswith("launcher submit ") and "--dry-run" in c for c in commands)
    assert any("--dataset diabetes" in c for c in commands)  # a task other than classification


def tour_env(home: Path) -> dict:
    """A fresh machine: an empty HOME, so no accelerate default config and no W&B credentials.

    W&B stays disabled (make_env), which saves ~3 s of CPU per run; the offline logging a new user gets is
    tested in tests/test_tracking.py.
    """
    env = make_env(HOME=str(home))
    for key in ("WANDB_API_KEY", "ACCELERATE_CONFIG_FILE"):
        env.pop(key, None)
    return env


def _like_a_terminal_job() -> None:
    # A job started in the background of a shell without job control inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt; a terminal's foreground job has the default action.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def shell(command: str, cwd: Path, env: dict) -> subprocess.Popen:
    # A session of its own: like a terminal's foreground job, so Ctrl-C (SIGINT) goes to its process group.
    return subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_like_a_terminal_job)


def finish(proc: subprocess.Popen, command: str, timeout: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_tree(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"`{command}` timed out after {timeout}s:\n{output[-4000:]}") from None
    return output


def press_ctrl_c_after_first_checkpoint(step: Step, cwd: Path, env: dict) -> str:
    checkpoints = cwd / step.flag("--output-dir") / "checkpoints"
    proc = shell(step.command, cwd, env)
    reached = wait_for(lambda: any(checkpoints.glob("step-*/manifest.json")), timeout=240, proc=proc)
    family = []
    if proc.poll() is None:
        family = [proc_info for proc_info in psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGINT)
    output = finish(proc, step.command)
    assert reached and proc.returncode != 0, f"`{step.command}` ended before Ctrl-C:\n{output[-3000:]}"
    # Whatever the run started (W&B's service) goes away with it; never leave a process behind.
    _, alive = psutil.wait_procs([p for p in family if p.is_running()], timeout=15)
    for leftover in alive:
        leftover.kill()
    return output


def check_step(step: Step, output: str, cwd: Path) -> None:
    """What the README says each kind of step leaves behind."""
    out_dir = cwd / step.flag("--output-dir") if step.flag("--output-dir") else None
    if "--eval-only" in step.args:
        result = json.loads((out_dir / "eval.json").read_text())
        assert 0 < result["val_accuracy"] <= 1 and result["val_confusion_matrix"], result
    elif "recipes/classify.py" in step.args and step.args[0] == "accelerate":
        assert (out_dir / "final" / "model.safetensors").exists(), output[-3000:]
        assert [row["epoch"] for row in read_metrics(out_dir)] == list(range(1, int(step.flag("--epochs") or 10) + 1))
        if "--num_processes" in step.args:
            assert read_metrics(out_dir)[-1]["world_size"] == int(step.flag("--num_processes"))
        if step.flag("--dataset") == "diabetes":  # the embedded regression: its own metrics, in its units
            row = read_metrics(out_dir)[-1]
            assert "problem type: regression" in output and row["val_r2"] > 0.3 and row["val_mae"] > 10, row
            assert not any("accuracy" in key for key in row), row
    elif step.args[:2] == ["launcher", "compare"]:
        for run in step.args[2:step.args.index("--plot") if "--plot" in step.args else None]:
            assert Path(run).name in output, output
        if step.flag("--plot"):
            assert (cwd / step.flag("--plot")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    elif step.args[:2] == ["launcher", "submit"]:
        assert output.startswith("#!/bin/bash") and f"#SBATCH --nodes={step.flag('--nodes')}" in output, output
        assert not list(cwd.glob("runs/classify-*")), "--dry-run must write nothing"


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """The README tour, run as written, from a folder that looks like a fresh checkout's root."""
    cwd = tmp_path_factory.mktemp("tour")
    for name in ("recipes", "accelerate_configs"):
        (cwd / name).symlink_to(ROOT / name)
    (cwd / "home").mkdir()
    env = tour_env(cwd / "home")
    outputs, timings = [], []
    steps = tour_steps()
    for i, step in enumerate(steps):
        started = time.monotonic()
        if step.interrupt:
            output = press_ctrl_c_after_first_checkpoint(step, cwd, env)
        else:
            proc = shell(step.command, cwd, env)
            output = finish(proc, step.command)
            assert proc.returncode == 0, f"`{step.command}` exited {proc.returncode}:\n{output[-4000:]}"
            if i > 0 and steps[i - 1].interrupt:
                assert "resumed from" in output, output[-3000:]
            check_step(step, output, cwd)
        outputs.append(output)
        timings.append((round(time.monotonic() - started, 1), step.command[:60]))
    print("\ntour step timings (s):", *timings, sep="\n  ")
    return cwd, env


@pytest.mark.slow
def test_readme_tour(tour):
    cwd, _ = tour
    assert list(cwd.glob("runs/*/final/model.safetensors"))


@pytest.mark.slow
def test_checkpoint_inference_snippet_runs_on_the_tour_run(tour):
    cwd, env = tour
    _, blocks = split_fences((DOCS / "checkpoints.md").read_text())
    [code] = [code for language, code in blocks if language == "python"]
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.startswith("tensor(["), result.stdout


# --- the Python API example -------------------------------------------------------------------------------


@pytest.mark.slow
def test_api_examples_run_and_continue_when_run_again(tmp_path):
    _, blocks = split_fences((DOCS / "api.md").read_text())
    examples = [code for language, code in blocks if language == "python"]
    assert examples, "docs/api.md has no ```python example"
    for number, code in enumerate(examples):
        script = tmp_path / f"example_{number}.py"
        script.write_text(code)
        for attempt in ("first", "again"):
            result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=make_env(),
                                    capture_output=True, text=True, timeout=180)
            assert result.returncode == 0, f"{attempt} run:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        if "resolve_resume" in code:  # the example says: run it again and it continues
            assert "resumed from" in result.stdout + result.stderr, result.stdout[-2000:]
