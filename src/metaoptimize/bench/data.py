"""Offline data sets and readers for real data in a user-supplied folder.

scikit-learn's digits, a byte corpus from Python's own files, and readers for CIFAR-10 (python
pickle batches) and TinyStories (llama2.c pretokenised ``.bin`` shards).

Nothing here downloads anything. Real data sets are read from a directory the user supplies;
a missing directory or file raises :class:`DataError` with what was expected.
"""

from __future__ import annotations

import pickle
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DataError", "byte_corpus", "digits", "read_cifar10", "read_token_shards"]


class DataError(RuntimeError):
    """A data set could not be found or read."""


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], with a fixed stratified split.

    Returns:
        ``(x_train, y_train, x_test, y_test)`` with 1347 training and 450 test images.
    """
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
        from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise DataError(
            "the digits tasks need scikit-learn: pip install 'metaoptimize[bench]'"
        ) from error
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


# Text that ships with every CPython: the documentation topics and a few long stdlib modules.
_CORPUS_FILES = (
    "pydoc_data/topics.py",
    "argparse.py",
    "typing.py",
    "inspect.py",
    "textwrap.py",
    "this.py",
)


def byte_corpus(max_bytes: int = 2_000_000) -> bytes:
    """A deterministic byte-level corpus assembled from files in Python's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for name in _CORPUS_FILES:
        path = stdlib / name
        if path.is_file():
            chunks.append(path.read_bytes())
    corpus = b"\n".join(chunks)[:max_bytes]
    if len(corpus) < 100_000:
        raise DataError(
            f"could not assemble a text corpus from {stdlib} (found {len(corpus)} bytes)"
        )
    return corpus


def cifar10_paths(data_dir: str | Path) -> tuple[list[Path], Path]:
    """The CIFAR-10 batch files under ``data_dir`` (the batches folder or its parent).

    Raises:
        DataError: the folder or a batch file is missing.
    """
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DataError(
            f"CIFAR-10: {root} is not a directory; pass --data-dir pointing at "
            "'cifar-10-batches-py' (python version of the data set)"
        )
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not train_files or not test_file.is_file():
        raise DataError(f"CIFAR-10: expected data_batch_1..5 and test_batch in {root}")
    return train_files, test_file


def read_cifar10(data_dir: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read the CIFAR-10 python batches (``data_batch_1..5`` and ``test_batch``).

    ``data_dir`` may be the ``cifar-10-batches-py`` folder itself or its parent.

    Returns:
        ``(x_train, y_train, x_test, y_test)``; images are float32 in [0, 1], shape (N, 3, 32, 32).

    Raises:
        DataError: the folder or a batch file is missing or malformed.
    """
    train_files, test_file = cifar10_paths(data_dir)

    def load(path: Path) -> tuple[Tensor, Tensor]:
        try:
            with path.open("rb") as handle:
                batch = _BatchUnpickler(handle, encoding="bytes").load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise DataError(f"CIFAR-10: cannot read {path}: {error}") from error
        return _cifar_batch(path, batch)

    parts = [load(path) for path in train_files]
    x_test, y_test = load(test_file)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), x_test, y_test


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR-10 batch holds.

    Dicts, lists, ints, bytes and numpy arrays; any other global (``os.system``,
    ``builtins.eval``, ...) is refused, so a crafted file cannot run code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes written by Python 3 at protocol 2
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_batch(path: Path, batch: object) -> tuple[Tensor, Tensor]:
    """Images and labels of one unpickled batch, or a DataError naming the file."""
    import numpy as np  # the batches hold numpy arrays; numpy comes with the bench extra

    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10: {path} is not a batch dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if isinstance(data, (bytes, bytearray)):
        images = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    elif isinstance(data, np.ndarray) and data.dtype == np.uint8:
        images = torch.from_numpy(np.ascontiguousarray(data)).flatten()
    else:
        raise DataError(f"CIFAR-10: {path}: b'data' is not uint8 image data")
    if images.numel() == 0 or images.numel() % 3072:
        raise DataError(
            f"CIFAR-10: {path}: b'data' has {images.numel()} bytes, not a multiple of "
            "3072 (3x32x32 images)"
        )
    count = images.numel() // 3072
    if not (
        isinstance(labels, list)
        and len(labels) == count
        and all(isinstance(v, int) and 0 <= v < 10 for v in labels)
    ):
        raise DataError(f"CIFAR-10: {path}: b'labels' must be {count} ints in 0..9")
    return images.reshape(count, 3, 32, 32).float() / 255.0, torch.tensor(labels)


def token_shard_paths(data_dir: str | Path) -> list[Path]:
    """The ``.bin`` shards under ``data_dir``, sorted by name.

    Raises:
        DataError: the folder is missing or holds no shards.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"TinyStories: {root} is not a directory; pass --data-dir with the "
            "pretokenised .bin shards (llama2.c format)"
        )
    shards = sorted(root.glob("*.bin"))
    if not shards:
        raise DataError(f"TinyStories: no .bin shards in {root}")
    return shards


def read_token_shards(data_dir: str | Path, min_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """Read llama2.c-style pretokenised shards (``*.bin``, little-endian uint16 tokens).

    As in llama2.c, the first shard (sorted by name) is the validation split and the others are
    training data; with a single shard its last 10% is held out.

    Args:
        data_dir: the folder with the shards.
        min_tokens: the fewest tokens each split may have (a context plus its target).

    Returns:
        ``(train_tokens, val_tokens)`` as int64 tensors.

    Raises:
        DataError: the folder has no ``.bin`` shards, a shard is malformed, or a split is
            shorter than ``min_tokens``.
    """
    shards = token_shard_paths(data_dir)

    def load(path: Path) -> Tensor:
        raw = path.read_bytes()
        if len(raw) % 2:
            raise DataError(f"TinyStories: {path} has an odd number of bytes; expected uint16")
        if len(raw) // 2 < min_tokens:
            raise DataError(
                f"TinyStories: {path} holds {len(raw) // 2} tokens; need at least {min_tokens}"
            )
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.int64)
        return tokens & 0xFFFF  # reinterpret as unsigned 16-bit

    if len(shards) == 1:
        tokens = load(shards[0])
        split = int(len(tokens) * 0.9)
        if min(split, len(tokens) - split) < min_tokens:
            raise DataError(
                f"TinyStories: {shards[0]} holds {len(tokens)} tokens; its 90/10 split needs "
                f"at least {min_tokens} in each part"
            )
        return tokens[:split], tokens[split:]
    return torch.cat([load(p) for p in shards[1:]]), load(shards[0])
