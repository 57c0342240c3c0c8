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
