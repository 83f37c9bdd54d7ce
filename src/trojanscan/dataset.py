"""The in-memory data set every command and detector works on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .exceptions import DataError

#: Largest class index a label may hold (2^24 - 1): per-class arrays of more classes would
#: not fit in memory, so a larger label is a data error, not a class.
MAX_CLASS_INDEX = (1 << 24) - 1


@dataclass(frozen=True)
class ImageDataset:
    """Images as float32 ``N×C×H×W`` in ``[0, 1]`` with optional integer labels.

    ``x`` and ``y`` live on the CPU; detectors move mini-batches to their device.
    ``source`` names where the data came from (path or built-in name), ``format`` the
    loader that read it and ``sha256`` the hash of the input file(s) for the report.
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    source: str = "<memory>"
    format: str = "memory"
    sha256: str | None = None
    class_names: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 4:
            raise DataError(
                f"{self.source}: x must be a float32 tensor of shape N×C×H×W, got "
                f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
            )
        if x.shape[0] == 0:
            raise DataError(f"{self.source}: the data set is empty")
        if y is not None:
            if y.dim() != 1 or y.dtype != torch.int64:
                raise DataError(f"{self.source}: y must be an int64 vector, got {y.dtype} "
                                f"{tuple(y.shape)}")
            if y.shape[0] != x.shape[0]:
                raise DataError(
                    f"{self.source}: x has {x.shape[0]} samples but y has {y.shape[0]} labels"
                )
            if y.numel() and int(y.min()) < 0:
                raise DataError(f"{self.source}: labels must be >= 0, got {int(y.min())}")
            if y.numel() and int(y.max()) > MAX_CLASS_INDEX:
                raise DataError(f"{self.source}: label {int(y.max())} is out of range: class "
                                f"indices must be integers from 0 to {MAX_CLASS_INDEX}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Number of classes: max label + 1, or the number of class names if larger."""
        if self.y is None:
            raise DataError(f"{self.source}: labels are needed but the data has none")
        return max(int(self.y.max()) + 1, len(self.class_names or ()))

    def labels(self) -> torch.Tensor:
        """The labels, or a :class:`DataError` saying they are needed."""
        if self.y is None:
            raise DataError(f"{self.source}: labels (y) are needed but the data has none")
        return self.y

    def require_classes(self, minimum: int = 2) -> None:
        """Raise unless the labels cover at least ``minimum`` distinct classes."""
        n = int(torch.unique(self.labels()).numel())
        if n < minimum:
            raise DataError(
                f"{self.source}: needs samples of at least {minimum} classes, found {n}"
            )

    def subset(self, index: torch.Tensor | np.ndarray | slice) -> ImageDataset:
        """A new data set with the selected samples (same source/format metadata)."""
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        y = None if self.y is None else self.y[index]
        return ImageDataset(self.x[index], y, self.source, self.format, self.sha256,
                            self.class_names)

    def with_data(self, x: torch.Tensor, y: torch.Tensor | None) -> ImageDataset:
        """A data set with new tensors and this one's metadata."""
        return ImageDataset(x, y, self.source, self.format, self.sha256, self.class_names)
