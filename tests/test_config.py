"""The recipe's configuration: precedence, types, and one-line errors for bad input."""

import pytest

from launcher.config import TrainConfig, build_parser, parse_config
from launcher.errors import UsageError


def test_cli_overrides_yaml_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\nepochs: 7\nbatch-size: 16\nwandb_tags: [a, b]\n")
    cfg = parse_config(["--config", str(cfg_file), "--lr", "0.1"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.wandb_tags) == (0.1, 7, 16, ["a", "b"])
    assert cfg.weight_decay == TrainConfig().weight_decay


@pytest.mark.parametrize("text,message", [
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("lr: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
    ("epochs: many\n", "'epochs' must be int"),
])
def test_bad_yaml(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=message):
        parse_config(["--config", str(f)])


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--scheduler", "nope"], "invalid choice"),
    (["--scheduler", "plateau", "--warmup-steps", "10"], "--warmup-steps works with"),
    (["--eval-only"], "--eval-only needs --resume"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--config", "/nonexistent.yaml"], "cannot read config file"),
])
def test_bad_flags(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


def test_every_field_has_help():
    text = build_parser().format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text


def test_yaml_strings_are_parsed_like_the_command_line(tmp_path):
    """YAML 1.1 reads `lr: 3e-4` (no dot) as a string; the CLI's parser turns it into the number."""
    f = tmp_path / "c.yaml"
    f.write_text('lr: 3e-4\nepochs: "5"\neval_only: "no"\nmax_grad_norm: none\n')
    cfg = parse_config(["--config", str(f)])
    assert (cfg.lr, cfg.epochs, cfg.eval_only, cfg.max_grad_norm) == (3e-4, 5, False, None)


@pytest.mark.parametrize("argv,message", [
    (["--best-metric", "val_acc"], "invalid choice: 'val_acc'"),
    (["--plateau-factor", "5"], "--plateau-factor must be between 0 and 1"),
    (["--plateau-factor", "0"], "--plateau-factor must be between 0 and 1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be 0"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--lr", "inf"], "--lr must be a finite number"),
])
def test_ranges_and_metric_names_are_checked_when_parsed(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


def test_every_key_has_a_relaunch_rule():
    from launcher.config import RELAUNCH_RULES, relaunch_rule

    rules = {name: relaunch_rule(name) for name in TrainConfig.__dataclass_fields__}
    assert set(rules.values()) <= set(RELAUNCH_RULES)
    for name in ("dataset", "image_column", "label_column", "val_fraction", "model", "seed", "lr"):
        assert rules[name] == "fixed", name
    assert rules["batch_size"] == rules["grad_accum"] == "refuse-mid-epoch"
    assert rules["epochs"] == rules["early_stopping_patience"] == rules["eval_batch_size"] == "apply"
    assert rules["output_dir"] == rules["resume"] == rules["eval_only"] == "launch"


@pytest.mark.parametrize("argv", [["--batch_size=32"], ["--batch_size", "32"], ["--batch-size=32"]])
def test_underscore_flags_fill_the_same_key(argv):
    # W&B sweep files and HF users write parameter names with underscores; the agent passes `--name=value`.
    cfg = parse_config(argv + ["--max_grad_norm=0.5", "--streaming=False", "--eval_only=false"])
    assert (cfg.batch_size, cfg.max_grad_norm, cfg.streaming, cfg.eval_only) == (32, 0.5, False, False)
    assert "batch-size" not in cfg.to_dict()


def test_help_is_grouped_with_plain_switches_and_no_underscore_duplicates():
    text = build_parser().format_help()
    for section in ("data:", "model:", "optimisation:", "output, checkpoints and resume:", "faults:",
                    "tracking (W&B):"):
        assert f"\n{section}\n" in text
    assert "  --streaming  " in text and "[STREAMING]" not in text and "--batch_size" not in text
    assert parse_config(["--streaming"]).streaming is True


@pytest.mark.parametrize("url", ["s3://bucket/run", "gs://b/r", "hf://datasets/x", "file:///tmp/x"])
def test_a_remote_output_dir_is_refused(url):
    with pytest.raises(UsageError, match="remote storage is not supported yet"):
        parse_config(["--output-dir", url])


def test_default_output_folders_never_collide_and_follow_a_sweep():
    cfg = TrainConfig()
    folders = {cfg.resolved_output_dir(environ={}) for _ in range(50)}  # all within the same second
    assert len(folders) == 50 and all(f.parent.name == "runs" for f in folders)
    sweep = {"WANDB_SWEEP_ID": "abc123", "WANDB_RUN_ID": "run42"}
    assert str(cfg.resolved_output_dir(environ=sweep)) == "runs/abc123/run42"
    assert str(TrainConfig(output_dir="out").resolved_output_dir(environ=sweep)) == "out"


@pytest.mark.parametrize("env,expected", [({}, "none"), ({"WANDB_LOG_MODEL": "end"}, "final"),
                                          ({"WANDB_LOG_MODEL": "checkpoint"}, "checkpoints"),
                                          ({"WANDB_LOG_MODEL": "false"}, "none"),
                                          ({"WANDB_LOG_MODEL": "best"}, "best")])
def test_wandb_log_model_reads_hf_values(env, expected):
    assert TrainConfig().log_model(env) == expected
    assert TrainConfig(wandb_log_model="final").log_model(env) == "final"


def test_wandb_log_model_refuses_an_unknown_value():
    with pytest.raises(UsageError, match="WANDB_LOG_MODEL='sometimes'"):
        TrainConfig().log_model({"WANDB_LOG_MODEL": "sometimes"})
