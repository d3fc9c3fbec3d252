"""Checks that run in the driver before Ray starts: the data folder (an image folder is listed
here, once, into the index its workers read), the model, the storage and the run it resumes."""

from __future__ import annotations

import dataclasses
import errno
import getpass
import json
import os
import re
import tempfile
from typing import Any

import torch
from torch import nn

from raydeq import models
from raydeq.deq import initial_state
from raydeq.training import data
from raydeq.training.checkpoint import final_report, newest_first, read_manifest
from raydeq.training.config import (
    FORMER_LAMBDA_SKIP,
    NO_SKIP_LOSS,
    Config,
    ConfigError,
    check_settings,
    default_name,
    former_names,
    model_error,
)
from raydeq.training.console import first_line
from raydeq.training.storage import (
    CHECKPOINT_PREFIX,
    StorageError,
    check_storage,
    exists,
    filesystem,
    read_text,
    subfolders,
)

# The variable that names torch's compile cache folder.
CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"
# Ray Train's record of a run's checkpoints, in the run's folder (its
# CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, named here: the preflight imports no Ray).
RAY_RECORD = "checkpoint_manager_snapshot.json"


def check_model(cfg: Config, classes: int | None = None) -> None:
    """Build the model, check that it predicts the dataset's `classes` (where known) and pass
    one blank image through its stem, f and head, or raise a ConfigError."""
    try:
        model = models.build(cfg.model_options())
    except (TypeError, ValueError) as err:
        raise model_error(err) from None
    outputs = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1].out_features
    if classes is not None and outputs < classes:
        fix = (
            f"set data.fake_classes to at most {outputs}"
            if cfg.data.dataset == "fake"
            else "choose a model of as many classes"
        )
        raise ConfigError(
            f"model: {cfg.model.model!r} predicts {outputs} classes, fewer than the {classes} "
            f"of dataset {cfg.data.dataset!r}, whose labels past {outputs - 1} it cannot score; "
            f"{fix}"
        )
    shape = data.image_shape(cfg.data)
    try:
        with torch.no_grad():
            blank_pass(model, torch.zeros(1, *shape))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"model: {cfg.model.model!r} does not fit {cfg.data.dataset!r} images of shape "
            f"{shape}: {first_line(err)}"
        ) from None


def blank_pass(model: nn.Module, images: torch.Tensor) -> None:
    """Run a training-mode model's stem, its layer's f and skip predictor at the zero state,
    and its head, without a solve: a scale too small for a group norm fails here, not at the
    first step (and not only for a batch of 1)."""
    x = model.stem(images)
    layer = model.layer
    z = initial_state(layer.f, x)
    if getattr(layer, "skip", None) is not None:
        layer.skip(x)
    model.head(layer.f(z, x))


def compile_cache_dir() -> str:
    """torch's compile cache folder, named as torch._inductor names it (importing that module
    imports torch._dynamo, which makes the folder or fails)."""
    given = os.environ.get(CACHE_VARIABLE)
    if given is not None:
        return os.path.abspath(given)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    name = "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)
    return os.path.join(tempfile.gettempdir(), name)


def check_compile_cache() -> None:
    """Raise a ConfigError where torch cannot make or write its compile cache folder
    (TORCHINDUCTOR_CACHE_DIR, else torchinductor_USER in the temporary folder): importing
    torch._dynamo, which every solve does, makes it, so each worker of the run failed after Ray
    started, in a PermissionError naming the folder alone; or where another user owns it (made
    first in a shared temporary folder): torch loads compiled code and pickles from it."""
    folder = compile_cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)
    except OSError as err:
        raise ConfigError(
            f"torch cannot make or write its compile cache folder {folder} ({err.strerror}); "
            f"set {CACHE_VARIABLE} to a folder you can write"
        ) from None
    owner = os.lstat(folder).st_uid
    if owner != os.getuid():
        raise ConfigError(
            f"torch's compile cache folder {folder} is not this user's (owner uid {owner}), "
            "whose owner can put code there that a compiled solve runs; remove it, or set "
            f"{CACHE_VARIABLE} to a folder of your own"
        )


def check_run(
    cfg: Config, storage: bool = True, preset_lambda_skip: bool = True
) -> dict[str, Any] | None:
    """Check the data folder (and index an image folder), the batch against the training set,
    the model and (with `storage`) the run it resumes and the storage before Ray starts;
    returns the last report of a run that had finished (`finished_before`), whose storage
    is not checked for writing: nothing would be written (an archived, read-only folder). A
    storage that cannot be read is a StorageError, named as check_storage names it;
    `preset_lambda_skip` says whether the config left train.lambda_skip to the preset."""
    data.check_files(cfg.data)
    samples = data.train_samples(cfg.data)
    if samples is not None:
        data.check_batch(cfg.data, samples)
    classes = data.dataset_classes(cfg.data)
    if cfg.data.dataset == "imagenet":
        from raydeq.training.folders import load_index  # torchvision: for image folders only

        index = load_index(cfg.data.data_dir)
        data.check_batch(cfg.data, len(index.files["train"]))
        classes = len(index.classes)
    check_model(cfg, classes)
    check_compile_cache()
    if not storage:
        return None
    try:
        check_resume(cfg, preset_lambda_skip)
        last = finished_before(cfg)
        if last is None:
            check_ray_record(cfg.run_dir)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:  # pyarrow's, for a storage it cannot read
        check_storage(cfg.storage_path)  # names a URI it cannot parse or a storage unreached
        reason = first_line(err)
        raise StorageError(f"storage_path {cfg.storage_path} cannot be read: {reason}") from None
    if last is None:
        check_storage(cfg.storage_path)
    return last


def check_ray_record(run_dir: str) -> None:
    """Raise a StorageError where Ray Train's record of the run's checkpoints (RAY_RECORD) names
    a checkpoint folder that is gone (deleted by hand) or cannot be read (cut short by a full
    disk): Ray Train's controller refused to start on it at every run of the command, in a
    traceback that said to delete the run's folder. raydeq resumes from the checkpoint folders
    themselves, so the record alone is to be deleted."""
    path = f"{run_dir}/{RAY_RECORD}"
    if not exists(path):
        return
    fix = "delete it, and the run resumes from the checkpoints in its folder"
    try:
        results = json.loads(read_text(path))["checkpoint_results"]
        names = [str(result["checkpoint_dir_name"]) for result in results]
    except (ValueError, KeyError, TypeError) as err:
        reason = f"{type(err).__name__}: {first_line(err)}"
        raise StorageError(
            f"{path}, Ray Train's record of the run's checkpoints, cannot be read ({reason}); {fix}"
        ) from None
    gone = [name for name in names if not exists(f"{run_dir}/{name}")]
    if gone:
        raise StorageError(
            f"{path}, Ray Train's record of the run's checkpoints, names {', '.join(gone)}, "
            f"which {'is' if len(gone) == 1 else 'are'} not there; {fix}"
        )


def newest_manifest(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint folder of a run whose manifest reads, with that manifest: the one
    whose settings a resume must match; None without one."""
    fs = filesystem(run_dir)[0]
    for path in newest_first(fs, subfolders(run_dir, CHECKPOINT_PREFIX)):
        try:
            manifest = read_manifest(fs, path)
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict):
            return path, manifest
    return None


def as_begun(cfg: Config, folders: list[str]) -> Config:
    """`cfg` at a former lambda_skip of its preset (FORMER_LAMBDA_SKIP) where it takes the
    preset's and the newest checkpoint in the first of `folders` that holds one was trained at
    that former default: a trial started before a change of the default resumes, and is
    reported, as it began, not refused as one of other settings."""
    formers = FORMER_LAMBDA_SKIP.get(cfg.model.model)
    if (
        formers is None
        or cfg.model.variant in NO_SKIP_LOSS
        or cfg.train.lambda_skip != models.PRESETS[cfg.model.model].lambda_skip
    ):
        return cfg
    newest = next((m for m in map(newest_manifest, folders) if m is not None), (None, {}))
    settings = newest[1].get("settings")
    train = settings.get("train") if isinstance(settings, dict) else None
    began = train.get("lambda_skip") if isinstance(train, dict) else None
    if began not in [value for value, _ in formers]:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lambda_skip=began))


def finished_before(cfg: Config) -> dict[str, Any] | None:
    """The last step's report where the run's newest checkpoint, one that records the run's
    settings (`check_resume` compared them), is whole and holds it: run again, the run would
    only evaluate and store that step once more; None otherwise (a checkpoint that records
    no settings may be another length's last)."""
    newest = newest_manifest(cfg.run_dir)
    if newest is None or not isinstance(newest[1].get("settings"), dict):
        return None
    return final_report(filesystem(cfg.run_dir)[0], newest[0])


def check_resume(cfg: Config, preset_lambda_skip: bool = True) -> None:
    """Raise a ConfigError where the run's folder holds checkpoints of other settings: a name=
    given again with, say, more epochs would go on from them under the old schedule (a
    checkpoint written before checkpoints recorded their settings is not checked); or where
    it holds none and the run of these settings is stored under its former name (the former
    default lambda_skip's only where `preset_lambda_skip`: the config left it to the preset)."""
    newest = newest_manifest(cfg.run_dir)
    if newest is not None:
        check_settings(cfg.run_dir, newest[1].get("settings"), cfg)
    elif cfg.name == default_name(cfg) and not subfolders(cfg.run_dir, CHECKPOINT_PREFIX):
        check_former_names(cfg, preset_lambda_skip)


def check_former_names(cfg: Config, preset_lambda_skip: bool = True) -> None:
    """Raise a ConfigError where the storage holds checkpoints of a run of `cfg`'s settings
    under a name that raydeq gave it before (`config.former_names`): the same command after an
    update started that run anew under its new name, as if never run."""
    former = former_names(cfg, preset_lambda_skip)
    prefix = cfg.name.rsplit("-", 1)[0] + "-"
    for path in subfolders(cfg.storage_path, prefix):
        name = path.rsplit("/", 1)[-1]
        folder = os.path.join(cfg.storage_path, name)
        if name in former and subfolders(folder, CHECKPOINT_PREFIX):
            taken, fix = former[name]
            raise ConfigError(
                f"{folder}: holds the run of these settings {taken}, where this run is named "
                f"{cfg.name}; resume it with {fix}, or give this run another name= to start anew"
            )
