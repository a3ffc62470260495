import io
import time

import pytest

import common
from common import ConfigError, load_config, parse_args


def test_defaults_and_file_merge():
    cfg = load_config("kitti128.yaml")
    assert cfg.data.size == [128, 128] and cfg.run.dir == "runs/kitti128"
    assert cfg.run.seed == 0  # from configs/defaults/run.yaml
    assert load_config("kitti128").data.size == [128, 128]  # the .yaml suffix is optional


def test_overrides_dotted_and_typed():
    cfg = load_config(None, ["run.seed=7", "data.size=[32, 48]", ("run.precision", "bf16")])
    assert cfg.run.seed == 7 and cfg.data.size == [32, 48] and cfg.run.precision == "bf16"
    # YAML 1.1 reads '1e-5' as a string; an override means the number
    assert load_config(None, ["structure.beta=1e-5"]).structure.beta == 1e-5


def test_int_accepted_for_float_and_bool_strict():
    value = common._check_value("a.lr", 1, 0.5, "test")
    assert value == 1.0 and isinstance(value, float)
    with pytest.raises(ConfigError, match="expects bool"):
        common._check_value("a.flag", 1, True, "test")
    assert common._check_value("a.any", "x", None, "test") == "x"  # null defaults accept anything


@pytest.mark.parametrize("override, words", [
    ("run.sed=3", ["unknown config key", "run.sed"]),
    ("nosection.x=3", ["unknown config key", "nosection"]),
    ("run.seed=abc", ["run.seed", "expects int", "str"]),
    ("run.seed=1.5", ["run.seed", "expects int", "float"]),
    ("data.size=64", ["data.size", "expects list"]),
    ("structure.lr=-1", ["structure.lr must be > 0, got -1.0"]),
    ("image.batch_size=0", ["image.batch_size must be >= 1"]),
    ("structure.kl_balance=1", ["structure.kl_balance must be in [0, 1)"]),
    ("structure.adam_betas=[0.9, 1.5]", ["structure.adam_betas must be in [0, 1)"]),
    ("data.size=[0, 64]", ["data.size must be >= 1"]),
    ("rollout.frames=0", ["rollout.frames must be >= 1"]),
    ("image.lambda_gan=-0.5", ["image.lambda_gan must be >= 0"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  seeed: 1\n")
    with pytest.raises(ConfigError, match=r"run\.seeed.*bad\.yaml"):
        load_config(str(path))


def test_inherit(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text("inherit: kitti64.yaml\nrun:\n  seed: 5\n")
    cfg = load_config(str(path))
    assert cfg.run.seed == 5 and cfg.run.dir == "runs/kitti64"


def test_missing_config_lists_available():
    with pytest.raises(ConfigError, match="available: .*kitti64.yaml"):
        load_config("nope.yaml")


def test_parse_args_forms():
    cfg, args = parse_args(["--cfg", "synth_dance.yaml", "--run.seed", "3", "--run.device=cpu", "--resume"])
    assert cfg.data.num_classes == 25 and cfg.run.seed == 3 and cfg.run.device == "cpu" and args.resume == "auto"
    cfg, args = parse_args(["--s=4", "--resume=x.pt"], aliases={"s": "run.seed"})
    assert cfg.run.seed == 4 and args.resume == "x.pt"
    with pytest.raises(ConfigError, match="needs a value"):
        parse_args(["--run.seed"])


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["-h"], description="toy")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--run.seed=0" in out and "--data.root=" in out


def test_every_shipped_config_loads():
    from data.synthetic import KINDS
    for path in sorted(common.CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(str(path))
        if cfg.data.synth != "none":   # the generator's classes
            assert cfg.data.num_classes == len(KINDS[cfg.data.synth][1]), path
        else:                          # Cityscapes / KITTI trainIds or the 24 DensePose parts + background
            assert cfg.data.num_classes in (19, 25), path


def test_duplicate_yaml_key_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a second section block must be an error instead."""
    path = tmp_path / "twice.yaml"
    path.write_text("run:\n  seed: 1\nrun:\n  seed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'run'"):
        load_config(str(path))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_redraws_rarely_in_a_log():
    log = io.StringIO()
    for _ in common.progress(range(50), file=log, desc="steps"):
        time.sleep(0.01)
    text = log.getvalue()
    # over these 0.5 s tqdm's default 0.1 s would redraw about 5 times; in a log only the first and final state
    assert text.count("\r") <= 3, text
    assert "50/50" in text
    with common.progress(total=1, file=_Terminal()) as terminal_bar, common.progress(total=1, file=log) as log_bar:
        assert terminal_bar.mininterval == 0.1 and log_bar.mininterval == common.LOG_REDRAW_SECONDS
        assert log_bar.maxinterval == common.LOG_REDRAW_SECONDS


def test_precision_auto_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    import contextlib

    import torch
    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: True)
    assert common.resolve_precision("auto", cpu) == "bf16"
    assert common.autocast(cpu, "auto").fast_dtype == torch.bfloat16
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: False)
    assert common.resolve_precision("auto", cpu) == "fp32"
    assert isinstance(common.autocast(cpu, "auto"), contextlib.nullcontext)
    assert common.resolve_precision("bf16", cpu) == "bf16"          # an explicit choice is kept
    with pytest.raises(common.ConfigError, match="run.precision must be auto, fp32, bf16 or fp16"):
        common.autocast(cpu, "fp8")
