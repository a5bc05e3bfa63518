"""TrainConfig checks every option when it is made, and the CLI's training options come from it."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest

from pneumo import cli
from pneumo.cli.training import training_options
from pneumo.config import DEFAULT_UNFREEZE_EPOCHS, HEATMAP_CMAP, TrainConfig, option_flag
from pneumo.errors import PneumoError
from pneumo.nets.registry import BACKBONES

# field -> values that must be refused, each with an error naming the option as the CLI spells it
BAD = {
    "data": [3, None, b"chest_xray"],
    "image_size": [0, 31, 1025, -224, "224", 224.0, True, None],
    "valid_pct": [0, 0.0, 1, 1.5, -0.1, "0.2", math.nan, True],
    "split": ["patients", "", 1, None],
    "keep_val": ["yes", 1, None],
    "patient_rule": ["kermani", "", "regex:([", "regex:abc", "regex:", 5],
    "arch": ["resnet99", "", "EfficientNet_Lite0", None],
    "pretrained": ["yes", "ImageNet", None],
    "weights": [5, b"w.pth", ["w.pth"]],
    "epochs": [-1, 1.5, "8", None],
    "lr": [0, 0.0, -3e-3, math.inf, math.nan, "3e-3", None],
    "batch_size": [0, 1, -64, "8", 8.0, None],
    "weight_decay": [-1, -1e-9, math.inf, "0.01"],
    "unfreeze_epochs": [-1, 2.5, "4"],
    "unfreeze_lr": [0, -1e-3, math.nan, "1e-4"],
    "mode": ["fast", "Auto", "", None],
    "bn_adapt_images": [-1, 10.5, "1024"],
    "bn_adapt_batch_size": [1, 0, -8, "8"],
    "feature_views": [0, -1, 1.0],
    "trainable_stages": [-1, 5, 9, "2"],
    "augment": ["no", 0, None],
    "augment_policy": ["Radiograph", "strong", "", None],
    "consistency": [-1, -0.5, math.nan, "1"],
    "class_balance": ["balanced", "Weights", None],
    "threshold": ["sensitivty:0.95", "sensitivity:1.5", "sensitivity:0", "fixed:2", "fixed:x", "youden:1", "", 0.5],
    "tta": ["yes", 1],
    "seed": [-1, 2**32, 1.0, "42", None],
    "device": ["tpu", "gpu", "cuda:", "cuda:x", "CPU", "", None],
    "precision": ["bf61", "float32", "", None],
    "channels_last": [None, "true"],
    "out": [5, b"runs/x"],
}

# field -> values that must be accepted (and what they are stored as, where that differs)
GOOD = {
    "data": ["chest_xray", Path("chest_xray"), ""],
    "image_size": [32, 224, 1024],
    "valid_pct": [None, 0.2, 0.999],
    "split": ["patient", "random"],
    "keep_val": [True, False],
    "patient_rule": ["kermany", "filename", r"regex:^(\d+)_", r"regex:(?P<patient>\w+)-"],
    "arch": list(BACKBONES),
    "pretrained": ["imagenet", "none"],
    "weights": [None, "does/not/exist.pth", Path("w.safetensors")],
    "epochs": [0, 1, 30],
    "lr": [1e-6, 3e-3, 1],
    "batch_size": [2, 64],
    "weight_decay": [0, 0.0, 0.1],
    "unfreeze_epochs": [0, 4],
    "unfreeze_lr": [None, 1e-4],
    "mode": ["auto", "features", "full"],
    "bn_adapt_images": [0, 1024],
    "bn_adapt_batch_size": [2, 32],
    "feature_views": [1, 4],
    "trainable_stages": [0, 2, 4],
    "augment": [True, False],
    "augment_policy": ["standard", "radiograph"],
    "consistency": [0, 0.0, 4.0],
    "class_balance": ["none", "weights"],
    "threshold": ["youden", "sensitivity:0.95", "sensitivity:1", "fixed:0.5", "fixed:0"],
    "tta": [True, False],
    "seed": [0, 42, 2**32 - 1],
    "device": ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"],
    "precision": ["auto", "bf16", "fp16", "fp32"],
    "channels_last": [True, False],
    "out": [None, "runs/x", Path("runs/x")],
}


def test_every_field_has_help_and_is_in_both_tables():
    names = [f.name for f in fields(TrainConfig)]
    assert sorted(BAD) == sorted(names) and sorted(GOOD) == sorted(names)
    assert all(f.metadata["help"] for f in fields(TrainConfig))


@pytest.mark.parametrize("name, value", [(n, v) for n, values in BAD.items() for v in values])
def test_a_bad_value_is_refused_with_a_message_naming_the_option(name, value):
    with pytest.raises(PneumoError) as caught:
        TrainConfig(**{name: value, **({"unfreeze_epochs": 1} if name == "epochs" else {})})
    message = str(caught.value)
    assert option_flag(name) in message and repr(value) in message
    assert "\n" not in message


@pytest.mark.parametrize("name, value", [(n, v) for n, values in GOOD.items() for v in values])
def test_a_good_value_is_accepted_and_stored_plainly(name, value):
    config = TrainConfig(**{name: value, **({"unfreeze_epochs": 1} if name == "epochs" else {})})
    stored = getattr(config, name)
    assert stored == (str(value) if isinstance(value, Path) else value)
    kind = {"int": int, "float": float, "str": str, "bool": bool}
    annotation = str(TrainConfig.__dataclass_fields__[name].type).removesuffix(" | None")
    assert stored is None or type(stored) is kind[annotation]  # 1 -> 1.0 for --lr, Path -> str


@pytest.mark.parametrize(
    "name, value, says",
    [
        ("batch_size", 1, "an integer >= 2"),
        ("image_size", 0, "in 32..1024"),
        ("precision", "bf61", "auto, bf16"),
        ("valid_pct", 1.0, "strictly between 0 and 1"),
        ("trainable_stages", 5, "in 0..4"),
        ("lr", 0, "> 0"),
        ("device", "tpu", "cuda:N"),
        ("threshold", "sensitivity:1.5", "must lie in (0, 1]"),
        ("patient_rule", "regex:abc", "group"),
        ("patient_rule", "regex:([", "does not compile"),
        ("arch", "resnet99", "resnet50"),
    ],
)
def test_the_message_says_what_is_allowed(name, value, says):
    with pytest.raises(PneumoError, match=re.escape(says)):
        TrainConfig(**{name: value})


def test_at_least_one_epoch_in_total():
    with pytest.raises(PneumoError, match="at least one epoch") as caught:
        TrainConfig(epochs=0, unfreeze_epochs=0)
    assert "--epochs" in str(caught.value) and "--unfreeze-epochs" in str(caught.value)
    assert TrainConfig(epochs=0, unfreeze_epochs=2).unfreeze_epochs == 2


def test_the_defaults_are_valid_and_validate_rechecks_a_changed_config():
    config = TrainConfig()
    assert config.validate() is config
    assert (config.batch_size, config.unfreeze_epochs, config.threshold) == (64, 0, "sensitivity:0.95")
    config.batch_size = 1
    with pytest.raises(PneumoError, match="--batch-size"):
        config.validate()


def test_class_attributes_still_give_the_defaults():  # callers read e.g. TrainConfig.bn_adapt_batch_size
    assert TrainConfig.bn_adapt_batch_size == TrainConfig().bn_adapt_batch_size == 8
    assert TrainConfig.image_size == 224 and TrainConfig.arch == "efficientnet_lite0"


def test_an_old_run_config_with_mode_auto_loads_and_round_trips():
    old = {
        "data": "/data/chest_xray",
        "image_size": 224,
        "valid_pct": None,
        "split": "patient",
        "keep_val": False,
        "patient_rule": "kermany",
        "arch": "efficientnet_lite0",
        "pretrained": "imagenet",
        "weights": None,
        "epochs": 8,
        "lr": 0.003,
        "batch_size": 64,
        "unfreeze_epochs": 0,
        "unfreeze_lr": None,
        "mode": "auto",
        "augment": True,
        "class_balance": "weights",
        "threshold": "youden",
        "tta": False,
        "seed": 42,
        "device": "auto",
        "precision": "auto",
        "out": "runs/20240101-000000-efficientnet_lite0",
    }
    config = TrainConfig.from_dict(old)
    assert config.mode == "auto" and config.trainable_stages == TrainConfig.trainable_stages  # newer: default
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_unknown_keys_are_refused():
    with pytest.raises(PneumoError, match="batchsize"):
        TrainConfig.from_dict({"batchsize": 8})


def test_from_dict_checks_values_too():
    with pytest.raises(PneumoError, match="--precision"):
        TrainConfig.from_dict({"precision": "bf61"})


def test_importing_the_config_and_the_cli_loads_no_torch():
    code = (  # every module of the cli package, whether build_parser reaches it or not
        "import importlib, pkgutil, sys, pneumo.cli, pneumo.config\n"
        "for m in pkgutil.iter_modules(pneumo.cli.__path__):\n"
        "    m.name == '__main__' or importlib.import_module('pneumo.cli.' + m.name)\n"
        "print('torch' in sys.modules, sum(name.startswith('pneumo.cli.') for name in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch_loaded, cli_modules = out.stdout.split()
    assert torch_loaded == "False" and int(cli_modules) >= 9  # common, data, training, reading, ...


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, flag",
    [
        (["--threshold", "sensitivty:0.95"], "--threshold"),
        (["--precision", "bf61"], "--precision"),
        (["--batch-size", "0"], "--batch-size"),
        (["--image-size", "0"], "--image-size"),
        (["--feature-views", "0"], "--feature-views"),
        (["--device", "tpu"], "--device"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--lr", "nan"], "--lr"),
        (["--split", "image"], "--split"),
        (["--patient-rule", "regex:abc"], "--patient-rule"),
        (["--trainable-stages", "7"], "--trainable-stages"),
        (["--epochs", "0"], "--epochs"),
        (["--arch", "vgg16"], "--arch"),
    ],
)
def test_train_refuses_a_mistyped_option_before_reading_data_or_making_the_run_folder(tmp_path, capsys, bad, flag):
    out = tmp_path / "run"
    missing_data = tmp_path / "no-such-data"  # reading it would fail with a different message
    assert cli.main(["train", str(missing_data), "--out", str(out), *bad]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pneumo: error: ") and flag in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "bad, flag",
    [
        (["--batch-size", "1"], "--batch-size"),
        (["--device", "tpu"], "--device"),
        (["--precision", "bf61"], "--precision"),
    ],
)
def test_lr_find_refuses_a_mistyped_option_before_making_its_folder(tmp_path, capsys, bad, flag):
    out = tmp_path / "lr"
    assert cli.main(["lr-find", str(tmp_path / "no-such-data"), "--out", str(out), *bad]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pneumo: error: ") and flag in lines[0]
    assert not out.exists()


def help_of(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, flag: str) -> str:
    """The help of one option: its entry in the option list (from a line that starts with the
    option to the next such line), with argparse's line wrapping undone."""
    entries = [" ".join(entry.split()) for entry in re.split(r"\n  (?=-)", text)]
    found = [e for e in entries if re.match(rf"{re.escape(flag)}(?=[ ,]|$)", e)]
    assert len(found) == 1, flag
    return found[0]


@pytest.mark.parametrize(
    "flag, name",
    [
        ("--batch-size", "batch_size"),
        ("--lr", "lr"),
        ("--trainable-stages", "trainable_stages"),
        ("--threshold", "threshold"),
        ("--unfreeze-epochs", "unfreeze_epochs"),
        ("--image-size", "image_size"),
    ],
)
def test_train_help_shows_the_config_defaults(capsys, flag, name):
    default = getattr(TrainConfig, name)
    assert f"(default: {default})" in option_help(help_of(capsys, "train"), flag)


def test_train_help_describes_every_option_from_the_config(capsys):
    text = help_of(capsys, "train")
    for f in fields(TrainConfig):
        if f.name != "data":
            assert f.metadata["help"] in option_help(text, option_flag(f.name)), f.name
    assert f"--unfreeze-epochs {DEFAULT_UNFREEZE_EPOCHS}" in option_help(text, "--unfreeze")
    augment = option_help(text, "--augment")
    assert augment.startswith("--augment, --no-augment") and "(default: on)" in augment


def test_lr_find_takes_the_options_that_shape_the_first_phase_only(capsys):
    text = " ".join(help_of(capsys, "lr-find").split())
    assert "--batch-size" in text and "--trainable-stages" in text and "--no-augment" in text
    assert "--epochs" not in text and "--threshold" not in text and "--unfreeze" not in text


def test_old_flag_spellings_still_parse():
    args = cli.build_parser().parse_args(
        [
            "train",
            "DATA",
            "--no-augment",
            "--keep-val",
            "--image-size",
            "64",
            "--unfreeze",
            "--unfreeze-epochs",
            "2",
            "--unfreeze-lr",
            "1e-4",
            "--threshold",
            "fixed:0.5",
            "--tta",
            "--epochs",
            "3",
            "--lr",
            "0.01",
        ]
    )
    assert training_options(args, "train") == {
        "augment": False,
        "keep_val": True,
        "image_size": 64,
        "unfreeze_epochs": 2,
        "unfreeze_lr": 1e-4,
        "threshold": "fixed:0.5",
        "tta": True,
        "epochs": 3,
        "lr": 0.01,
    }
    assert args.unfreeze


@pytest.fixture
def given_to_train(monkeypatch):
    """Stand in for the training loop (never imported here): record the options the handler
    passes, then stop with an error."""
    calls: list[dict] = []

    def fake_train(data=None, **options):
        calls.append(options)
        raise PneumoError("stopped by the test")

    monkeypatch.setitem(sys.modules, "pneumo.training.loop", types.SimpleNamespace(train=fake_train))
    return calls


@pytest.mark.parametrize(
    "argv, unfreeze_epochs",
    [
        ([], None),
        (["--unfreeze"], DEFAULT_UNFREEZE_EPOCHS),
        (["--unfreeze-epochs", "2"], 2),
        (["--unfreeze", "--unfreeze-epochs", "1"], 1),
    ],
)
def test_unfreeze_is_a_shorthand_and_unfreeze_epochs_counts_on_its_own(given_to_train, tmp_path, argv, unfreeze_epochs):
    assert cli.main(["train", str(tmp_path), "--epochs", "1", *argv]) == 2
    assert given_to_train[0].get("unfreeze_epochs") == unfreeze_epochs  # None: the library's default, 0
    assert given_to_train[0]["epochs"] == 1 and "batch_size" not in given_to_train[0]  # only what was given


def test_unfreeze_with_zero_unfreeze_epochs_is_refused(given_to_train, tmp_path, capsys):
    assert cli.main(["train", str(tmp_path), "--unfreeze", "--unfreeze-epochs", "0"]) == 2
    assert "--unfreeze-epochs" in capsys.readouterr().err and not given_to_train


def test_resume_with_other_training_options_names_them(tmp_path, capsys, given_to_train):
    run = tmp_path / "run"
    code = cli.main(
        ["train", "--resume", "--out", str(run), "--epochs", "3", "--lr", "0.1", "--no-augment", "--unfreeze"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pneumo: error: --resume")
    assert all(flag in err for flag in ("--epochs", "--lr", "--augment", "--unfreeze"))
    assert "--out" not in err.split("cannot change:")[1].split("(")[0]
    assert not given_to_train and not run.exists()


def test_resume_with_only_out_reaches_the_training_loop(tmp_path, given_to_train):
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "run")]) == 2
    assert given_to_train == [{"resume": True, "out": str(tmp_path / "run"), "progress": True, "track": []}]


def test_explain_cmap_default_is_the_one_the_heatmaps_use():
    """The CLI and the library read one default: pneumo.config.HEATMAP_CMAP."""
    from pneumo.infer.explain import DEFAULT_CMAP as DEFAULT_HEATMAP_CMAP

    args = cli.build_parser().parse_args(["explain", "MODEL", "IMAGE"])
    assert args.cmap == HEATMAP_CMAP == DEFAULT_HEATMAP_CMAP


def test_the_library_refuses_options_given_with_resume_too(tmp_path):
    """`train(resume=True, out=RUN, epochs=5)` must not quietly run the old config's epochs."""
    from pneumo.run_folder import RunFolder
    from pneumo.training.loop import train

    RunFolder(tmp_path).write_config(TrainConfig(data=str(tmp_path / "data")))
    with pytest.raises(PneumoError, match="cannot change: epochs, lr"):
        train(resume=True, out=str(tmp_path), epochs=5, lr=0.1, progress=False)
    with pytest.raises(PneumoError, match="cannot change: data"):
        train(tmp_path / "other", resume=True, out=str(tmp_path), progress=False)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--start-lr", "0"], "--start-lr and --end-lr must be finite numbers above 0"),
        (["--end-lr", "inf"], "--start-lr and --end-lr must be finite numbers above 0"),
        (["--start-lr", "1", "--end-lr", "1"], "must lie below --end-lr"),
        (["--num-it", "2"], "--num-it must be an integer >= 3"),
    ],
)
def test_lr_find_refuses_a_ramp_that_cannot_run_before_reading_data(tmp_path, capsys, argv, says):
    out = tmp_path / "lr"
    assert cli.main(["lr-find", str(tmp_path / "no-data"), "--out", str(out), *argv]) == 2
    assert says in capsys.readouterr().err and not out.exists()
