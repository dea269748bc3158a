"""Datasets for the reference experiments: Fashion-MNIST (found or downloaded) and sklearn digits.

Everything is loaded once into in-memory tensors (no PIL image per item), normalised to zero mean
and unit variance with the training-set statistics, shaped ``(N, 1, H, W)`` float32 with int64
labels. :class:`TensorBatches` iterates over such tensors in shuffled mini-batches without the
per-item indexing and collation of a ``DataLoader``.

Fashion-MNIST is looked for, in order, in

1. an explicit directory (``data_dir``): the four IDX files, gzipped or not, directly in it or in
   its ``FashionMNIST/raw`` sub-directory (torchvision's layout);
2. the Debian/Ubuntu package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
3. torchvision's download (``torchvision.datasets.FashionMNIST(download=True)``), cached under
   ``download_root``, for machines with internet access.

Reference: Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv:1708.07747 (2017).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "DEFAULT_DOWNLOAD_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "DatasetNotFoundError",
    "FashionMNISTSource",
    "TensorBatches",
    "find_fashion_mnist",
    "load_digits_datasets",
    "load_fashion_mnist",
    "read_idx",
    "subset",
]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

DEFAULT_DOWNLOAD_ROOT = Path(
    os.environ.get("TORCHSPARTAN_DATA", Path.home() / ".cache" / "torchspartan" / "data")
)
"""Where torchvision downloads Fashion-MNIST to (override with ``$TORCHSPARTAN_DATA``)."""

FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The four IDX files of Fashion-MNIST (the same names as MNIST's), without ``.gz``."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_IDX_DTYPES: dict[int, torch.dtype] = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset is in none of the places looked at; the message says how to get it."""


@dataclass(frozen=True)
class FashionMNISTSource:
    """Where Fashion-MNIST was found.

    Attributes:
        kind: ``"directory"`` (explicit ``data_dir``), ``"debian"`` (the Debian package) or
            ``"torchvision"`` (downloaded or already cached by torchvision).
        files: the path of each of the four IDX files, keyed like :data:`FASHION_MNIST_FILES`.
    """

    kind: Literal["directory", "debian", "torchvision"]
    files: dict[str, Path]

    @property
    def location(self) -> Path:
        """The directory holding the files."""
        return self.files["train_images"].parent


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (the MNIST format), gzipped (``.gz``) or raw, into a tensor.

    The format is a 4-byte magic number ``0x0000TTNN`` (``TT`` the element type, ``NN`` the
    number of dimensions), ``NN`` big-endian int32 sizes, then the data, big-endian.

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
        A tensor of the stored shape and dtype (``uint8`` for Fashion-MNIST).

    Raises:
        ValueError: if the header is not an IDX header or the data size does not match it.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
        >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(p).tolist()
        [7, 8, 9]
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: its first bytes are {raw[:4].hex()!r}, expected "
            "00 00 <type> <ndim> with type one of 08 09 0b 0c 0d 0e; check that the file is "
            "one of the four Fashion-MNIST files and was fully downloaded"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = header + itemsize * int(torch.tensor(shape, dtype=torch.int64).prod())
    if len(raw) != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: its header says shape {shape} ({expected} bytes "
            f"in all) but the file has {len(raw)} bytes; delete it and get it again"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    if itemsize > 1:  # IDX is big-endian; reverse each item's bytes on little-endian hosts
        data = data.view(-1, itemsize).flip(1).contiguous().view(-1)
    return data.view(dtype).reshape(shape)


def _files_in(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` (``.gz`` preferred), or None if any is missing."""
    found: dict[str, Path] = {}
    for key, stem in FASHION_MNIST_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _files_under(directory: Path) -> dict[str, Path] | None:
    """The IDX files in ``directory`` itself or in its torchvision layout ``FashionMNIST/raw``."""
    return _files_in(directory) or _files_in(directory / "FashionMNIST" / "raw")


def _not_found_message(data_dir: Path | None, download_root: Path, download_error: str) -> str:
    names = ", ".join(f"{stem}[.gz]" for stem in FASHION_MNIST_FILES.values())
    explicit = (
        f"not found in --data-dir {data_dir} (nor in {data_dir / 'FashionMNIST' / 'raw'})"
        if data_dir is not None
        else "no directory given"
    )
    return (
        "Fashion-MNIST was not found. Three ways to provide it:\n"
        f"  1. an explicit directory (--data-dir DIR / data_dir=DIR) holding the four IDX files "
        f"{names}, or torchvision's DIR/FashionMNIST/raw layout: {explicit};\n"
        "  2. the Debian/Ubuntu package: `sudo apt-get install dataset-fashion-mnist` installs "
        f"them in {DEBIAN_FASHION_MNIST_DIR}: not found there;\n"
        "  3. torchvision's download (needs internet), "
        f"torchvision.datasets.FashionMNIST(root='{download_root}', download=True): "
        f"{download_error}.\n"
        "Files can also be fetched by hand from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)."
    )


def find_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download_root: str | os.PathLike[str] = DEFAULT_DOWNLOAD_ROOT,
    download: bool = True,
    debian_dir: str | os.PathLike[str] = DEBIAN_FASHION_MNIST_DIR,
) -> FashionMNISTSource:
    """Find the Fashion-MNIST IDX files: explicit directory, else Debian package, else download.

    Args:
        data_dir: a directory with the four IDX files (gzipped or raw), or with torchvision's
            ``FashionMNIST/raw`` sub-directory. When given, it is the only place looked at, so a
            typo is reported instead of silently using another copy.
        download_root: where torchvision stores (and first looks for) its copy.
        download: allow torchvision to download when no local copy exists.
        debian_dir: where the Debian package installs the files (a parameter for tests).

    Returns:
        A :class:`FashionMNISTSource` naming the four files.

    Raises:
        DatasetNotFoundError: if the files are in none of the places; the message names all three
            options and how to get each.
    """
    download_root = Path(download_root).expanduser()
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        files = _files_under(data_dir)
        if files is None:
            raise DatasetNotFoundError(
                _not_found_message(data_dir, download_root, "not tried, since --data-dir was given")
            )
        return FashionMNISTSource("directory", files)

    files = _files_in(Path(debian_dir))
    if files is not None:
        return FashionMNISTSource("debian", files)

    files = _files_under(download_root)
    if files is not None:
        return FashionMNISTSource("torchvision", files)
    if not download:
        raise DatasetNotFoundError(
            _not_found_message(None, download_root, "not tried, since download=False")
        )
    try:
        from torchvision import datasets

        for train in (True, False):
            datasets.FashionMNIST(str(download_root), train=train, download=True)
    except Exception as exc:  # no torchvision, no network, a proxy...: all mean "not available"
        raise DatasetNotFoundError(
            _not_found_message(None, download_root, f"failed with {type(exc).__name__}: {exc}")
        ) from exc
    files = _files_under(download_root)
    if files is None:  # torchvision changed its layout
        raise DatasetNotFoundError(
            _not_found_message(
                None,
                download_root,
                "the download finished but the IDX files are not in the "
                "expected FashionMNIST/raw directory",
            )
        )
    return FashionMNISTSource("torchvision", files)


def _images_to_float(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return ((images.to(torch.float32) / 255.0 - mean) / std).unsqueeze(1).contiguous()


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download_root: str | os.PathLike[str] = DEFAULT_DOWNLOAD_ROOT,
    download: bool = True,
) -> tuple[TensorDataset, TensorDataset, FashionMNISTSource]:
    """Load Fashion-MNIST into normalised in-memory tensors.

    Pixels ``x`` in ``0..255`` become ``(x / 255 - mean) / std`` with the training set's mean and
    standard deviation (about 0.286 and 0.353).

    Args:
        data_dir, download_root, download: as in :func:`find_fashion_mnist`.

    Returns:
        ``(train, test, source)``: ``train`` holds images ``(60000, 1, 28, 28)`` float32 and
        labels ``(60000,)`` int64, ``test`` the same with 10000 items, ``source`` where the files
        were found.

    Raises:
        DatasetNotFoundError: see :func:`find_fashion_mnist`.
        ValueError: if a file is not a valid IDX file or images and labels disagree in count.
    """
    source = find_fashion_mnist(data_dir, download_root=download_root, download=download)
    tensors = {key: read_idx(path) for key, path in source.files.items()}
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Fashion-MNIST {split} files disagree: images of shape {tuple(images.shape)} and "
                f"labels of shape {tuple(labels.shape)} (expected (N, H, W) and (N,)); check "
                f"{source.files[f'{split}_images']} and {source.files[f'{split}_labels']}"
            )
    train_pixels = tensors["train_images"].to(torch.float32) / 255.0
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    train = TensorDataset(
        _images_to_float(tensors["train_images"], mean, std), tensors["train_labels"].long()
    )
    test = TensorDataset(
        _images_to_float(tensors["test_images"], mean, std), tensors["test_labels"].long()
    )
    return train, test, source


def load_digits_datasets(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Load scikit-learn's 8x8 handwritten digits (1797 images, bundled, no download).

    A tiny second dataset for fast tests of the training code.

    Args:
        test_fraction: fraction of the images held out for the test split, in ``(0, 1)``.
        seed: seed of the (stratified) split.

    Returns:
        ``(train, test)`` with images ``(N, 1, 8, 8)`` float32 normalised with the training
        split's statistics, and labels ``(N,)`` int64 in ``0..9``.

    Raises:
        ValueError: if ``test_fraction`` is not in ``(0, 1)``.
        ImportError: if scikit-learn is not installed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be in (0, 1), got {test_fraction}; e.g. 0.25 holds out a quarter"
        )
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "load_digits_datasets needs scikit-learn: pip install scikit-learn "
            "(or pip install -e '.[reference]')"
        ) from exc
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images,
        digits.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    train_x = torch.as_tensor(x_train, dtype=torch.float32) / 16.0
    mean, std = float(train_x.mean()), float(train_x.std())

    def to_tensors(x: object, y: object) -> TensorDataset:
        images = (torch.as_tensor(x, dtype=torch.float32) / 16.0 - mean) / std
        return TensorDataset(images.unsqueeze(1).contiguous(), torch.as_tensor(y).long())

    return to_tensors(x_train, y_train), to_tensors(x_test, y_test)


def subset(dataset: TensorDataset, size: int | None, seed: int = 0) -> TensorDataset:
    """A random subset of ``size`` items (the same for the same seed), or ``dataset`` if None.

    Raises:
        ValueError: if ``size`` is not in ``1..len(dataset)``.
    """
    n = len(dataset)
    if size is None or size == n:
        return dataset
    if not 1 <= size <= n:
        raise ValueError(f"subset size must be in 1..{n}, got {size}; pass None for all items")
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return TensorDataset(*(t[index] for t in dataset.tensors))


class TensorBatches:
    """Shuffled mini-batches over in-memory tensors (a fast stand-in for a ``DataLoader``).

    Each epoch draws a new permutation from its own generator, so two instances with the same
    seed yield the same batches. Optional augmentation: a random horizontal flip per image and
    a random translation by up to ``shift`` pixels (zero padding), one per batch.

    Args:
        dataset: a :class:`~torch.utils.data.TensorDataset` of ``(images, labels)``.
        batch_size: items per batch (>= 1).
        shuffle: draw a new order every epoch (else the stored order).
        drop_last: skip the last incomplete batch.
        seed: seed of the shuffling and augmentation generator.
        flip: randomly mirror images left-right.
        shift: maximum translation in pixels (0 for none).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(10, 1, 4, 4), torch.arange(10))
        >>> [len(y) for _, y in TensorBatches(data, batch_size=4)]
        [4, 4, 2]
    """

    def __init__(
        self,
        dataset: TensorDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        flip: bool = False,
        shift: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {shift}; use 0 for no translation")
        self.images, self.labels = dataset.tensors[0], dataset.tensors[1]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.flip = flip
        self.shift = shift
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            mirrored = torch.rand(x.shape[0], generator=self.generator) < 0.5
            x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
        if self.shift > 0:
            s = self.shift
            padded = torch.nn.functional.pad(x, (s, s, s, s))
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=self.generator).tolist()
            # One translation per batch keeps this a cheap slice; batches differ.
            x = padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            index = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            if order is not None:
                x, y = self.images[order[index]], self.labels[order[index]]
            else:
                x, y = self.images[index], self.labels[index]
            if self.flip or self.shift:
                x = self._augment(x)
            yield x, y
