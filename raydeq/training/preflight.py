"""Checks that run in the driver before Ray starts: the data folder (an image folder is listed
here, once, into the index its workers read), the model, the storage."""

from __future__ import annotations

import torch

from raydeq import models
from raydeq.training import data
from raydeq.training.config import Config, ConfigError
from raydeq.training.storage import check_storage


def check_model(cfg: Config) -> None:
    """Build the model and pass one blank image through its stem, or raise a ConfigError."""
    try:
        model = models.build(cfg.model_options())
    except ValueError as err:
        raise ConfigError(f"model: {str(err).splitlines()[0]}") from None
    shape = data.image_shape(cfg.data)
    try:
        with torch.no_grad():
            model.stem(torch.zeros(1, *shape))
    except RuntimeError as err:
        raise ConfigError(
            f"model: {cfg.model.model!r} does not fit {cfg.data.dataset!r} images of shape "
            f"{shape}: {str(err).splitlines()[0]}"
        ) from None


def check_run(cfg: Config, storage: bool = True) -> None:
    """Check the data folder (and index an image folder), the batch against the training set,
    the model and (with `storage`) the storage before Ray starts."""
    data.check_files(cfg.data)
    samples = data.train_samples(cfg.data)
    if samples is not None:
        data.check_batch(cfg.data, samples)
    if cfg.data.dataset == "imagenet":
        from raydeq.training.folders import load_index  # torchvision: for image folders only

        data.check_batch(cfg.data, len(load_index(cfg.data.data_dir).files["train"]))
    check_model(cfg)
    if storage:
        check_storage(cfg.storage_path)
