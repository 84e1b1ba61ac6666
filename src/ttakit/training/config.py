"""What a training run does: :class:`TrainConfig`, validated when built."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from ..augmentations import AUGMENTATIONS as AUGMENTATION_SPECS
from ..augmentations import make_records, parse_augment_names
from ..errors import InvalidInputError, unknown_name

AUGMENTATIONS = tuple(AUGMENTATION_SPECS)  # the shared vocabulary: ttakit.augmentations
SCHEDULES = ("constant", "onecycle", "cosine", "sgdr")


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Training hyper-parameters, validated on construction.

    ``schedule`` defaults to ``"constant"`` for Adam and ``"onecycle"`` for SGD (peak lr =
    ``lr``); SGD uses momentum 0.9 with Nesterov. ``weight_decay`` defaults to 0 for Adam and
    5e-4 for SGD. ``augment`` names train-time augmentations from ``AUGMENTATIONS``; a
    comma-separated string such as ``"flip,shift"`` is accepted too.

    The recipe options (see :func:`schedule_factor` for the schedules' exact rates):

    - ``lr="auto"`` runs :func:`ttakit.training.lr_find` first and trains at its
      minimum/10 suggestion.
    - ``schedule``: ``"onecycle"`` (warm up from lr/25 to lr over the first 30 % of the
      steps, then anneal to lr/2.5e5), ``"cosine"`` (lr down to 0 over the run) or ``"sgdr"``
      (cosine restarted every ``cycle_epochs`` epochs).
    - ``label_smoothing`` in [0, 1); ``mixup_alpha`` with ``"mixup"`` in ``augment``.
    - ``init``: a state dict (safetensors file, torch file read with ``weights_only=True``, or
      a ttakit checkpoint folder) loaded by name and shape before training.
    - ``freeze_epochs``: the first N epochs train only the head (the last layer group), with
      the body's weights and BatchNorm statistics untouched; the schedule restarts at unfreeze.
    - ``lr_slice=(LOW, HIGH)``: after unfreezing, layer group ``i`` of ``G`` trains at
      ``LOW * (HIGH / LOW) ** (i / (G - 1))``; the head at HIGH.
    - ``progressive=(14, 28)``: the epochs are split over the image sizes in turn (the last
      must be the data's own size), reusing the weights; refused for fixed-size architectures.
    """

    epochs: int = 3
    batch_size: int = 128
    lr: float | Literal["auto"] = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["constant", "onecycle", "cosine", "sgdr"] | None = None
    augment: tuple[str, ...] = ()
    seed: int = 0
    limit: int | None = None
    weight_decay: float | None = None
    max_shift: int = 2
    crop_padding: int = 2
    mixup_alpha: float = 0.2
    device: str = "cpu"
    amp: bool = False
    label_smoothing: float = 0.0
    cycle_epochs: int = 1
    init: str | None = None
    freeze_epochs: int = 0
    lr_slice: tuple[float, float] | None = None
    progressive: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        positive_int, non_negative_int = partial(_check_int, self, 1), partial(_check_int, self, 0)
        positive_int("epochs")
        positive_int("batch_size")
        from ..engine import check_device  # the one device parser (--device on every command)

        self.device = str(check_device(self.device) or "cpu")
        if not isinstance(self.amp, bool):
            raise InvalidInputError(f"TrainConfig.amp must be True or False, got {self.amp!r}")
        if self.limit is not None:
            positive_int("limit")
        non_negative_int("max_shift")
        non_negative_int("crop_padding")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InvalidInputError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        positive_int("cycle_epochs")
        non_negative_int("freeze_epochs")
        if self.freeze_epochs > self.epochs:
            raise InvalidInputError(
                f"TrainConfig.freeze_epochs must be at most epochs ({self.epochs}), got {self.freeze_epochs}"
            )
        ls = self.label_smoothing
        if not isinstance(ls, (int, float)) or isinstance(ls, bool) or not 0 <= ls < 1:
            raise InvalidInputError(f"TrainConfig.label_smoothing must be a number in [0, 1), got {ls!r}")
        if self.lr_slice is not None:
            self.lr_slice = _checked_lr_slice(self.lr_slice)
        if self.progressive is not None:
            self.progressive = _checked_progressive(self.progressive, self.epochs)
        if self.init is not None:
            if not isinstance(self.init, (str, os.PathLike)):
                raise InvalidInputError(f"TrainConfig.init must be a path to weights, got {self.init!r}")
            self.init = str(Path(self.init).resolve())  # recorded absolute: --repeats retrains from anywhere
        if isinstance(self.lr, str) and self.lr != "auto":
            raise InvalidInputError(f"TrainConfig.lr must be a number > 0 or 'auto', got {self.lr!r}")
        for name in ("lr", "mixup_alpha"):
            value = getattr(self, name)
            if name == "lr" and value == "auto":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise InvalidInputError(f"TrainConfig.{name} must be a number > 0, got {value!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise unknown_name("optimizer", self.optimizer, ("adam", "sgd"))
        if self.schedule is None:
            self.schedule = "onecycle" if self.optimizer == "sgd" else "constant"
        if self.schedule not in SCHEDULES:
            raise unknown_name("schedule", self.schedule, SCHEDULES)
        if self.weight_decay is None:
            self.weight_decay = 5e-4 if self.optimizer == "sgd" else 0.0
        wd = self.weight_decay
        if not isinstance(wd, (int, float)) or isinstance(wd, bool) or not wd >= 0:
            raise InvalidInputError(f"TrainConfig.weight_decay must be a number >= 0, got {wd!r}")
        self.augment = parse_augment_names(self.augment, "TrainConfig.augment")

    def augmentation_records(self) -> list[dict[str, Any]]:
        """The augmentations with their parameters, as stored in ``CheckpointMeta.train_augmentations``."""
        return make_records(
            self.augment, max_shift=self.max_shift, crop_padding=self.crop_padding, mixup_alpha=self.mixup_alpha
        )


# ----------------------------------------------------------------------------- augmentations


def _check_int(config: TrainConfig, least: int, name: str) -> None:
    """``config.<name>`` is an integer >= ``least`` (0 or 1)."""
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        expected = "a positive integer" if least == 1 else "an integer >= 0"
        raise InvalidInputError(f"TrainConfig.{name} must be {expected}, got {value!r}")


def _checked_lr_slice(pair: Any) -> tuple[float, float]:
    """``lr_slice`` as ``(LOW, HIGH)`` floats, LOW <= HIGH, both finite and > 0."""
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in pair)
    ):
        raise InvalidInputError(
            f"TrainConfig.lr_slice must be two rates (LOW, HIGH) > 0, got {pair!r}"
        )
    if pair[0] > pair[1]:
        raise InvalidInputError(
            f"lr_slice LOW must not exceed HIGH (LOW for the first layers, HIGH for the head), "
            f"got LOW={pair[0]:g} > HIGH={pair[1]:g}"
        )
    return (float(pair[0]), float(pair[1]))


def _checked_progressive(progressive: Any, epochs: int) -> tuple[int, ...]:
    """``progressive`` (sizes, or text such as ``"14,28"``) as positive integers, at most one per epoch."""
    sizes = progressive
    if isinstance(sizes, str):
        sizes = tuple(s.strip() for s in sizes.split(",") if s.strip())
    try:
        parsed = tuple(int(s) for s in sizes)  # type: ignore[union-attr]
        ok = len(parsed) > 0 and all(p >= 1 and float(p) == float(s) for p, s in zip(parsed, sizes, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidInputError(
            f"TrainConfig.progressive must be image sizes like 14,28 (positive integers), got {progressive!r}"
        )
    if len(parsed) > epochs:
        raise InvalidInputError(
            f"TrainConfig.progressive has {len(parsed)} sizes but only {epochs} epochs; each size needs one epoch at least"
        )
    return parsed
