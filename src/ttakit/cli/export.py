"""``ttakit export``: parse, call :func:`ttakit.jobs.export.export_checked`, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import _add_device_args, _positive_int, _run_options

NAME = "export"


def add_parser(commands) -> None:
    export = commands.add_parser("export", help="write a checkpoint as ONNX, torch.export (.pt2) or TorchScript")
    export.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    export.add_argument("--format", default=None, choices=("onnx", "pt2", "torchscript"),
                        help="default: from the suffix of --out (.onnx, .pt2, .pt/.ts); a suffix that "
                        "contradicts --format is refused")
    export.add_argument("--out", required=True, help="file to write: NAME.onnx, NAME.pt2 or NAME.pt (TorchScript)")
    from ..jobs.export import DEFAULT_OPSET, DEFAULT_TOLERANCE

    export.add_argument("--opset", type=_positive_int, default=None,
                        help=f"ONNX opset, for --format onnx only (default {DEFAULT_OPSET})")
    export.add_argument("--tolerance", type=_tolerance, default=DEFAULT_TOLERANCE,
                        help="largest absolute logit difference the export may show against the checkpoint on random "
                        f"inputs; above it nothing is written (default {DEFAULT_TOLERANCE:g})")
    _add_device_args(export)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--tolerance must be a finite number >= 0 (like 1e-4), got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from ..jobs.export import export_checked

    result = export_checked(args.checkpoint, args.format, args.out, opset=args.opset, tolerance=args.tolerance,
                            **_run_options(export_checked, args))
    path = Path(result["out"])
    opset = f", opset {result['opset']}" if result["opset"] is not None else ""
    print(f"exported {args.checkpoint} as {result['format']}{opset} to {path} ({result['bytes'] / 1e6:.2f} MB; "
          f"metadata {result['metadata']})")
    print(f"checked against the checkpoint on {result['n_inputs']} random {'x'.join(map(str, result['input_shape']))} "
          f"inputs: largest absolute difference {result['max_abs_diff']:.1e} (tolerance {result['tolerance']:g})")
    print(f"use it with: ttakit predict {path} IMAGES --out preds.csv")
    return 0

