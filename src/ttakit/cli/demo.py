"""``ttakit demo``: parse, call :func:`ttakit.jobs.demo.run_demo`, print."""

from __future__ import annotations

import argparse

from ._common import _positive_int

NAME = "demo"
OUTPUTS = [("out", "folder", "--out")]
DRAWS = "writing PNG plots"


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="the classic TTA experiment end to end on Fashion-MNIST")
    demo.add_argument("--quick", action="store_true", help="a subset: 12,000 training images, 2 epochs, 2,000 test images (timing: benchmarks/results/demo-quick.md)")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="epochs per model (default: 2 with --quick, else the full experiment's)")
    demo.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST's IDX files")
    demo.add_argument("--out", default="runs/demo", help="results folder")


def run(args: argparse.Namespace) -> int:
    from ..jobs.demo import run_demo

    results = run_demo(args.out, quick=args.quick, data_dir=args.data_dir, epochs=args.epochs,
                       progress=not args.no_progress)
    print(results["table"])
    print()
    for line in results["lessons"]:
        print(f"- {line}")
    print(f"\nresults written to {results['out_dir']} (results.json, results.md, policy_metrics.png, reliability.png)")
    return 0
