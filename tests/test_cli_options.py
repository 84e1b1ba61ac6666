"""One way to say each thing on the command line: the options every command shares, read the
same way, with help and defaults shown (issue "The first hour of a user")."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttakit.cli import AMP_HELP, COMMAND_SPLITS, DEVICE_HELP, EXIT_BAD_INPUT, build_parser, main

from ._fixtures import write_halves_npz

pytestmark = pytest.mark.usefixtures("single_thread")

# Every command that runs a model; a new one is covered by the table test below (it must be here).
MODEL_COMMANDS = {"train", "lr-find", "audit", "ensemble", "evaluate", "search", "predict", "export"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _one_line_exit_2(capsys, argv: list[str], *fragments: str) -> str:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # a usage error: argparse exits after one line
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("opts")
    data = write_halves_npz(root / "halves.npz", n=120)
    out = root / "ckpt"
    assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "16", "--out", str(out),
                 "--no-progress"]) == 0  # a global option after the command
    return root, data, out


# --------------------------------------------------------------------------- help and defaults


def test_every_command_is_one_module_with_add_parser_and_run():
    import ttakit.cli as cli

    names = [module.NAME for module in cli.COMMANDS]
    assert sorted(names) == sorted(_commands())  # the registry is the parser's list of commands
    for module in cli.COMMANDS:
        assert module.__name__ == "ttakit.cli." + module.NAME.replace("-", "_")
        assert callable(module.add_parser) and callable(module.run)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_has_help_and_shows_its_default(command):
    parser = _commands()[command]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{command} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            formatter = parser._get_formatter()
            shown = formatter._expand_help(action) if "%" in formatter._get_help_string(action) else action.help
            assert "default" in formatter._get_help_string(action), f"{command} {action.option_strings[0]}: {shown}"
    assert "(default: " in text or command in ("audit-apply",)


def test_model_commands_share_device_and_amp_with_one_help():
    commands = _commands()
    with_device = {name for name, p in commands.items() if any("--device" in a.option_strings for a in p._actions)}
    assert with_device == MODEL_COMMANDS
    for name in MODEL_COMMANDS:
        actions = {a.option_strings[0]: a for a in commands[name]._actions if a.option_strings}
        assert actions["--device"].help.startswith(DEVICE_HELP), name
        assert actions["--amp"].help == AMP_HELP, name


def _argv_for(command: str, root: Path, ckpt: Path) -> list[str]:
    """The least each model-running command needs: a bad --device is refused before any work."""
    return {
        "train": ["train", "--out", root / "t"],
        "lr-find": ["lr-find", "--out", root / "lr.png"],
        "audit": ["audit", ckpt, "--out", root / "a"],
        "ensemble": ["ensemble", ckpt, ckpt, "--out", root / "e"],
        "evaluate": ["evaluate", ckpt, "--out", root / "ev"],
        "search": ["search", ckpt, "--out", root / "p.json"],
        "predict": ["predict", ckpt, root, "--out", root / "p.csv"],
        "export": ["export", ckpt, "--format", "onnx", "--out", root / "m.onnx"],
    }[command]


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_a_bad_device_is_one_line_and_exit_2_on_every_model_command(command, checkpoint, tmp_path, capsys):
    _, _, ckpt = checkpoint
    argv = [*_argv_for(command, tmp_path, ckpt), "--device", "tpu"]
    _one_line_exit_2(capsys, ["--no-progress", *argv], f"ttakit {command}: error:", "device must be", "'tpu'")
    assert not any(p.name in ("t", "a", "e", "ev", "p.json", "p.csv", "m.onnx", "lr.png") for p in tmp_path.iterdir())


def test_train_and_lr_find_run_with_amp_on_the_cpu(checkpoint, tmp_path, capsys):
    _, data, _ = checkpoint
    assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--amp",
                 "--out", str(tmp_path / "amp"), "--no-progress"]) == 0
    config = json.loads((tmp_path / "amp" / "checkpoint.json").read_text())["extra"]["train_config"]
    assert config["amp"] is True and config["device"] == "cpu"
    assert main(["--no-progress", "lr-find", "--data", str(data), "--batch-size", "16", "--steps", "8", "--amp",
                 "--out", str(tmp_path / "lr.png")]) == 0
    assert (tmp_path / "lr.png").exists() and "suggested rate" in capsys.readouterr().out


# --------------------------------------------------------------------------- global options


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_before_or_after_the_command(where, checkpoint, tmp_path, capsys):
    _, _, ckpt = checkpoint
    command = ["evaluate", str(ckpt), "--policy", "none", "--no-plots", "--out", str(tmp_path / "ev")]
    flags = ["--no-progress", "--debug"]
    argv = [*flags, *command] if where == "before" else [*command, *flags]
    args = build_parser().parse_args(argv)
    assert args.no_progress is True and args.debug is True and args.command == "evaluate"
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "results written to" in captured.out and "\r" not in captured.err  # no progress bar drawn
    plain = build_parser().parse_args(command)
    assert plain.no_progress is False and plain.debug is False


# --------------------------------------------------------------------------- --split


@pytest.mark.parametrize("command", sorted(COMMAND_SPLITS))
def test_split_offers_only_what_the_command_accepts(command):
    parser = _commands()[command]
    action = next(a for a in parser._actions if "--split" in a.option_strings)
    assert action.metavar == "{" + ",".join(COMMAND_SPLITS[command]) + "}"
    assert "--split {" + ",".join(COMMAND_SPLITS[command]) + "}" in " ".join(parser.format_usage().split())


@pytest.mark.parametrize("command,split", [("search", "test"), ("search", "train"), ("ensemble", "val"),
                                           ("ensemble", "train")])
def test_a_split_the_command_refuses_says_why_in_one_line(command, split, tmp_path, capsys):
    members = [tmp_path / "no-such-checkpoint"] * (2 if command == "ensemble" else 1)
    _one_line_exit_2(capsys, [command, *members, "--split", split], f"--split {split}")


@pytest.mark.parametrize("command", sorted(COMMAND_SPLITS))
def test_an_unknown_split_lists_the_accepted_ones(command, tmp_path, capsys):
    members = [tmp_path / "m"] * (2 if command == "ensemble" else 1)
    _one_line_exit_2(capsys, [command, *members, "--split", "bogus"],
                     f"{command} takes --split {' or '.join(COMMAND_SPLITS[command])}, got 'bogus'")


# --------------------------------------------------------------------------- one name per meaning of a seed


@pytest.mark.parametrize("command,flag,dest", [("ensemble", "--tie-break-seed", "tie_break_seed"),
                                               ("predict", "--tie-break-seed", "tie_break_seed"),
                                               ("audit", "--fold-seed", "fold_seed")])
def test_each_seed_has_its_own_name_and_the_old_spelling_still_works(command, flag, dest):
    base = {"ensemble": ["ensemble", "a", "b"], "predict": ["predict", "a", "imgs", "--out", "p.csv"],
            "audit": ["audit", "a"]}[command]
    parser = build_parser()
    assert getattr(parser.parse_args([*base, flag, "7"]), dest) == 7
    assert getattr(parser.parse_args([*base, "--seed", "5"]), dest) == 5  # deprecated alias
    assert "deprecated" in _commands()[command].format_help()
    assert build_parser().parse_args(["train", "--out", "x", "--seed", "3"]).seed == 3  # the training seed


# --------------------------------------------------------------------------- one list syntax, one size syntax


@pytest.mark.parametrize(
    "argv,dest,expected",
    [
        (["train", "--out", "x", "--augment", "flip,shift"], "augment", ["flip", "shift"]),
        (["train", "--out", "x", "--augment", "flip", "--augment", "shift"], "augment", ["flip", "shift"]),
        (["lr-find", "--augment", "flip", "--augment", "crop,shift"], "augment", ["flip", "crop", "shift"]),
        (["evaluate", "c", "--policy", "none,hflip", "--policy", "d4"], "policy", ["none", "hflip", "d4"]),
        (["evaluate", "c"], "policy", ["none", "hflip", "d4", "train-aug"]),
        (["audit", "c", "--method", "rule", "--method", "cleanlab"], "method", ["rule", "cleanlab"]),
        (["audit", "c", "--method", "cleanlab"], "method", ["cleanlab"]),
        (["ensemble", "a", "b", "--weights", "1,2"], "weights", [1.0, 2.0]),
        (["ensemble", "a", "b", "--weights", "1", "--weights", "2"], "weights", [1.0, 2.0]),
        (["train", "--out", "x", "--image-size", "32"], "image_size", (32, 32)),
        (["train", "--out", "x", "--image-size", "32x48"], "image_size", (32, 48)),
        (["lr-find", "--image-size", "16x16"], "image_size", (16, 16)),
        (["train", "--out", "x", "--epochs", "2", "--progressive", "14,28"], "progressive", [14, 28]),
        (["train", "--out", "x", "--epochs", "2", "--progressive", "14x14,28x28"], "progressive", [14, 28]),
    ],
)
def test_lists_repeat_or_comma_and_sizes_read_one_way(argv, dest, expected):
    assert getattr(build_parser().parse_args(argv), dest) == expected


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--out", "x", "--image-size", "big"], "expected a size such as 28 or 28x28"),
    (["train", "--out", "x", "--image-size", "0x3"], "positive"),
    (["ensemble", "a", "b", "--weights", "1,x"], "comma-separated numbers"),
])
def test_bad_lists_and_sizes_are_one_line(argv, fragment, capsys):
    _one_line_exit_2(capsys, argv, fragment)


# --------------------------------------------------------------------------- predict uses search's policy.json


def test_predict_uses_the_searched_policy_next_to_the_checkpoint(checkpoint, tmp_path, capsys):
    from ttakit.jobs._policies import resolve_policy

    _, _, source = checkpoint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in source.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    resolve_policy("vflip").save(ckpt / "policy.json")
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.uniform(0, 255, (8, 8))).astype(np.uint8), mode="L").save(images / f"{i}.png")
    out = tmp_path / "p.csv"
    assert main(["--no-progress", "predict", str(ckpt), str(images), "--out", str(out), "--workers", "0"]) == 0
    said = capsys.readouterr().out
    assert f"using the policy that ttakit search wrote next to the checkpoint: {ckpt / 'policy.json'}" in said
    assert "(2 views" in said
    assert main(["--no-progress", "predict", str(ckpt), str(images), "--out", str(tmp_path / "q.csv"),
                 "--workers", "0", "--policy", "none"]) == 0
    said = capsys.readouterr().out
    assert "using the policy" not in said and "policy none (1 view" in said


# --------------------------------------------------------------------------- --image-size


def _photo_folder(root: Path, size=(30, 40), n=24) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % 2
        folder = root / ("left" if label == 0 else "right")
        folder.mkdir(parents=True, exist_ok=True)
        x = rng.uniform(0, 50, size).astype(np.uint8)
        half = size[1] // 2
        x[:, :half] += 150 if label == 0 else 0
        x[:, half:] += 150 if label == 1 else 0
        Image.fromarray(x, mode="L").save(folder / f"{i:03d}.png")
    return root


def test_train_says_which_image_size_it_uses_and_image_size_chooses_it(tmp_path, capsys):
    photos = _photo_folder(tmp_path / "photos")
    base = ["--no-progress", "train", "--data", str(photos), "--epochs", "1", "--batch-size", "8",
            "--test-fraction", "0.25"]
    assert main([*base, "--out", str(tmp_path / "own")]) == 0
    said = capsys.readouterr().out
    assert "image size 30x40: the most common size among the folder's images (--image-size to choose another)" in said
    assert main([*base, "--image-size", "16", "--out", str(tmp_path / "small")]) == 0
    said = capsys.readouterr().out
    assert "image size 16x16: --image-size (the data's images, 30x40, resized)" in said
    meta = json.loads((tmp_path / "small" / "checkpoint.json").read_text())
    assert meta["image_size"] == [16, 16] and meta["extra"]["data"]["image_size"] == [16, 16]
    # evaluate scores the held-out images at the size the model was trained at
    assert main(["--no-progress", "evaluate", str(tmp_path / "small"), "--policy", "none", "--no-plots",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["n_images"] == 6


# --------------------------------------------------------------------------- reports speak one language


def test_plural_and_search_tables_in_percent():
    from ttakit.report.search_report import search_display_rows
    from ttakit.report.tables import plural

    assert (plural(1, "image"), plural(2, "image"), plural(0, "pass", "passes")) == ("1 image", "2 images", "0 passes")
    rows = search_display_rows([{"policy": "none", "views": 1.0, "accuracy": 0.45, "nll": 1.2},
                                {"view": "hflip", "pair_accuracy_lift": 0.015, "pair_nll_lift": 0.01}])
    assert rows[0] == {"policy": "none", "passes/img": 1.0, "accuracy %": "45.00", "nll": 1.2}
    assert rows[1] == {"view": "hflip", "pair_lift (points)": "+1.50", "pair_NLL change": 0.01}
