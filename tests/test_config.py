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
