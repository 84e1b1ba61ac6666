"""Choose the transfer hyper-parameters of ``benchmarks/recipes.py`` (part 2) on VALIDATION
images only: classes 5-9 of the 10 % validation split, never the test images.

Pretrains the seed CNN on classes 0-4 exactly as ``recipes.py`` does (all their training
images, ``TRANSFER["augment"]``, one-cycle), then trains classes 5-9 from 100 images per class
with every candidate setting, for both budgets of the benchmark and two seeds (10, 11: not the
benchmark's 0-2), and scores each on the classes 5-9 validation images. Both arms are tuned
alike: (a) from scratch over its peak rate; (b) pretrained over the frozen epochs and the
discriminative slice. Writes ``benchmarks/results/recipes-transfer-tuning.md``/``.json``; the
best setting of each arm goes into ``recipes.TRANSFER`` by hand (the table says which).

    python benchmarks/recipes_transfer_tuning.py            # about 5 CPU-minutes after pretraining
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine_info, save_results  # noqa: E402
from recipes import RESULTS, TRANSFER, TRANSFER_BUDGETS, classes_subset, log, markdown  # noqa: E402
from ttakit._io import atomic_write_text  # noqa: E402
from ttakit.data import load_fashion_mnist, train_val_split  # noqa: E402
from ttakit.models import save_checkpoint  # noqa: E402
from ttakit.training.config import TrainConfig  # noqa: E402
from ttakit.training.loop import accuracy_of, train_model  # noqa: E402

SCRATCH_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
PRETRAINED = [  # (freeze epochs, head rate while frozen, lr slice LOW, HIGH after unfreezing)
    (0, 3e-3, 3e-4, 3e-3),
    (1, 3e-3, 1e-4, 1e-3),
    (1, 3e-3, 3e-4, 3e-3),
    (2, 3e-3, 3e-4, 3e-3),
    (1, 1e-2, 3e-4, 1e-2),
    (1, 1e-2, 1e-3, 1e-2),
]
SEEDS = (10, 11)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--arch", default="seed-cnn", help="seed-cnn (default) or a size-agnostic one such as resnet20")
    parser.add_argument("--budgets", default=None, help="epochs to tune, e.g. 15 (default: the benchmark's budgets)")
    parser.add_argument("--small-grid", action="store_true", help="2 scratch rates and 2 pretrained settings (the best of the seed CNN's)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help=f"how many of the seeds {SEEDS} (default all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ttakit-recipes"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    full = load_fashion_mnist("train")
    train_all, val_all = train_val_split(full, 0.1, seed=0)
    source = classes_subset(train_all, [0, 1, 2, 3, 4])
    few = classes_subset(train_all, [5, 6, 7, 8, 9], per_class=100)
    val = classes_subset(val_all, [5, 6, 7, 8, 9])
    hp = TRANSFER
    arch, seeds = args.arch, SEEDS[: args.seeds]
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else [e for e, _ in TRANSFER_BUDGETS]
    tag = "" if arch == "seed-cnn" else f"-{arch}"
    pre_dir = args.work / f"tuning-pretrained-0-4-{args.pretrain_epochs}ep{tag}"
    if not (pre_dir / "model.safetensors").is_file():
        log(f"pretraining on classes 0-4 ({len(source)} images, {args.pretrain_epochs} epochs)")
        config = TrainConfig(
            epochs=args.pretrain_epochs, batch_size=128, lr=hp["pretrain_lr"], schedule="onecycle", augment=hp["augment"], seed=0
        )
        pre = train_model(source, config, arch=arch, progress=False)
        save_checkpoint(pre_dir, pre.model, pre.meta)
    rows: list[dict[str, Any]] = []

    def score(arm: str, epochs: int, setting: str, make) -> None:
        accs = []
        for seed in seeds:
            accs.append(accuracy_of(train_model(few, make(seed), arch=arch, progress=False).model, val))
        rows.append({"arm": arm, "epochs": epochs, "setting": setting, "val_acc": statistics.mean(accs), "per_seed": accs})
        log(f"  {arm} {epochs} epochs, {setting}: validation accuracy {statistics.mean(accs) * 100:.2f} %")

    common = dict(batch_size=hp["batch_size"], schedule="onecycle", augment=hp["augment"])
    scratch_lrs, pretrained = (SCRATCH_LRS[1:3], PRETRAINED[:1] + PRETRAINED[2:3]) if args.small_grid else (SCRATCH_LRS, PRETRAINED)
    for epochs in budgets:
        for lr in scratch_lrs:
            score("(a) scratch", epochs, f"peak {lr:g}", lambda seed, lr=lr, e=epochs: TrainConfig(epochs=e, lr=lr, seed=seed, **common))
        for freeze, head, low, high in pretrained:
            score(
                "(b) pretrained", epochs, f"freeze {freeze} (head at {head:g}), slice {low:g}-{high:g}",
                lambda seed, f=freeze, h=head, lo=low, hi=high, e=epochs: TrainConfig(
                    epochs=e, lr=h, init=str(pre_dir), freeze_epochs=f, lr_slice=(lo, hi), seed=seed, **common
                ),
            )
    lines = [
        f"# Transfer hyper-parameters for {arch}, chosen on validation images",
        "",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} on {machine_info(torch.device('cpu'))['cpu_count']} CPU cores "
        f"(shared), 1 torch thread. `python benchmarks/recipes_transfer_tuning.py{''.join(f' {a}' for a in (argv if argv is not None else sys.argv[1:]))}`, {(time.perf_counter() - started) / 60:.0f} min. "
        f"Classes 5-9 from 100 training images per class ({len(few)}), scored on all {len(val)} classes 5-9 images of the "
        f"validation split (never the test images), mean of seeds {', '.join(map(str, seeds))}. Both arms: batch "
        f"{hp['batch_size']}, one-cycle, augmentation {'+'.join(hp['augment'])}; (b) starts from {arch} pretrained on "
        f"classes 0-4 ({len(source)} images, {args.pretrain_epochs} epochs, one-cycle peak {hp['pretrain_lr']:g}) "
        f"with a new classifier; the head group trains alone for the frozen epochs, then every group at the slice's rates.",
        "",
    ]
    best: dict[str, Any] = {}
    for epochs in budgets:
        table = sorted((r for r in rows if r["epochs"] == epochs), key=lambda r: -r["val_acc"])
        for arm in ("(a) scratch", "(b) pretrained"):
            best[f"{arm} {epochs}"] = next(r for r in table if r["arm"] == arm)
        lines += [
            f"## {epochs} epochs",
            "",
            markdown(
                ["arm", "setting", "val acc %", "per seed"],
                [[r["arm"], r["setting"], f"{r['val_acc'] * 100:.2f}", ", ".join(f"{a * 100:.2f}" for a in r["per_seed"])] for r in table],
            ),
            "",
        ]
    lines += ["## Best per arm and budget", ""]
    lines += [f"- {key} epochs: {r['setting']} ({r['val_acc'] * 100:.2f} %)" for key, r in best.items()]
    atomic_write_text(RESULTS / f"recipes-transfer-tuning{tag}.md", "\n".join(lines) + "\n")
    save_results(RESULTS / f"recipes-transfer-tuning{tag}.json", {"rows": rows, "best": best, "hyper_parameters": {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
