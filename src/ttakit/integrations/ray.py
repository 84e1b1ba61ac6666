"""TTA predictions over Ray Data (``pip install "ttakit[ray]"``).

:class:`TTAPredictor` is a callable class for :meth:`ray.data.Dataset.map_batches`: each Ray
worker loads the model and the policy once, then turns NumPy batches of images into merged
probabilities, the top-k classes and the uncertainty columns::

    import ray
    from ttakit.integrations.ray import TTAPredictor

    ds = ray.data.from_numpy(images_nhwc_uint8)  # column "data"; or any dataset with an image column
    out = ds.map_batches(
        TTAPredictor,
        fn_constructor_kwargs={"model_source": "runs/cnn", "policy": "hflip", "image_column": "data"},
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=4),
    )

Ray does not keep row order: carry an index or path column through (every column but the image
column is passed on). :func:`predict_files` is what ``ttakit predict --engine ray`` runs: image
files decoded and predicted in Ray workers, each batch one block of files by global position
(so every image runs with the same other images as in one process), results handed back in
input order.

Ray itself is imported only by :func:`predict_files` and :func:`require_ray`; the predictor class
needs only ttakit and torch, so it can be tested and pickled without Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..aliases import get_policy
from ..data.decode import DecodeError, decode_image
from ..engine import TTAEngine
from ..errors import InvalidInputError
from ..policy import Policy
from ..predictors import Predictor, load

__all__ = ["TTAPredictor", "predict_files", "require_ray", "INSTALL_HINT"]

INSTALL_HINT = 'pip install "ttakit[ray]"'


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 (Ray Data, not only Ray core)
    except ImportError:
        raise InvalidInputError(f"Ray Data is not installed; {INSTALL_HINT}") from None
    return ray


def _policy(policy: str | os.PathLike | Policy) -> Policy:
    """A policy object, a registered name (``hflip``, ``d4``, ...) or a policy ``.json`` file."""
    if isinstance(policy, Policy):
        return policy
    text = os.fspath(policy)
    return Policy.load(text) if text.endswith(".json") or os.path.sep in text else get_policy(text)


def _images(array: np.ndarray, column: str) -> torch.Tensor:
    """``(B, H, W, C)`` or ``(B, H, W)`` uint8 (0..255) or float (0..1) -> ``(B, C, H, W)`` float
    in ``[0, 1]``, contiguous, as ``ttakit predict`` feeds the engine."""
    array = np.asarray(array)
    if array.dtype == object:  # a column of per-row arrays
        array = np.stack(list(array))
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise InvalidInputError(
            f"column {column!r} must hold images as (B, H, W, C) or (B, H, W) arrays, got shape {array.shape}"
        )
    # A fresh C-ordered NCHW copy (also writable: Ray hands read-only arrays). A permuted view
    # with C == 1 counts as contiguous yet has other strides, and the convolution then rounds
    # differently in the last bit than on the loader's batches.
    images = torch.from_numpy(np.array(array.transpose(0, 3, 1, 2), order="C"))
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise InvalidInputError(f"column {column!r} must hold uint8 (0-255) or float (0-1) pixels, got {array.dtype}")
    return images.float()


class TTAPredictor:
    """Merged TTA predictions for NumPy batches: a callable class for ``map_batches``.

    Args:
        model_source: anything :func:`ttakit.predictors.load` takes (a checkpoint folder, a model
            file, ``file.py:function``, an ``nn.Module``) or a :class:`~ttakit.predictors.Predictor`.
        policy: a :class:`~ttakit.policy.Policy`, a registered name or a policy ``.json`` file.
        image_column: the column holding the images (``(H, W, C)`` or ``(H, W)`` per row,
            uint8 0-255 or float 0-1).
        top_k: classes kept per row in ``top_k_classes`` / ``top_k_probs``.
        max_batch, device, amp: passed to :class:`~ttakit.engine.TTAEngine`.
        threads: torch threads in each worker (default: leave torch's setting).
        **predictor_options: options for :func:`ttakit.predictors.load` (``input_size``,
            ``channels``, ``outputs``, ``mean``, ``std``, ...).

    Returns (per call): every input column but the image column, and ``probs`` ``(B, classes)``
    float32, ``top_k_classes`` ``(B, k)`` class names, ``top_k_probs`` ``(B, k)``, ``entropy``,
    ``disagreement`` (share of views whose class differs from the merged one) and
    ``forward_passes`` ``(B,)``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> predict = TTAPredictor(model, "hflip", input_size=4, channels=1, outputs="logits", top_k=2)
        >>> out = predict({"image": np.zeros((5, 4, 4), np.uint8), "id": np.arange(5)})
        >>> out["probs"].shape, out["top_k_classes"].shape, out["id"].tolist()
        ((5, 3), (5, 2), [0, 1, 2, 3, 4])
    """

    def __init__(self, model_source: Any, policy: str | os.PathLike | Policy = "none", *, image_column: str = "image",
                 top_k: int = 5, max_batch: int = 256, device: str | None = None, amp: bool = False,
                 threads: int | None = None, **predictor_options: Any) -> None:
        if threads is not None:
            torch.set_num_threads(int(threads))
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
        self.predictor: Predictor = load(model_source, **predictor_options)
        self.policy = _policy(policy)
        if device is not None:
            self.predictor.to(device)
        self.engine = TTAEngine(self.predictor, self.policy, max_batch=max_batch, device=device, amp=amp)
        self.image_column = image_column
        self.top_k = top_k

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images`` ``(B, C, H, W)`` in ``[0, 1]`` -> ``(probs (B, classes), disagreement (B,),
        forward passes (B,))``, exactly as ``ttakit predict`` computes them."""
        result = self.engine.run(images, return_uncertainty=True)
        probs = result.merged.float().cpu()
        disagreement = result.uncertainty["disagreement"].float().cpu()
        gated = getattr(result, "gated", None)
        n_views = float(len(self.policy))
        passes = torch.full((probs.shape[0],), n_views) if gated is None else torch.where(gated.cpu(), n_views, 1.0)
        return probs, disagreement, passes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.image_column not in batch:
            raise InvalidInputError(
                f"the batch has no column {self.image_column!r} (image_column); it has {', '.join(batch)}"
            )
        probs, disagreement, passes = self.predict(_images(batch[self.image_column], self.image_column))
        return {**{k: v for k, v in batch.items() if k != self.image_column},
                **self._columns(probs, disagreement, passes)}

    def _columns(self, probs: torch.Tensor, disagreement: torch.Tensor, passes: torch.Tensor) -> dict[str, np.ndarray]:
        classes = self.predictor.classes or [str(c) for c in range(probs.shape[1])]
        k = min(self.top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=1) + 0.0
        return {
            "probs": probs.numpy(),
            # one string width for every batch: Arrow cannot join tensor columns of other widths
            "top_k_classes": np.asarray(classes, dtype=f"U{max(map(len, classes))}")[indices.numpy()],
            "top_k_probs": values.numpy(),
            "entropy": entropy.numpy(),
            "disagreement": disagreement.numpy(),
            "forward_passes": passes.numpy(),
        }


class _FilePredictor(TTAPredictor):
    """:class:`TTAPredictor` over rows of file paths (``index``, ``path``): each batch is decoded
    here; files that cannot be decoded come back with their ``error`` and zero probabilities."""

    def __init__(self, model_source: Any, policy: Any, *, channels: int, input_size: tuple[int, int], resize: str,
                 **options: Any) -> None:
        super().__init__(model_source, policy, **options)
        self.decode = (int(channels), (int(input_size[0]), int(input_size[1])), resize)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        channels, size, resize = self.decode
        good, arrays, errors = [], [], []
        for i, path in enumerate(batch["path"]):
            try:
                arrays.append(decode_image(str(path), channels, size, resize))
                good.append(i)
                errors.append("")
            except DecodeError as exc:
                errors.append(str(exc))
        n = len(batch["path"])
        probs = disagreement = passes = None
        if good:  # (B, H, W, C) uint8 -> (B, C, H, W) floats, as the one-process loader makes them
            images = _images(np.stack(arrays), "image")
            probs, disagreement, passes = self.predict(images)
        n_classes = probs.shape[1] if probs is not None else len(self.predictor.classes or [0])
        full = np.zeros((n, n_classes), np.float32)
        dis, pas = np.zeros(n, np.float32), np.zeros(n, np.float32)
        if good:
            full[good], dis[good], pas[good] = probs.numpy(), disagreement.numpy(), passes.numpy()
        return {"index": np.asarray(batch["index"], np.int64), "block": np.asarray(batch["block"], np.int64),
                "error": np.asarray(errors, dtype=object),
                "probs": full, "disagreement": dis, "forward_passes": pas}


def predict_files(model_source: Any, policy: Policy, files: Sequence[str], positions: Sequence[int], *,
                  batch_size: int, channels: int, input_size: tuple[int, int], resize: str, workers: int | None = None,
                  address: str | None = None, max_batch: int = 256, device: str | None = None, amp: bool = False,
                  predictor_options: dict[str, Any] | None = None
                  ) -> Iterator[tuple[list[int], torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                      None, list[tuple[int, str]]]]:
    """Predict ``files`` (at global ``positions`` of the input list) in Ray workers and yield each
    batch in input order: ``(rows, probs (n, C), disagreement (n,), passes (n,), None,
    [(row, reason)])`` (the ``None``: no hard-vote labels), ``rows`` indexing ``files``, ``None``
    tensors for a batch whose files all failed.

    Each Ray block is one block of ``batch_size`` files by global position (less the files
    already done), passed whole as one batch (``batch_size=None`` in ``map_batches``), so every
    image runs with the same other images as in one process. ``workers`` actors (default: the
    cluster's CPUs) run one torch thread each. ``address``: an existing cluster (``ray start
    --head`` prints it; ``auto`` finds a local one); default: start a local one, or use the one
    this process already joined.
    """
    ray = require_ray()
    import pandas as pd

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the caller shows its own progress
    ray.data.DataContext.get_current().enable_progress_bars = False
    frames, block = [], None
    for row, position in enumerate(positions):
        b = position // batch_size
        if b != block:
            frames.append({"index": [], "block": [], "path": []})
            block = b
        frames[-1]["index"].append(row)
        frames[-1]["block"].append(len(frames) - 1)
        frames[-1]["path"].append(str(files[row]))
    if not frames:
        return
    dataset = ray.data.from_pandas([pd.DataFrame(frame) for frame in frames])
    size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    out = dataset.map_batches(
        _FilePredictor, batch_size=None, compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1,
        fn_constructor_kwargs={"model_source": model_source, "policy": policy, "channels": channels,
                               "input_size": tuple(input_size), "resize": resize, "max_batch": max_batch,
                               "device": device, "amp": amp, "threads": 1, "top_k": 1, **(predictor_options or {})},
    )
    waiting: dict[int, dict[str, np.ndarray]] = {}
    following = 0
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for b in np.unique(batch["block"]):  # Ray may hand blocks back together or in any order
            waiting[int(b)] = {k: v[batch["block"] == b] for k, v in batch.items()}
        while following in waiting:
            yield _one_batch(waiting.pop(following))
            following += 1
    if waiting:
        raise InvalidInputError(f"Ray returned blocks {sorted(waiting)[:5]} but not block {following}")


def _one_batch(batch: dict[str, np.ndarray]) -> tuple[list[int], Any, Any, Any, None, list[tuple[int, str]]]:
    order = np.argsort(batch["index"], kind="stable")
    batch = {k: v[order] for k, v in batch.items()}
    ok = batch["error"] == ""
    rows = batch["index"][ok].tolist()
    failures = [(int(i), str(e)) for i, e in zip(batch["index"][~ok], batch["error"][~ok], strict=True)]
    if not rows:
        return rows, None, None, None, None, failures
    return (rows, torch.from_numpy(np.ascontiguousarray(batch["probs"][ok])),
            torch.from_numpy(np.ascontiguousarray(batch["disagreement"][ok])),
            torch.from_numpy(np.ascontiguousarray(batch["forward_passes"][ok])), None, failures)
