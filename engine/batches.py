"""Micro-batches indexed by one global counter, so a resumed run continues mid-epoch exactly."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from core.errors import InputError


def collate_items(m: int, items: list):
    """The default `collate` of ResumableBatches: MONAI's list_data_collate; `m` is not needed."""
    from monai.data import list_data_collate
    return list_data_collate(items)


class _StepItems(torch.utils.data.Dataset):
    """Item j of the remaining (epoch, index) order, tagged with the micro-batch counter it belongs to.

    The item's epoch is set on the dataset right before it is read (in whichever worker reads it), so
    one loader can run across epochs: its workers start once per span of epochs, not once per epoch.
    """

    def __init__(self, dataset, order: list[tuple[int, int]], batch_size: int, first: int):
        self.dataset, self.order, self.batch_size, self.first = dataset, order, batch_size, first

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int):
        epoch, index = self.order[j]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.first + j // self.batch_size, self.dataset[index]


class _StepCollate:
    """Collates a tagged micro-batch into (m, collate(m, items)); runs in the loader's workers."""

    def __init__(self, collate: Callable[[int, list], Any]):
        self.collate = collate

    def __call__(self, tagged: list) -> tuple[int, Any]:
        m = tagged[0][0]
        return m, self.collate(m, [item for _, item in tagged])


class ResumableBatches:
    """Micro-batches indexed by a global counter, so a resumed run continues mid-epoch exactly.

    Batch `m` is batch `m % per_epoch` of epoch `m // per_epoch`, with the sampler's order and the
    dataset's augmentation both seeded by the epoch. Nothing before the resume point is loaded.
    `collate(m, items)` makes a micro-batch from its items in the loader's workers (default: MONAI's
    list_data_collate); it is told `m`, so what it draws can be seeded per micro-batch, never from
    worker state, and is the same for any number of workers.

    `pin_memory` (default: whether CUDA is there) puts every batch in page-locked memory, so the step's
    `.to(device, non_blocking=True)` copies it to the GPU asynchronously; the batches are the same either way.
    """

    LOADER_SPAN = 512  # micro-batches per loader (rounded up to whole epochs)

    def __init__(self, dataset, batch_size: int, seed: int, num_replicas: int, rank: int,
                 num_workers: int = 0, drop_last: bool = True, shuffle: bool = True,
                 collate: Callable[[int, list], Any] = collate_items, pin_memory: bool | None = None):
        from torch.utils.data.distributed import DistributedSampler
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.collate = _StepCollate(collate)
        self.sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=False)
        n = len(self.sampler)
        self.per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.per_epoch == 0:
            raise InputError(f"{len(dataset)} items cannot fill one batch of {batch_size} per process "
                             f"on {num_replicas} process(es): lower the batch size or add data")

    def iterate(self, start: int):
        """Yield (m, batch) for m = start, start + 1, ... forever."""
        import monai.data
        m = start
        # One loader spans about LOADER_SPAN micro-batches (whole epochs): on a small pretraining cohort,
        # starting workers once per epoch keeps the step waiting for data (docs/BENCHMARKS.md).
        span = max(1, math.ceil(self.LOADER_SPAN / self.per_epoch))
        while True:
            epoch, pos = divmod(m, self.per_epoch)
            order = []
            for e in range(epoch, epoch + span):
                self.sampler.set_epoch(e)
                first = pos * self.batch_size if e == epoch else 0
                order += [(e, i) for i in list(self.sampler)[first: self.per_epoch * self.batch_size]]
            loader = monai.data.DataLoader(_StepItems(self.dataset, order, self.batch_size, m),
                                           batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                                           collate_fn=self.collate, pin_memory=self.pin_memory,
                                           persistent_workers=False)
            for tagged_m, batch in loader:
                assert tagged_m == m, (tagged_m, m)  # the loader keeps the order it was given
                yield m, batch
                m += 1
