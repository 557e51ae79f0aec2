"""`EpochLoader`: mini-batches by indexing tensors that already sit on the device.

docs/original.md §4: shuffle the training set each epoch and take batches in order; the last
batch may be smaller. The permutation is a pure function of (seed, epoch) --
drawn by a generator on the tensors' device -- so a run resumed at epoch k sees
exactly the batches it would have seen (CPU and CUDA draw different permutations
from the same seed; a run keeps its device).

Several processes (DDP): every rank draws the same permutation and takes every
`world_size`-th index from position `rank`, like `DistributedSampler`. So that all
ranks run the same number of steps, the permutation is padded by repeating its
first indices up to a multiple of `world_size` (or, with drop_last, truncated).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from feedalign.preprocess.augmentation import augment as augment_batch
from feedalign.preprocess.augmentation import jitter_flip

_MIX = 1_000_003  # a prime: seed * _MIX + epoch keeps (seed, epoch) pairs apart


class EpochLoader:
    """Iterate (x, y) batches of `images` (N, ...) float and `labels` (N,) for one epoch.

    shuffle: a new permutation each epoch (set with `set_epoch`); else in order.
    augment: crop/flip/rescale each batch (docs/original.md §5) with a generator derived from
        (seed, epoch, rank).
    jitter, hflip: shift each image by up to `jitter` pixels and mirror it with p = 0.5
        (torchvision's RandomCrop(padding) and RandomHorizontalFlip), the uncovered border
        filled with each channel's smallest training value (the black of MNIST-like images).
    rank, world_size: this process's shard (see the module docstring).
    drop_last: drop the last, smaller batch (and truncate instead of pad the shards).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: bool = False,
        jitter: int = 0,
        hflip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
        if len(images) < world_size:
            raise ValueError(f"{len(images)} samples cannot be shared by {world_size} ranks")
        if labels.device != images.device:
            raise ValueError(f"images on {images.device} but labels on {labels.device}")
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle, self.seed, self.augment = shuffle, seed, augment
        self.jitter, self.hflip = jitter, hflip
        self.fill = images.amin(dim=(0, *range(2, images.dim()))) if jitter or hflip else None  # (C,)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def device(self) -> torch.device:
        return self.images.device

    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n, ws = len(self.images), self.world_size
        return n // ws if self.drop_last else -(-n // ws)

    def __len__(self) -> int:
        n, b = self.num_samples(), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _generator(self, offset: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(((self.seed * _MIX + self.epoch) * _MIX + offset) % 2**63)  # fits int64
        return g

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, (num_samples,) int64."""
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(0), device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        if self.world_size > 1:
            total = self.num_samples() * self.world_size
            if total > n:  # pad by wrapping around (total - n < world_size <= n)
                order = torch.cat([order, order[: total - n]])
            order = order[self.rank : total : self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices()
        gen = self._generator(1 + self.rank) if self.augment else None
        shifts = self._generator(1 + self.world_size + self.rank) if self.fill is not None else None
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            if gen is not None:
                x = augment_batch(x, gen)
            if shifts is not None:
                x = jitter_flip(x, shifts, pixels=self.jitter, flip=self.hflip, fill=self.fill)
            yield x, self.labels.index_select(0, idx)
