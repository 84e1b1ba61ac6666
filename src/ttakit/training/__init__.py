"""Training: the config, train-time augmentations, schedules, transfer learning, progressive
resizing, the loop (:func:`train_model`) and the learning-rate range test (:func:`lr_find`).

=============  ================================================================================
``config``     :class:`TrainConfig`, validated when built
``augment``    train-time augmentations on a batch (flip, shift, crop, mixup)
``schedules``  learning-rate schedules, discriminative rates, the optimizer
``transfer``   weights from a file into a model; freezing
``resize``     a data set fitted to a training size; progressive resizing stages
``build``      the model a run trains and its autocast context
``loop``       :func:`train_model`, one straight-line loop, and its eval helpers
``lr_find``    the learning-rate range test
``dense``      U-Net and detector on canvases (train_segmentation, train_detection)
=============  ================================================================================
"""

from .augment import augment_batch, mixup, random_crop, random_flip, random_shift, translate
from .build import autocast, build_model
from .config import AUGMENTATIONS, SCHEDULES, TrainConfig
from .dense import (
    DenseTrainConfig,
    DenseTrainResult,
    predict_dense,
    train_detection,
    train_segmentation,
)
from .loop import TrainResult, accuracy_of, predict_logits, train_model
from .lr_find import LRFindResult, centred_average, lr_find, suggest_rates
from .resize import LARGE_SIDE, fit_image_size, resize_images
from .schedules import schedule_factor, slice_rates
from .transfer import InitReport, init_classes, load_init_weights, read_state_dict

__all__ = [
    "AUGMENTATIONS", "SCHEDULES", "LARGE_SIDE", "TrainConfig", "TrainResult", "InitReport", "LRFindResult",
    "augment_batch", "mixup", "random_crop", "random_flip", "random_shift", "translate", "autocast",
    "build_model", "accuracy_of", "predict_logits", "train_model", "centred_average", "lr_find",
    "suggest_rates", "fit_image_size", "resize_images", "schedule_factor", "slice_rates", "init_classes",
    "load_init_weights", "read_state_dict", "DenseTrainConfig", "DenseTrainResult", "predict_dense",
    "train_detection", "train_segmentation",
]
