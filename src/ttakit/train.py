"""A small, straight-line trainer (nanoGPT style): Adam or SGD, one-cycle schedule,
vectorised train-time augmentation (flip, shift, crop, mixup), a progress bar, and a
self-describing checkpoint.

Example:
    >>> from ttakit.data import ImageDataset
    >>> ds = ImageDataset(torch.rand(64, 1, 8, 8), torch.arange(64) % 2, ["a", "b"])
    >>> result = train_model(ds, TrainConfig(epochs=1, batch_size=16), progress=False)
    >>> len(result.history)
    1
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augmentations import AUGMENTATIONS as AUGMENTATION_SPECS
from .augmentations import make_records, parse_augment_names
from .data.core import ImageDataset, normalization_stats
from .errors import CheckpointError, InvalidInputError, unknown_name
from .models import (
    CheckpointMeta,
    Normalize,
    classifier_module,
    create_model,
    is_fixed_size,
    layer_groups,
    list_models,
    save_checkpoint,
)
from .progress import note
from .progress import progress as progress_bar

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

    - ``lr="auto"`` runs :func:`ttakit.lr_find.lr_find` first and trains at its
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
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(
                    f"TrainConfig.{name} must be a positive integer, got {value!r}"
                )

        def non_negative_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInputError(
                    f"TrainConfig.{name} must be an integer >= 0, got {value!r}"
                )

        positive_int("epochs")
        positive_int("batch_size")
        from .engine import check_device  # the one device parser (--device on every command)

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
            pair = self.lr_slice
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
            self.lr_slice = (float(pair[0]), float(pair[1]))
        if self.progressive is not None:
            sizes = self.progressive
            if isinstance(sizes, str):
                sizes = tuple(s.strip() for s in sizes.split(",") if s.strip())
            try:
                parsed = tuple(int(s) for s in sizes)  # type: ignore[union-attr]
                ok = len(parsed) > 0 and all(p >= 1 and float(p) == float(s) for p, s in zip(parsed, sizes, strict=True))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise InvalidInputError(
                    f"TrainConfig.progressive must be image sizes like 14,28 (positive integers), got {self.progressive!r}"
                )
            if len(parsed) > self.epochs:
                raise InvalidInputError(
                    f"TrainConfig.progressive has {len(parsed)} sizes but only {self.epochs} epochs; each size needs one epoch at least"
                )
            self.progressive = parsed
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


def translate(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels with zero fill: ``out[b, :, y, x] = in[b, :, y - dy[b], x - dx[b]]``.

    Positive ``dx`` moves content right, positive ``dy`` moves it down.

    Shape:
        - images: ``(B, C, H, W)``; dx, dy: ``(B,)`` integers.
        - Output: ``(B, C, H, W)``.
    """
    _, _, height, width = images.shape
    pad = int(max(dx.abs().max(), dy.abs().max())) if len(dx) else 0
    if pad == 0:
        return images.clone()
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = torch.arange(height)[None, :] + pad - dy.long()[:, None]  # (B, H)
    cols = torch.arange(width)[None, :] + pad - dx.long()[:, None]  # (B, W)
    batch = torch.arange(images.shape[0])[:, None, None]  # (B, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(
    images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Flip each image horizontally with probability ``p``. ``(B, C, H, W) -> (B, C, H, W)``."""
    flip = torch.rand(images.shape[0], generator=generator) < p  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_shift(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by a random integer ``(dx, dy)`` in ``[-max_shift, max_shift]^2``, zero fill."""
    offsets = torch.randint(-max_shift, max_shift + 1, (2, images.shape[0]), generator=generator)
    return translate(images, offsets[0], offsets[1])


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop a random window of the original size.

    A crop at offset ``o`` in ``[0, 2 * padding]`` is a translation by ``padding - o``, so this
    is :func:`random_shift` with ``max_shift = padding``.
    """
    return random_shift(images, padding, generator)


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner: ``lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``
    drawn per sample; the one-hot (or soft) ``targets`` ``(B, K)`` are mixed the same way."""
    batch = images.shape[0]
    perm = torch.randperm(batch, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=batch)).to(
        images.dtype
    )
    mixed_images = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[perm]
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[perm]
    return mixed_images, mixed_targets


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    num_classes: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``config.augment`` to a batch: geometric ops first, mixup last.

    Returns ``(images, targets)`` with targets ``(B,)`` class indices, or ``(B, K)``
    probabilities when mixup is on.
    """
    targets: torch.Tensor = labels
    for name in config.augment:
        if name == "flip":
            images = random_flip(images, generator)
        elif name == "shift":
            images = random_shift(images, config.max_shift, generator)
        elif name == "crop":
            images = random_crop(images, config.crop_padding, generator)
    if "mixup" in config.augment:
        images, targets = mixup(
            images, F.one_hot(labels, num_classes).float(), config.mixup_alpha, generator
        )
    return images, targets


# ----------------------------------------------------------------------------- inference


def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Plain inference (the identity policy through :class:`~ttakit.engine.TTAEngine`, in eval mode,
    under ``torch.inference_mode``): ``(N, C, H, W) -> (N, K)`` raw logits, float32 on CPU.

    At most ``batch_size`` images per forward pass (the engine's pass size: 64 on CPU). The
    model's train/eval mode is restored afterwards.
    Non-finite logits are returned as they are (a diverging run is the trainer's to report).
    """
    from .engine import TTAEngine, eval_mode  # the engine imports nothing from training
    from .policy import Policy

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if images.shape[0] == 0:
        return torch.empty(0, 0)
    engine = TTAEngine(
        model, Policy.identity(), activation=None, max_batch=batch_size, check_outputs=False
    )
    with eval_mode(model):
        return engine.run(images).merged.float().cpu()


def accuracy_of(model: nn.Module, dataset: ImageDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of plain (no TTA) predictions on ``dataset`` (:func:`predict_logits`)."""
    if len(dataset) == 0:
        raise InvalidInputError("cannot compute accuracy on an empty data set")
    logits = predict_logits(model, dataset.images, batch_size)
    return float((logits.argmax(1) == dataset.labels).float().mean())


# ----------------------------------------------------------------------------- schedules


def schedule_factor(
    schedule: str,
    step: int,
    total_steps: int,
    cycle_steps: int | None = None,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """The multiplier of the peak rate at optimizer step ``step`` (0-based) of ``total_steps``.

    - ``constant``: 1.
    - ``onecycle`` (the rates of ``torch.optim.lr_scheduler.OneCycleLR`` with cosine annealing):
      ``1/25`` at step 0, rising along a half cosine to 1 at step ``0.3 * T - 1``, then falling
      to ``1 / (25 * 1e4)`` at the last step ``T - 1``.
    - ``cosine``: ``(1 + cos(pi * step / T)) / 2``: 1 at step 0, 0.5 at step ``T / 2``.
    - ``sgdr``: the same cosine within each cycle of ``C = cycle_steps`` steps, restarting at 1
      on steps ``0, C, 2C, ...``; 0.5 at ``C / 2`` of every cycle.

    Example:
        >>> round(schedule_factor("onecycle", 0, 100), 6), schedule_factor("onecycle", 29, 100)
        (0.04, 1.0)
        >>> schedule_factor("sgdr", 100, 200, cycle_steps=100), schedule_factor("sgdr", 150, 200, cycle_steps=100)
        (1.0, 0.5)
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    if schedule == "sgdr":
        cycle = max(int(cycle_steps or total_steps), 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step % cycle) / cycle))
    if schedule == "onecycle":
        initial, low = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)

        def anneal(start: float, end: float, pct: float) -> float:
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)

        peak_step = float(pct_start * total_steps) - 1
        last_step = total_steps - 1
        if peak_step > 0 and step <= peak_step:
            return anneal(initial, 1.0, step / peak_step)
        start = max(peak_step, 0.0)
        if last_step <= start:
            return 1.0
        return anneal(1.0, low, min((step - start) / (last_step - start), 1.0))
    raise unknown_name("schedule", schedule, SCHEDULES)


def slice_rates(low: float, high: float, groups: int) -> list[float]:
    """Rates spread geometrically from ``low`` (first group) to ``high`` (last group, the head).

    Example:
        >>> [round(r, 6) for r in slice_rates(1e-4, 1e-2, 3)]
        [0.0001, 0.001, 0.01]
    """
    if groups == 1:
        return [float(high)]
    return [float(low * (high / low) ** (i / (groups - 1))) for i in range(groups)]


# ----------------------------------------------------------------------------- transfer


@dataclass
class InitReport:
    """What ``--init`` loaded: model keys ``loaded`` from the file, ``new`` model keys left
    freshly initialised (the head, when its shape differs), and file keys ``skipped`` (with
    the reason)."""

    path: str
    loaded: list[str]
    new: list[str]
    skipped: list[str]

    def summary(self) -> str:
        def first(items: list[str], n: int = 4) -> str:
            return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

        parts = [f"init from {self.path}: loaded {len(self.loaded)} tensors"]
        parts.append(f"new {len(self.new)}" + (f" ({first(self.new)})" if self.new else ""))
        parts.append(f"skipped {len(self.skipped)}" + (f" ({first(self.skipped)})" if self.skipped else ""))
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects.

    Accepts a safetensors file, a torch file holding a plain state dict (read with
    ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper
    is unwrapped, a ``module.`` prefix from DataParallel dropped), or a ttakit checkpoint folder.

    Raises:
        CheckpointError: the file is missing, unreadable, a pickle of something other than
            tensors, or holds something that is not a mapping of names to tensors.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(
                f"--init {path} is a folder without model.safetensors; give a weights file "
                "(.safetensors or a torch state dict) or a ttakit checkpoint folder"
            )
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"--init weights {path} do not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    is_torch = head[:2] == b"PK" or head[:1] == b"\x80"  # torch's zip format, or a legacy pickle
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        try:
            state: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on bad files
            raise CheckpointError(f"--init {path} is a corrupt safetensors file ({type(exc).__name__}: {exc})") from exc
    elif not is_torch:
        raise CheckpointError(
            f"--init {path} is neither a safetensors file nor a torch weights file (it starts with "
            f"{head[:4]!r}); give a .safetensors file, a torch.save'd state dict or a checkpoint folder"
        )
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            reason = f"it holds a {found.group(1)} object" if found else type(exc).__name__
            raise CheckpointError(
                f"--init {path} is a pickle that is not a plain state dict, so it is not loaded "
                f"(torch.load with weights_only=True refused it: {reason}); save the weights with "
                "torch.save(model.state_dict(), path) or as safetensors"
            ) from exc
        except Exception as exc:  # not a zip, truncated, not a pickle at all
            raise CheckpointError(
                f"--init {path} is neither a safetensors file nor a torch weights file "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})"
            ) from exc
        if isinstance(state, dict) and not _is_state_dict(state):
            for key in ("state_dict", "model", "model_state_dict"):
                if _is_state_dict(state.get(key)):
                    state = state[key]
                    break
    if not _is_state_dict(state):
        kind = type(state).__name__ + (f" with keys {list(state)[:4]}" if isinstance(state, dict) else "")
        raise CheckpointError(
            f"--init {path} holds a {kind}, not a state dict (a mapping of parameter names to tensors)"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier (:func:`~ttakit.models.classifier_module`)."""
    classifier = classifier_module(model)
    prefix = next((name for name, module in model.named_modules() if module is classifier), "")
    return {f"{prefix}.{k}" if prefix else k for k in classifier.state_dict()}


def _head_and_norm_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    head_ids = {id(p) for p in layer_groups(model)[-1]}
    head = {name for name, p in model.named_parameters() if id(p) in head_ids}
    for prefix, module in model.named_modules():  # the head's BatchNorm statistics belong to it
        params = list(module.parameters(recurse=False))
        if params and all(id(p) in head_ids for p in params):
            head |= {f"{prefix}.{b}" if prefix else b for b, _ in module.named_buffers(recurse=False)}
    norm = {
        f"{prefix}.{buf}" if prefix else buf
        for prefix, module in model.named_modules()
        if isinstance(module, Normalize)
        for buf, _ in module.named_buffers(recurse=False)
    }
    return head, norm


def init_classes(path: str | os.PathLike) -> list[str] | None:
    """The class names recorded beside ``--init`` weights (a ttakit checkpoint), else None."""
    path = Path(path)
    meta_file = path / "checkpoint.json" if path.is_dir() else path.parent / "checkpoint.json"
    if path.is_file() and path.name != "model.safetensors":
        return None
    try:
        classes = json.loads(meta_file.read_text(encoding="utf-8")).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    return list(classes) if isinstance(classes, list) else None


def load_init_weights(
    model: nn.Module, path: str | os.PathLike, arch: str = "model", new_head: bool = False
) -> InitReport:
    """Load the tensors of the state dict at ``path`` whose name and shape match ``model``.

    Everything else stays as initialised (``new``, typically the classifier when the number
    of classes differs) or is ignored (``skipped``). ``new_head=True`` (the classes differ)
    leaves the classifier (:func:`~ttakit.models.classifier_module`, the layer that outputs the
    logits) new even where its shape matches; every other tensor of the head that matches, such
    as a pretrained dense layer before the classifier, is kept. The normalization buffers are
    loaded when present (the body was trained on inputs normalized that way).

    Raises:
        CheckpointError: nothing of the body matches: nothing at all, or only the head or the
            normalization, meaning weights for another architecture.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head, norm = _head_and_norm_keys(model)
    fresh = _classifier_keys(model) if new_head else set()
    loaded = [
        k for k in own if k in state and tuple(state[k].shape) == tuple(own[k].shape) and k not in fresh
    ]
    new = [k for k in own if k not in set(loaded)]

    def reason(k: str) -> str:
        if k not in own:
            return f"{k} (not in {arch})"
        if tuple(state[k].shape) != tuple(own[k].shape):
            return f"{k} (shape {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
        return f"{k} (new classifier: other classes)"

    skipped = [reason(k) for k in state if k not in set(loaded)]
    params = {name for name, _ in model.named_parameters()}
    body_loaded = [k for k in loaded if k in params and k not in head]
    if not body_loaded:
        own_keys = [k for k in own if k not in norm and not k.endswith("num_batches_tracked")]
        file_keys = [k for k in state if not k.endswith("num_batches_tracked")] or list(state)
        what = (
            "none of its tensors matches"
            if not [k for k in loaded if k not in norm]
            else f"only head tensors ({', '.join(k for k in loaded if k not in norm)}) match"
        )
        raise CheckpointError(
            f"--init {path}: {what} {arch} by name and shape; weights for another architecture? "
            f"(file has {', '.join(file_keys[:3])}{', ...' if len(file_keys) > 3 else ''}; "
            f"{arch} has {', '.join(own_keys[:3])}, ...)"
        )
    merged = dict(own)
    for k in loaded:
        merged[k] = state[k].to(own[k].dtype)
    model.load_state_dict(merged)
    return InitReport(path=str(path), loaded=loaded, new=new, skipped=skipped)


def _set_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) every parameter outside the head group."""
    head_ids = {id(p) for p in layer_groups(model)[-1]}
    for param in model.parameters():
        param.requires_grad_(not frozen or id(param) in head_ids)


def _freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode (statistics untouched)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


# ----------------------------------------------------------------------------- resizing


LARGE_SIDE = 128  # above this, training at the data's own size is slow: the size note says so


def fit_image_size(splits: Any, image_size: int | tuple[int, int] | None, spec: str | os.PathLike) -> tuple[Any, str]:
    """``splits`` at ``image_size`` (recorded in the recipe as ``image_size``) and one line saying
    which size training uses and why: ``--image-size``, or the data's own size (an image folder:
    its most common image size), with a hint when that is large."""
    from dataclasses import replace as _replace

    from .data.registry import resize_dataset

    height, width = splits.train.image_size
    if image_size is None:
        folder = Path(os.fspath(spec)).is_dir()
        why = "the most common size among the folder's images" if folder else "the data's own size"
        text = f"image size {height}x{width}: {why} (--image-size to choose another)"
        if max(height, width) > LARGE_SIDE:
            text += ("; large for training: memory and time grow with the pixels, so consider --image-size 64 "
                     "(or the size your architecture expects)")
        return splits, text
    size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))

    def resized(dataset: ImageDataset | None) -> ImageDataset | None:
        return None if dataset is None else resize_dataset(dataset, size)

    recipe = {**splits.recipe, "image_size": list(size)}
    splits = _replace(splits, train=resized(splits.train), val=resized(splits.val), test=resized(splits.test),
                      recipe=recipe)
    same = size == (height, width)
    return splits, (f"image size {size[0]}x{size[1]}: --image-size"
                    + (" (the data's own size)" if same else f" (the data's images, {height}x{width}, resized)"))



def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to height ``size`` keeping the aspect ratio (bilinear, antialiased).

    Shape:
        - images: ``(N, C, H, W)``; output ``(N, C, size, round(W * size / H))``.
    """
    height, width = images.shape[-2:]
    target = (int(size), max(1, int(round(width * size / height))))
    if target == (height, width):
        return images
    out = []
    for start in range(0, images.shape[0], 4096):  # bounded memory on big data sets
        out.append(F.interpolate(images[start : start + 4096], size=target, mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out).clamp_(0.0, 1.0)


def _stage_sizes(config: TrainConfig, native: int) -> list[int]:
    """The image height of every epoch: ``config.progressive`` split over the epochs in turn
    (later sizes get the remainder), or the native height throughout."""
    if not config.progressive:
        return [native] * config.epochs
    sizes = list(config.progressive)
    base, extra = divmod(config.epochs, len(sizes))
    counts = [base + (1 if i >= len(sizes) - extra else 0) for i in range(len(sizes))]
    return [size for size, count in zip(sizes, counts, strict=True) for _ in range(count)]


def build_model(
    train_ds: ImageDataset,
    config: TrainConfig,
    arch: str = "seed-cnn",
    arch_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, InitReport | None]:
    """The model :func:`train_model` starts from: ``arch`` with the training data's
    normalization, ``config.init`` weights loaded, on ``config.device``; seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    mean, std = normalization_stats(train_ds.images)
    model = create_model(
        arch,
        in_channels=train_ds.channels,
        num_classes=train_ds.num_classes,
        image_size=train_ds.image_size,
        mean=mean,
        std=std,
        **dict(arch_kwargs or {}),
    )
    report = None
    if config.init:
        classes = init_classes(config.init)  # a ttakit checkpoint says which classes its head knows
        new_head = classes is not None and list(classes) != list(train_ds.classes)
        report = load_init_weights(model, config.init, arch, new_head=new_head)
    return model.to(torch.device(config.device)), report


def _check_progressive(config: TrainConfig, arch: str, train_ds: ImageDataset) -> None:
    if not config.progressive:
        return
    height, width = train_ds.image_size
    if is_fixed_size(arch):
        raise InvalidInputError(
            f"progressive resizing ({','.join(map(str, config.progressive))}) needs a fully convolutional "
            f"architecture with global pooling, but {arch!r} is built for one input size ({height}x{width}); "
            f"use one of: {', '.join(m for m in list_models() if not is_fixed_size(m))}"
        )
    if config.progressive[-1] != height:
        raise InvalidInputError(
            f"progressive sizes must end at the data's own image size {height} (the model is evaluated "
            f"at that size), got {','.join(map(str, config.progressive))}"
        )


def autocast(config: TrainConfig) -> Any:
    """The forward pass's autocast under ``config.amp`` (``--amp``): bfloat16 on CPU, float16 on
    CUDA and MPS; a no-op context otherwise."""
    import contextlib

    if not config.amp:
        return contextlib.nullcontext()
    device_type = torch.device(config.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16 if device_type == "cpu" else torch.float16)


def _make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.Adam(groups, weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train_model` returns: the model (eval mode), its checkpoint metadata and
    per-epoch history (``train_loss``, ``train_acc``, ``val_loss``/``val_acc`` when validated,
    ``image_size``, ``frozen``, ``lr``, ``seconds``), the head group's rate at every optimizer
    step (``lr_history``), what ``--init`` loaded and the learning-rate sweep of ``lr="auto"``."""

    model: nn.Module
    meta: CheckpointMeta
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    lr_history: list[float] = field(default_factory=list)
    init_report: InitReport | None = None
    lr_find: Any = None
    size_note: str | None = None


def train_model(
    train_ds: ImageDataset,
    config: TrainConfig | None = None,
    arch: str = "seed-cnn",
    arch_kwargs: dict[str, Any] | None = None,
    val_ds: ImageDataset | None = None,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``arch`` on ``train_ds``; same config and data give identical weights.

    Normalization statistics come from the (limited) training images only and are built into
    the model, which therefore takes raw images in ``[0, 1]``. When ``out_dir`` is given, the
    checkpoint is saved there.
    """
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise InvalidInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(train_ds, ImageDataset):
        raise InvalidInputError(f"train_ds must be an ImageDataset, got {type(train_ds).__name__}")
    train_ds = train_ds.head(config.limit)
    if len(train_ds) < 2:
        raise InvalidInputError(f"training needs at least 2 images, got {len(train_ds)}")
    if val_ds is not None and (
        val_ds.channels != train_ds.channels
        or val_ds.image_size != train_ds.image_size
        or list(val_ds.classes) != list(train_ds.classes)
    ):
        raise InvalidInputError(
            f"val_ds must match train_ds in channels, image size and classes: got "
            f"{val_ds.channels}x{val_ds.image_size} with {val_ds.num_classes} classes, expected "
            f"{train_ds.channels}x{train_ds.image_size} with {train_ds.num_classes} classes"
        )
    arch_kwargs = dict(arch_kwargs or {})
    device = torch.device(config.device)

    _check_progressive(config, arch, train_ds)  # before any work
    found = None
    lr = config.lr
    if lr == "auto":
        from .lr_find import lr_find  # lr_find builds on this module

        found = lr_find(train_ds, arch=arch, arch_kwargs=arch_kwargs, config=config, progress=progress)
        lr = found.suggestion
        if progress:
            note(f"lr auto: {found.summary()}; training at {lr:.3g}")
    model, init_report = build_model(train_ds, config, arch, arch_kwargs)
    norm = next(m for m in model.modules() if isinstance(m, Normalize))
    mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()  # loaded by --init, or ours
    generator = torch.Generator().manual_seed(config.seed)  # shuffling and augmentation

    n = len(train_ds)
    steps_per_epoch = math.ceil(n / config.batch_size)
    sizes = _stage_sizes(config, train_ds.image_size[0])
    stage_images: dict[int, torch.Tensor] = {}
    optimizer: torch.optim.Optimizer | None = None
    scheduler = None
    lr_history: list[float] = []

    def start_phase(frozen: bool, epochs: int) -> None:
        """A new optimizer and schedule: the head alone while frozen, else every layer group
        (at the --lr-slice rates when given)."""
        nonlocal optimizer, scheduler
        _set_frozen(model, frozen)
        groups = layer_groups(model)
        if frozen:
            param_groups = [{"params": groups[-1], "lr": float(lr)}]
        elif config.lr_slice is not None:
            rates = slice_rates(*config.lr_slice, len(groups))
            param_groups = [{"params": g, "lr": r} for g, r in zip(groups, rates, strict=True)]
        else:
            param_groups = [{"params": [p for g in groups for p in g], "lr": float(lr)}]
        optimizer = _make_optimizer(config, param_groups)
        total = epochs * steps_per_epoch
        schedule, cycle = config.schedule or "constant", config.cycle_epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: schedule_factor(schedule, step, total, cycle)
        )

    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        frozen = epoch < config.freeze_epochs
        if epoch == 0 or epoch == config.freeze_epochs:
            start_phase(frozen, config.freeze_epochs if frozen else config.epochs - config.freeze_epochs)
            if progress and epoch > 0:
                note(f"unfrozen: training every layer from epoch {epoch + 1}")
        assert optimizer is not None and scheduler is not None
        size = sizes[epoch]
        if size not in stage_images:
            stage_images.clear()  # one resized copy at a time
            stage_images[size] = resize_images(train_ds.images, size)
        images_now = stage_images[size]
        model.train()
        if frozen:
            _freeze_batchnorm_stats(model)
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress_bar(  # a bar on a terminal; in a log only the epoch line below
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            enabled=progress,
            log=False,
            leave=True,
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(index) < 2:  # BatchNorm cannot train on a single sample
                scheduler.step()
                continue
            labels = train_ds.labels[index]
            images, targets = augment_batch(
                images_now[index], labels, config, train_ds.num_classes, generator
            )
            images, targets, labels = images.to(device), targets.to(device), labels.to(device)

            with autocast(config):
                logits = model(images).float()  # (B, K)
            loss = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr_history.append(float(optimizer.param_groups[-1]["lr"]))
            optimizer.step()
            scheduler.step()

            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(index)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()

        record: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "image_size": size,
            "frozen": int(frozen),
            "lr": lr_history[-1] if lr_history else float(optimizer.param_groups[-1]["lr"]),  # the last step's head rate
        }
        if val_ds is not None:
            val_logits = predict_logits(model, val_ds.images)
            record["val_loss"] = float(F.cross_entropy(val_logits, val_ds.labels))
            record["val_acc"] = float((val_logits.argmax(1) == val_ds.labels).float().mean())
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if progress:
            note(
                ", ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items()
                )
            )

    model.eval()
    metrics = {k: v for k, v in history[-1].items() if k != "epoch"}
    metrics["epochs"] = config.epochs
    metrics["train_images"] = n
    metrics["total_seconds"] = sum(h["seconds"] for h in history)
    metrics["lr"] = float(lr)
    extra: dict[str, Any] = {"train_config": asdict(config)}
    if init_report is not None:
        extra["init"] = init_report.to_json()
    if found is not None:
        extra["lr_find"] = found.to_json(curve=False)
    meta = CheckpointMeta(
        arch=arch,
        arch_kwargs=arch_kwargs,
        classes=list(train_ds.classes),
        in_channels=train_ds.channels,
        image_size=list(train_ds.image_size),
        mean=mean,
        std=std,
        train_augmentations=config.augmentation_records(),
        dataset=train_ds.name,
        seed=config.seed,
        metrics=metrics,
        extra=extra,
    )
    checkpoint_dir = None
    if out_dir is not None:
        checkpoint_dir = save_checkpoint(out_dir, model, meta)
        meta.source = str(checkpoint_dir)
    _set_frozen(model, False)
    return TrainResult(
        model=model,
        meta=meta,
        history=history,
        checkpoint_dir=checkpoint_dir,
        lr_history=lr_history,
        init_report=init_report,
        lr_find=found,
    )
