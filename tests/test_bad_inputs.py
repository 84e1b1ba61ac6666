"""Every bad input of issue 8 section 3, with the exact one-line message it gets.

Two tables: the command line (exit code 2, one line on stderr, no traceback) and the library
(the ttakit error class and its message). Each row names its input, its error and its message
in full, so a changed message is a reviewed change. ``{tmp}``, ``{ckpt}``, ``{data}`` ... in a
row are filled in with the test's own paths.

A bug in ttakit itself (any other exception) prints one line too, with exit code 1 and a pointer
to ``--debug``, which shows the traceback.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ttakit
from ttakit import transforms as T
from ttakit.cli import EXIT_BAD_INPUT, EXIT_BUG, main
from ttakit.errors import (
    CheckpointError,
    InvalidInputError,
    PolicyFormatError,
    TTAKitError,
    UnknownNameError,
)
from ttakit.policy import Policy, Step, View

from ._fixtures import write_halves_npz

# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """A trained checkpoint on a tiny .npz, plus the bad files the CLI rows point at."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_halves_npz(root / "halves.npz", n=64)
    ckpt = root / "ckpt"
    code = main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--batch-size", "32", "--out", str(ckpt)])
    assert code == 0
    (root / "a-file").write_text("not a folder")
    (root / "a-folder").mkdir()
    policy = Policy.identity().to_json()
    (root / "meta5.json").write_text(json.dumps({**policy, "meta": 5}))
    (root / "weights-str.json").write_text(json.dumps({**policy, "weights": "1"}))
    (root / "views-str.json").write_text(json.dumps({**policy, "views": "hflip"}))
    ttakit.aliases.multiscale_transform([0.5, 2]).to_policy("multiscale").save(root / "multiscale.json")
    # a temperature fitted on another checkpoint (as ttakit search records it)
    Policy([View.identity()], name="searched", temperature=1.5,
           meta={"weights_sha256": "0" * 64, "checkpoint": "runs/other"}).save(root / "other-model.json")
    for name, text in {
        "malformed": json.dumps({"format": "ttakit-checkpoint", "format_version": 1, "arch": 5}),
        "truncated": '{"format": "ttakit-checkpoint", "format_ver',
    }.items():
        (root / name).mkdir()
        (root / name / "checkpoint.json").write_text(text)
        (root / name / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    try:
        os.mkdir("/proc/ttakit-test")
        proc_error = "created"  # not expected on Linux; the row below then fails and says so
    except OSError as err:
        proc_error = err.strerror
    digest = json.loads((ckpt / "checkpoint.json").read_text())["weights_sha256"][:12]
    return {"tmp": str(root), "ckpt": str(ckpt), "data": str(data), "proc_error": proc_error, "ckpt_sha": digest}


# (id, argv, exact stderr line). Issue 8 section 3 names each of these.
CLI_CASES: list[tuple[str, list[str], str]] = [
    (
        "train --out inside a file",
        ["train", "--data", "{data}", "--out", "{tmp}/a-file/ckpt"],
        "ttakit train: error: --out '{tmp}/a-file/ckpt': '{tmp}/a-file' is a file, not a folder; choose another path",
    ),
    (
        "train --out where nothing can be created",
        ["train", "--data", "{data}", "--out", "/proc/ttakit-test/ckpt"],
        "ttakit train: error: --out '/proc/ttakit-test/ckpt': cannot create it inside '/proc' ({proc_error}); "
        "choose a writable location",
    ),
    (
        "evaluate --out a file",
        ["evaluate", "{ckpt}", "--out", "{tmp}/a-file"],
        "ttakit evaluate: error: --out '{tmp}/a-file' is a file; expected a folder: give a new or existing folder",
    ),
    (
        "search --out a file that is not a policy .json",  # --out is a folder, or the policy file FILE.json
        ["search", "{ckpt}", "--out", "{tmp}/a-file"],
        "ttakit search: error: --out '{tmp}/a-file' is a file; expected a folder: give a new or existing folder",
    ),
    (
        "search --report-dir a file",
        ["search", "{ckpt}", "--report-dir", "{tmp}/a-file"],
        "ttakit search: error: --report-dir '{tmp}/a-file' is a file; expected a folder: give a new or existing folder",
    ),
    (
        'policy JSON with "meta": 5',
        ["evaluate", "{ckpt}", "--policy", "{tmp}/meta5.json", "--no-plots"],
        "ttakit evaluate: error: policy file '{tmp}/meta5.json': field \"meta\" must be an object or null, got 5",
    ),
    (
        'policy JSON with "weights": "1"',
        ["evaluate", "{ckpt}", "--policy", "{tmp}/weights-str.json", "--no-plots"],
        "ttakit evaluate: error: policy file '{tmp}/weights-str.json': field \"weights\" must be a list of numbers "
        "or null, got '1'",
    ),
    (
        'policy JSON with "views": "hflip"',
        ["evaluate", "{ckpt}", "--policy", "{tmp}/views-str.json", "--no-plots"],
        "ttakit evaluate: error: policy file '{tmp}/views-str.json' holds no views (expected \"views\": a non-empty list)",
    ),
    (
        "malformed checkpoint metadata",
        ["evaluate", "{tmp}/malformed", "--no-plots"],
        "ttakit evaluate: error: {tmp}/malformed: checkpoint.json field 'arch' must be an architecture name, got 5",
    ),
    (
        "truncated checkpoint metadata",
        ["evaluate", "{tmp}/truncated", "--no-plots"],
        "ttakit evaluate: error: {tmp}/truncated is not a usable ttakit checkpoint: checkpoint.json is not readable "
        "JSON (Unterminated string starting at: line 1 column 33 (char 32)); it may be truncated: retrain or restore it",
    ),
    (
        "size-changing policy on a fixed-size model",
        ["evaluate", "{ckpt}", "--policy", "{tmp}/multiscale.json", "--no-plots"],
        "ttakit evaluate: error: policy 'multiscale': view 'scale0.5' turns the 8x8 images into 4x4, but model "
        "seed-cnn ({ckpt}) takes only 8x8 images; drop that view, or use an architecture that pools globally "
        "(resnet20)",
    ),
    (
        "evaluate --split bogus",
        ["evaluate", "{ckpt}", "--split", "bogus"],
        "ttakit evaluate: error: argument --split: evaluate takes --split test or val or train, got 'bogus'; "
        "see ttakit evaluate --help",
    ),
    (
        "search --split bogus",
        ["search", "{ckpt}", "--split", "bogus"],
        "ttakit search: error: argument --split: search takes --split val, got 'bogus'; see ttakit search --help",
    ),
    (
        "search --split test",
        ["search", "{ckpt}", "--split", "test"],
        "ttakit search: error: search selects a policy, so it must not see the test split (--split test); search "
        "on 'val' (the held-out validation split) and score the saved policy on test with ttakit evaluate",
    ),
    (
        "train --val-fraction 0",
        ["train", "--data", "{data}", "--val-fraction", "0", "--out", "{tmp}/o"],
        "ttakit train: error: argument --val-fraction: expected a fraction strictly between 0 and 1 such as 0.1, "
        "got 0; see ttakit train --help",
    ),
    (
        "train --val-fraction 1.5",
        ["train", "--data", "{data}", "--val-fraction", "1.5", "--out", "{tmp}/o"],
        "ttakit train: error: argument --val-fraction: expected a fraction strictly between 0 and 1 such as 0.1, "
        "got 1.5; see ttakit train --help",
    ),
    (
        "train --val-fraction ten",
        ["train", "--data", "{data}", "--val-fraction", "ten", "--out", "{tmp}/o"],
        "ttakit train: error: argument --val-fraction: expected a fraction between 0 and 1 such as 0.1, got 'ten'; "
        "see ttakit train --help",
    ),
    (
        "train --test-fraction 1",
        ["train", "--data", "{data}", "--test-fraction", "1", "--out", "{tmp}/o"],
        "ttakit train: error: argument --test-fraction: expected a fraction strictly between 0 and 1 such as 0.1, "
        "got 1; see ttakit train --help",
    ),
    (
        "train --test-fraction -0.2",
        ["train", "--data", "{data}", "--test-fraction=-0.2", "--out", "{tmp}/o"],
        "ttakit train: error: argument --test-fraction: expected a fraction strictly between 0 and 1 such as 0.1, "
        "got -0.2; see ttakit train --help",
    ),
    (
        "search --budget 0",
        ["search", "{ckpt}", "--budget", "0"],
        "ttakit search: error: argument --budget: expected a positive integer, got 0; see ttakit search --help",
    ),
]

# Issue "sound answers": nothing is scored, calibrated or cleaned by something fitted on it.
SOUND_ANSWER_CASES: list[tuple[str, list[str], str]] = [
    (
        "ensemble --split val",
        ["ensemble", "{ckpt}", "{ckpt}", "--split", "val", "--out", "{tmp}/o"],
        "ttakit ensemble: error: ensemble --split val: the validation split is where each member's temperature is "
        "fitted and its searched policy (policy.json) was chosen, so it would be scored on what it was fitted on; "
        "use --split test (the default)",
    ),
    (
        "ensemble --split train",
        ["ensemble", "{ckpt}", "{ckpt}", "--split", "train", "--out", "{tmp}/o"],
        "ttakit ensemble: error: ensemble --split train: the members trained on those images, so their score there "
        "says nothing about held-out accuracy; use --split test (the default)",
    ),
    (
        "search --split train",
        ["search", "{ckpt}", "--split", "train", "--out", "{tmp}/o.json"],
        "ttakit search: error: search --split train: the model trained on those images, so they would choose a "
        "policy and fit a temperature for images it has memorised; search on 'val' (the held-out validation split)",
    ),
    (
        "evaluate --split val --conformal",
        ["evaluate", "{ckpt}", "--split", "val", "--conformal", "0.1", "--out", "{tmp}/o"],
        "ttakit evaluate: error: --conformal 0.1 calibrates on the validation split, so it cannot score sets on it "
        "too (--split val); score them on the held-out test split (--split test, the default)",
    ),
    (
        "evaluate with a policy fitted on another checkpoint",
        ["evaluate", "{ckpt}", "--policy", "{tmp}/other-model.json", "--out", "{tmp}/o"],
        "ttakit evaluate: error: " "policy 'searched' holds temperature fitted on runs/other (weights sha256 000000000000...), but the model is "
        "{ckpt} (weights sha256 {ckpt_sha}...); search a policy for this model (ttakit search), use a views-only "
        "policy, or pass --allow-other-model (allow_other_model=True) to use it anyway",
    ),
    (
        "predict with a policy fitted on another checkpoint",
        ["predict", "{ckpt}", "{tmp}/a-folder", "--policy", "{tmp}/other-model.json", "--out", "{tmp}/p.csv"],
        "ttakit predict: error: " "policy 'searched' holds temperature fitted on runs/other (weights sha256 000000000000...), but the model is "
        "{ckpt} (weights sha256 {ckpt_sha}...); search a policy for this model (ttakit search), use a views-only "
        "policy, or pass --allow-other-model (allow_other_model=True) to use it anyway",
    ),
    (
        "ensemble with a policy fitted on another checkpoint",
        ["ensemble", "{ckpt}", "{ckpt}:{tmp}/other-model.json", "--out", "{tmp}/o"],
        "ttakit ensemble: error: " "policy 'searched' holds temperature fitted on runs/other (weights sha256 000000000000...), but the model is "
        "{ckpt} (weights sha256 {ckpt_sha}...); search a policy for this model (ttakit search), use a views-only "
        "policy, or pass --allow-other-model (allow_other_model=True) to use it anyway",
    ),
    (
        "audit with a policy fitted on another checkpoint",
        ["audit", "{ckpt}", "--split", "test", "--policy", "{tmp}/other-model.json", "--out", "{tmp}/o"],
        "ttakit audit: error: " "policy 'searched' holds temperature fitted on runs/other (weights sha256 000000000000...), but the model is "
        "{ckpt} (weights sha256 {ckpt_sha}...); search a policy for this model (ttakit search), use a views-only "
        "policy, or pass --allow-other-model (allow_other_model=True) to use it anyway",
    ),
    (
        "predict --retry-errors without --resume",
        ["predict", "{ckpt}", "{tmp}/a-folder", "--retry-errors", "--out", "{tmp}/p.csv"],
        "ttakit predict: error: retry_errors (--retry-errors) retries the files in the errors file of a run being "
        "resumed; add --resume",
    ),
    (
        "export --opset with a non-ONNX format",
        ["export", "{ckpt}", "--format", "torchscript", "--opset", "17", "--out", "{tmp}/m.pt"],
        "ttakit export: error: --opset applies to --format onnx only, got --opset 17 with --format torchscript",
    ),
]
CLI_CASES += SOUND_ANSWER_CASES


def _fill(text: str, paths: dict[str, str]) -> str:
    return text.format(**paths)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr); argparse's usage errors exit via SystemExit."""
    try:
        code = main(["--no-progress", *argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_naming_argument_value_and_fix(paths, capsys, argv, expected):
    if any(a.startswith("/proc/") for a in argv) and not os.path.isdir("/proc"):
        pytest.skip("no /proc here (not Linux): no folder that even root cannot write to")
    code, _, err = run_cli([_fill(a, paths) for a in argv], capsys)
    assert err.splitlines() == [_fill(expected, paths)], err
    assert code == EXIT_BAD_INPUT


def test_cli_checks_outputs_before_any_work(paths, capsys):
    # The unwritable --out is refused at once: no training ran, nothing was written.
    before = sorted(os.listdir(paths["tmp"]))
    code, out, _ = run_cli(["train", "--data", paths["data"], "--out", f"{paths['tmp']}/a-file/x"], capsys)
    assert code == EXIT_BAD_INPUT and out == "" and sorted(os.listdir(paths["tmp"])) == before


def test_an_environment_error_is_one_line_too(paths, capsys, monkeypatch):
    import ttakit.jobs.evaluate as experiment

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", f"{paths['tmp']}/x.json")

    monkeypatch.setattr(experiment, "evaluate_checkpoint", disk_full)
    code, _, err = run_cli(["evaluate", paths["ckpt"]], capsys)
    assert code == EXIT_BAD_INPUT
    assert err.splitlines() == [
        f"ttakit evaluate: error: cannot use '{paths['tmp']}/x.json': No space left on device; "
        "check the path and its permissions"
    ]


def test_a_bug_in_ttakit_is_one_line_pointing_at_debug(paths, capsys, monkeypatch):
    import ttakit.jobs.evaluate as experiment

    def bug(*args, **kwargs):
        return {}["table"]  # a KeyError from deep inside: a bug, not bad input

    monkeypatch.setattr(experiment, "evaluate_checkpoint", bug)
    code, _, err = run_cli(["evaluate", paths["ckpt"]], capsys)
    assert code == EXIT_BUG
    assert err.splitlines() == [
        "ttakit evaluate: internal error: KeyError: 'table' (a bug in ttakit; run with --debug for the traceback)"
    ]
    for argv in (["--debug", "evaluate", paths["ckpt"]], ["evaluate", paths["ckpt"], "--debug"]):
        code, _, err = run_cli(argv, capsys)
        lines = err.splitlines()
        assert code == EXIT_BUG and lines[0] == "Traceback (most recent call last):"
        assert 'return {}["table"]' in err and lines[-2] == "KeyError: 'table'"
        assert lines[-1].startswith("ttakit evaluate: internal error: KeyError: 'table'")


def test_debug_shows_the_traceback_of_a_bad_input_too(paths, capsys):
    code, _, err = run_cli(["--debug", "evaluate", paths["ckpt"], "--policy", f"{paths['tmp']}/meta5.json"], capsys)
    assert code == EXIT_BAD_INPUT and err.startswith("Traceback")
    assert err.splitlines()[-1].endswith('field "meta" must be an object or null, got 5')


# --------------------------------------------------------------------------- library


def _model(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, 3)`` scores: a plain function as a model."""
    return x.mean(dim=(2, 3)).repeat(1, 3)[:, :3]


def _engine(**kwargs):
    return ttakit.TTAEngine(_model, ttakit.get_policy("hflip"), **kwargs)


def _class_dim_5():
    _engine(class_dim=5).run(torch.rand(2, 1, 4, 4))


def _policy_json(**fields):
    return {**Policy.identity().to_json(), **fields}


def _from_augmentations(records):
    from ttakit.aliases import policy_from_augmentations

    return policy_from_augmentations(records)


HFLIP = T.HorizontalFlip()

# (id, owner, call, error class, exact message). Owner: who implements the check (see owners.md).
LIBRARY_CASES: list[tuple[str, str, Callable[[], object], type[Exception], str]] = [
    (
        "TTAEngine(class_dim=5) on 2-D outputs", "A", _class_dim_5, InvalidInputError,
        "class_dim=5 does not fit the model's output of shape (2, 3) (one view, batch first): expected a "
        "dimension in 1..1 (or -1..-1); pass class_dim=1 for (B, C) scores",
    ),
    (
        'TTAEngine(device="gpu")', "A", lambda: _engine(device="gpu"), InvalidInputError,
        "device must be one of 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...), 'mps' or a torch.device, got 'gpu'",
    ),
    (
        "TTAEngine weights of the wrong type", "A", lambda: _engine(weights="ab"), InvalidInputError,
        "weights must be a list of 2 numbers (one per view), got str 'ab'",
    ),
    (
        "TTAEngine weights of the wrong length", "A", lambda: _engine(weights=[1, 2, 3]), InvalidInputError,
        "weights must hold one value per view (2), got 3: [1, 2, 3]",
    ),
    (
        "TTAEngine max with weights", "A", lambda: _engine(merge_mode="max", weights=[1, 2]), InvalidInputError,
        "weights do not apply to merge mode 'max' (got weights=[1, 2]); use mean, gmean, sum, tsharpen or vote, "
        "or pass weights=None",
    ),
    (
        "wrapper max with weights", "A",
        lambda: ttakit.ClassificationTTAWrapper(_model, ttakit.aliases.hflip_transform(), "max", weights=[1, 2]),
        InvalidInputError,
        "weights do not apply to merge mode 'max' (got weights=[1, 2]); use mean, gmean, sum, tsharpen or vote, "
        "or pass weights=None",
    ),
    (
        'Merger("mean", "x")', "A", lambda: ttakit.Merger("mean", "x"), InvalidInputError,
        "Merger's `n` must be a positive integer, the number of outputs to merge, got 'x'",
    ),
    (
        "View([1, 2])", "D", lambda: View([1, 2]), InvalidInputError,
        "View steps must be Step objects or (transform, parameter) pairs, got 1 (int)",
    ),
    (
        'View("ab")', "D", lambda: View("ab"), InvalidInputError,
        "View steps must be a list of Step or (transform, parameter) pairs, got 'ab'",
    ),
    (
        "View([(5, True)])", "D", lambda: View([(5, True)]), InvalidInputError,
        "Step transform must be a transform object (with params, pname and apply_aug_image), got 5 (int)",
    ),
    (
        'Policy("ab")', "D", lambda: Policy("ab"), InvalidInputError,
        "views must be a list of View objects (or lists of steps), got 'ab' (str)",
    ),
    (
        "Policy([1, 2])", "D", lambda: Policy([1, 2]), InvalidInputError,
        "views must hold View objects (or lists of steps), got 1 (int)",
    ),
    (
        'Policy(weights="12")', "D", lambda: Policy([View.identity(), View([(HFLIP, True)])], weights="12"),
        InvalidInputError, "weights must be a list of numbers, got '12'",
    ),
    (
        "Policy(meta=5)", "D", lambda: Policy([View.identity()], meta=5), InvalidInputError,
        "meta must be a dict (JSON object), got 5",
    ),
    (
        "Policy.load(123)", "D", lambda: Policy.load(123), InvalidInputError,
        "path must be a str or os.PathLike to a policy .json file, got 123",
    ),
    (
        'Policy.from_json("meta": 5)', "D", lambda: Policy.from_json(_policy_json(meta=5)), PolicyFormatError,
        'policy: field "meta" must be an object or null, got 5',
    ),
    (
        'Policy.from_json(step "args": [1])', "D",
        lambda: Policy.from_json(_policy_json(views=[{"steps": [{"transform": "HorizontalFlip", "args": [1]}]}])),
        PolicyFormatError,
        "policy: policy step {'transform': 'HorizontalFlip', 'args': [1]}: \"args\" must be an object, got [1]",
    ),
    (
        "Shift.around(0)", "D", lambda: T.Shift.around(0), InvalidInputError,
        "distances must be a non-empty list of positive whole pixel distances such as (1,) or (1, 2), got 0",
    ),
    (
        "Shift.around([0])", "D", lambda: T.Shift.around([0]), InvalidInputError,
        "distances must be a non-empty list of positive whole pixel distances such as (1,) or (1, 2), got [0]",
    ),
    (
        'Transformer.augment_image("x")', "D",
        lambda: next(iter(ttakit.aliases.hflip_transform())).augment_image("x"), InvalidInputError,
        "image must be a torch.Tensor of shape (B, C, H, W), got str",
    ),
    (
        'get_policy(["hflip"])', "D", lambda: ttakit.get_policy(["hflip"]), InvalidInputError,
        "get_policy takes one policy name (a string such as 'hflip'), got ['hflip'] (list); "
        "for several names, call it once per name",
    ),
    (
        "policy_from_augmentations(['rotate'])", "B", lambda: _from_augmentations(["rotate"]), UnknownNameError,
        "unknown augmentation 'rotate'; expected one of: crop, flip, mixup, shift",
    ),
    (
        "policy_from_augmentations([{'nope': 1}])", "B", lambda: _from_augmentations([{"nope": 1}]),
        InvalidInputError,
        "Expected each training augmentation to be a dict with a 'name' or a name, but got {'nope': 1}",
    ),
    (
        "policy_from_augmentations([{'name': 'flip', 'bogus': 1}])", "B",
        lambda: _from_augmentations([{"name": "flip", "bogus": 1}]), InvalidInputError,
        "training augmentation {'name': 'flip', 'bogus': 1}: unknown setting 'bogus'; flip takes: p",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "expected"), [c[2:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES]
)
def test_library_bad_input_raises_ttakits_error_with_its_message(call, error, expected):
    with pytest.raises(TTAKitError) as info:
        call()
    assert type(info.value) is error, type(info.value)
    message = str(info.value)
    assert message == expected
    assert "\n" not in message


def test_every_issue_8_item_has_a_row():
    # Issue 8 section 3 lists these inputs; each must keep a row above.
    cli = {c[0] for c in CLI_CASES}
    library = {c[0] for c in LIBRARY_CASES}
    for item in [
        # "search --out a folder" is no longer bad input: --out is a folder for search too ("The first hour
        # of a user"); a file that is not a policy .json is
        "train --out where nothing can be created", "evaluate --out a file",
        "search --out a file that is not a policy .json",
        'policy JSON with "meta": 5', "malformed checkpoint metadata", "truncated checkpoint metadata",
        "size-changing policy on a fixed-size model", "evaluate --split bogus", "train --val-fraction 1.5",
        "train --test-fraction 1", "search --budget 0",
    ]:
        assert item in cli, item
    for item in [
        "TTAEngine(class_dim=5) on 2-D outputs", 'TTAEngine(device="gpu")', "TTAEngine weights of the wrong type",
        "TTAEngine weights of the wrong length", "TTAEngine max with weights", "View([1, 2])", 'Policy("ab")',
        "Policy.load(123)", "Shift.around(0)", 'get_policy(["hflip"])', 'Merger("mean", "x")',
        "policy_from_augmentations(['rotate'])", "policy_from_augmentations([{'nope': 1}])",
    ]:
        assert item in library, item
    for item in [
        "ensemble --split val", "ensemble --split train", "search --split train", "evaluate --split val --conformal",
        "evaluate with a policy fitted on another checkpoint", "predict with a policy fitted on another checkpoint",
        "ensemble with a policy fitted on another checkpoint", "audit with a policy fitted on another checkpoint",
        "predict --retry-errors without --resume", "export --opset with a non-ONNX format",
    ]:
        assert item in cli, item
    assert len(CLI_CASES) + len(LIBRARY_CASES) == 44 + len(SOUND_ANSWER_CASES) == 54


def test_error_classes_are_the_builtin_ones_users_expect():
    assert issubclass(InvalidInputError, ValueError) and issubclass(PolicyFormatError, ValueError)
    assert issubclass(CheckpointError, ValueError) and issubclass(UnknownNameError, KeyError)
    with pytest.raises(ValueError):
        Policy("ab")


def test_a_ttach_transform_still_makes_a_step():
    import ttach

    view = View([(ttach.HorizontalFlip(), True)])
    assert view.name == "HorizontalFlip(apply=True)" and isinstance(view.steps[0], Step)
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    assert torch.equal(view.transformer().augment_image(x), x.flip(-1))


def test_path_objects_still_load(tmp_path: Path):
    Policy.identity().save(tmp_path / "p.json")
    assert Policy.load(tmp_path / "p.json").view_names == ["identity"]
    assert Policy.load(str(tmp_path / "p.json")).view_names == ["identity"]
