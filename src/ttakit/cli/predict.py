"""``ttakit predict``: parse, call :func:`ttakit.jobs.predict.predict_images`, print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InvalidInputError
from ._common import (
    EXIT_INTERRUPTED,
    _add_device_args,
    _add_list_arg,
    _add_model_args,
    _add_vote_args,
    _alpha,
    _model_options,
    _positive_int,
)

NAME = "predict"


def add_parser(commands) -> None:
    predict = commands.add_parser(
        "predict", help="TTA predictions for your own images, from any model (or an ensemble of several)",
        usage="ttakit predict [options] MODEL[:POLICY] [MODEL[:POLICY] ...] IMAGES --out FILE",
    )
    predict.add_argument(
        "inputs", nargs="+", metavar="MODEL[:POLICY] [...] IMAGES",
        help="one or more models (checkpoint folder, .pt2, TorchScript, .onnx, .keras/.h5, or module:function), each "
        "optionally with its policy after a colon; several models write ENSEMBLE predictions. Last: the images, a "
        "folder (searched recursively), a quoted glob, or a text file of paths",
    )
    predict.add_argument("--policy", default=None,
                         help="policy name, train-aug, or a policy .json, for models without :POLICY (default: the "
                         "policy.json that ttakit search wrote in a checkpoint folder, else none; --policy none: "
                         "plain inference)")
    predict.add_argument("--out", required=True, help="CSV file to write (.jsonl for JSON Lines); with --task a "
                         "folder (segmentation, keypoints) or a .json file (detection)")
    predict.add_argument("--top-k", type=_positive_int, default=5, help="classes per row (default 5)")
    predict.add_argument("--workers", type=int, default=None, help="decoding processes (0: in the main process)")
    predict.add_argument("--batch-size", type=_positive_int, default=None, help="images per step (default: --max-batch)")
    predict.add_argument("--resume", action="store_true",
                         help="keep rows already in --out and predict the rest; refused when the model, policy or an "
                         "option that changes answers differs from the first run's (batch size, workers, device may "
                         "change)")
    predict.add_argument("--resize", default=None, choices=("fit", "crop", "stretch"),
                         help="how images reach the model's size: fit (keep the aspect ratio, pad with black), crop "
                         "(resize the short side, cut the centre) or stretch; default: what the checkpoint records "
                         "for its training images, else stretch (the summary says which)")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace an existing --out (refused by default: add --resume to keep its rows)")
    predict.add_argument("--retry-errors", action="store_true",
                         help="with --resume: try the files in the errors file again (they leave it when they decode)")
    predict.add_argument("--conformal", type=_alpha, default=None, metavar="ALPHA",
                         help="add each image's conformal prediction set covering 1 - ALPHA (ttakit checkpoints: "
                         "calibrated on their validation split)")
    predict.add_argument("--conformal-method", default="lac", choices=("lac", "aps"), help="lac (default) or aps")
    predict.add_argument(
        "--allow-other-model", action="store_true",
        help="use a policy whose weights, gate, temperature or matrix were fitted on another checkpoint "
        "(refused by default: a policy records the model it was searched on)",
    )
    scale = predict.add_argument_group("many processes or machines (docs: Running on many machines)")
    scale.add_argument("--engine", default="local", choices=("local", "ray"),
                       help="local: this process (under torchrun: each rank its share of the images); ray: Ray Data "
                       "workers decode and predict (one model; pip install \"ttakit[ray]\"), rows written in input "
                       "order")
    scale.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="with --engine ray: the Ray cluster to join (auto, or ray://HOST:10001); default: start "
                       "a local one")
    scale.add_argument("--ray-workers", type=_positive_int, default=None, metavar="N",
                       help="with --engine ray: Ray actors, one CPU and one torch thread each (default: the "
                       "cluster's CPUs)")
    _add_vote_args(predict.add_argument_group("several models (as in ttakit ensemble)"),
                   calibrated_on="the models on their shared validation split")
    _add_dense_args(predict.add_argument_group("dense models (--task; as ttakit search --task finds them)"))
    _add_device_args(predict, max_batch=True)
    _add_model_args(predict)


def _add_dense_args(group) -> None:
    """--task and what each dense task takes (:func:`ttakit.jobs.predict_dense.predict_dense`)."""
    group.add_argument("--task", default=None, choices=("segmentation", "keypoints", "detection"),
                       help="a dense model: segmentation (--out FOLDER: one palette PNG label map per image), "
                       "keypoints (--out FOLDER: one JSON of named points per image) or detection (--out FILE.json: "
                       "COCO results, a file-name map and a CSV beside it); default: classification, or the task "
                       "a checkpoint records")
    group.add_argument("--probs", action="store_true",
                       help="segmentation: also write the merged probabilities (FOLDER/probs/NAME.npz, float16)")
    group.add_argument("--merge", default=None, choices=("wbf", "nms", "soft_nms", "nmw"),
                       help="detection: how the views' boxes are fused (default: the searched policy's, else wbf)")
    group.add_argument("--iou-thr", type=float, default=None,
                       help="detection: overlap from which two boxes are one object (default: the policy's, else 0.55)")
    group.add_argument("--match", default=None, choices=("iou", "ios"),
                       help="detection: overlap by IoU or by intersection over the smaller box (default: the "
                       "policy's, else iou)")
    group.add_argument("--conf-type", default=None,
                       choices=("avg", "max", "box_and_model_avg", "absent_model_aware_avg"),
                       help="detection: how WBF scores a fused box (default: the policy's, else avg)")
    group.add_argument("--skip-box-thr", type=float, default=None,
                       help="detection: boxes scoring below it are dropped before fusion (default: the policy's, else 0)")
    group.add_argument("--max-detections", type=_positive_int, default=100,
                       help="detection: boxes kept per view and image before fusion")
    group.add_argument("--flip-pairs", default=None, type=_flip_pairs, metavar="L:R,...",
                       help="keypoints: index pairs swapped after a mirroring view, like 1:2,3:4")
    _add_list_arg(group, "--keypoint-names", default=None, metavar="NAME,...",
                  help="keypoints: one name per point (default kp0, kp1, ...)")
    group.add_argument("--scaled", action="store_true", help="keypoints: the model returns coordinates in [0, 1]")


def _flip_pairs(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(i) for i in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected index pairs such as 1:2,3:4, got {text!r}") from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected index pairs such as 1:2,3:4, got {text!r}")
    return pairs  # type: ignore[return-value]


def _recorded_task(model: str) -> str | None:
    """The dense task a checkpoint folder records (None: a classifier, or not a checkpoint folder)."""
    folder = Path(model)
    if not (folder / "checkpoint.json").is_file():
        return None
    from ..models import read_checkpoint_meta

    task = getattr(read_checkpoint_meta(folder), "task", "classification")
    return task if task in ("segmentation", "keypoints", "detection") else None


# Classification options a dense run has no use for: refused, not ignored.
_CLASSIFICATION_ONLY = (("top_k", 5, "--top-k"), ("conformal", None, "--conformal"), ("vote", "soft", "--vote"),
                        ("weights", None, "--weights"), ("tie_break", "mean", "--tie-break"),
                        ("no_calibrate", False, "--no-calibrate"), ("engine", "local", "--engine"),
                        ("ray_address", None, "--ray-address"))


def _run_dense(args: argparse.Namespace, task: str) -> int:
    from ..jobs.predict_dense import predict_dense

    if len(args.inputs) != 2:
        raise InvalidInputError(
            f"predict --task {task} takes one MODEL[:POLICY] and the IMAGES, got {len(args.inputs)} inputs"
        )
    for name, default, flag in _CLASSIFICATION_ONLY:
        if getattr(args, name) != default:
            raise InvalidInputError(f"{flag} does not apply to --task {task}; drop {flag}")
    from ..jobs.ensemble import parse_member

    member = parse_member(args.inputs[0])
    try:
        summary = predict_dense(
            member.model, args.inputs[-1], task=task, out=args.out,
            policy=member.policy or args.policy or _searched_policy(member.model), probs=args.probs,
            resume=args.resume, overwrite=args.overwrite, retry_errors=args.retry_errors, device=args.device,
            amp=args.amp, max_batch=args.max_batch, batch_size=args.batch_size, workers=args.workers,
            model_options=_model_options(args), merge=args.merge, iou_thr=args.iou_thr,
            skip_box_thr=args.skip_box_thr, conf_type=args.conf_type, match=args.match,
            max_detections=args.max_detections, flip_pairs=args.flip_pairs, keypoint_names=args.keypoint_names,
            scaled=args.scaled, resize=args.resize, allow_other_model=args.allow_other_model,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"ttakit predict: interrupted; what is written so far is kept in {args.out}; continue with: "
              f"{_resume_command()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    skipped = f" ({summary['n_done_before']} already done)" if summary["n_done_before"] else ""
    print(f"predicted {summary['n_predicted']} of {summary['n_images']} images{skipped} ({task}, policy "
          f"{summary['policy']}: {len(summary['views'])} views) in {summary['seconds']:.1f} s "
          f"({summary['images_per_second']:.0f} img/s predicting) -> {summary['out']}")
    if task == "detection":
        print(f"{summary['n_detections']} boxes on {summary['n_images'] - summary['n_errors']} images; "
              f"file names in {summary['images_file']}, a CSV in {summary['csv']}")
    if summary["n_errors"]:
        from ..report.tables import plural

        print(f"{plural(summary['n_errors'], 'file')} could not be read: see {summary['errors']}")
    return 0


def _searched_policy(model: str) -> str:
    """A checkpoint folder's own ``policy.json`` (written by ``ttakit search``), said in the log,
    as ``ttakit ensemble`` does; else ``none``. ``--policy none`` turns it off."""
    found = Path(model) / "policy.json"
    if Path(model).is_dir() and found.is_file():
        print(f"using the policy that ttakit search wrote next to the checkpoint: {found} (--policy none: plain "
              "inference)")
        return str(found)
    return "none"


def _resume_command() -> str:
    """This process's ``ttakit predict`` command with ``--resume`` (and without ``--overwrite``)."""
    import shlex

    from ..report import html as html_report

    argv = [a for a in (html_report._COMMAND or sys.argv[1:]) if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return "ttakit " + " ".join(shlex.quote(a) for a in argv)


def run(args: argparse.Namespace) -> int:
    from ..jobs.ensemble import parse_member
    from ..jobs.predict import predict_images

    if len(args.inputs) < 2:
        raise InvalidInputError(
            f"predict needs MODEL [MODEL ...] IMAGES: at least one model and the images, got only {args.inputs[0]!r}"
        )
    task = args.task or _recorded_task(parse_member(args.inputs[0]).model)
    if task is not None:
        return _run_dense(args, task)
    members = [parse_member(spec) for spec in args.inputs[:-1]]
    if args.weights is not None and len(args.weights) != len(members):
        raise InvalidInputError(
            f"--weights needs one number per model ({len(members)}), got {len(args.weights)}: "
            f"{','.join(f'{w:g}' for w in args.weights)}"
        )
    models = [m.model for m in members]
    policies = [m.policy or args.policy or _searched_policy(m.model) for m in members]
    try:
        summary = predict_images(
            models[0] if len(models) == 1 else models,
            args.inputs[-1],
            out=args.out,
            policy=policies if len(models) > 1 else policies[0],
            top_k=args.top_k,
            workers=args.workers,
            batch_size=args.batch_size,
            resume=args.resume,
            retry_errors=args.retry_errors,
            overwrite=args.overwrite,
            resize=args.resize,
            device=args.device,
            amp=args.amp,
            max_batch=args.max_batch,
            progress=not args.no_progress,
            model_options=_model_options(args),
            conformal=args.conformal,
            conformal_method=args.conformal_method,
            vote=args.vote,
            weights=args.weights,
            tie_break=args.tie_break,
            seed=args.tie_break_seed,
            calibrate=not args.no_calibrate,
            allow_other_model=args.allow_other_model,
            engine=args.engine,
            ray_address=args.ray_address,
            ray_workers=args.ray_workers,
        )
    except KeyboardInterrupt:
        print(f"ttakit predict: interrupted; the rows finished so far are kept in {args.out}; continue with: "
              f"{_resume_command()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    skipped = f" ({summary['n_done_before']} already in {summary['out']})" if summary["n_done_before"] else ""
    if summary.get("n_retried"):
        skipped += f" ({summary['n_retried']} from the errors file retried)"
    how = f"policy {summary['policy']} ({len(summary['views'])} views"
    if summary.get("ensemble"):
        ens = summary["ensemble"]
        how = (f"an ensemble of {len(ens['members'])} models, {ens['vote']} vote ("
               + ", ".join(f"{m['model']}:{m['policy']}" for m in ens["members"]) + f"; {ens['calibration']}")
    print(
        f"predicted {summary['n_predicted']} of {summary['n_images']} images{skipped} with {how}, "
        f"{summary['passes_per_image']:.2f} passes/img) "
        f"in {summary['seconds']:.1f} s ({summary.get('seconds_preparing', 0.0):.1f} s loading and calibrating, "
        f"{summary['images_per_second']:.0f} img/s predicting) -> {summary['out']}"
    )
    if summary.get("resize"):
        print(f"images of another size than the model takes are resized with --resize {summary['resize']} "
              f"({summary['resize_source']})")
    if summary["n_errors"]:
        from ..report.tables import plural

        print(f"{plural(summary['n_errors'], 'file')} could not be read: see {summary['errors']}")
    return 0
