"""Transfer learning: read weights from a file, load them into a model, freeze and unfreeze."""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..models import (
    Normalize,
    classifier_module,
    layer_groups,
)


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
