"""Batches of an in-memory data set, cut by index: the data set indexed by a whole batch at once, the seeded order
of each epoch (shared out by rank under DDP) and the training loader that resumes in the middle of an epoch.

No per-sample work: the DataModules (``vit.data``) hold a split as one uint8 tensor and hand these its size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class TensorImages(Dataset):
    """Indexed by a whole batch of indices at once (see ``EpochBatches``)."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


class EpochBatches:
    """Yields index batches; the order of epoch e depends only on (seed, e), so a resumed run sees the same order.

    Under DDP each of ``num_replicas`` ranks takes its own contiguous share of that same order (Lightning's
    DistributedSampler cannot wrap a sampler of whole batches). ``even_shares`` (training) leaves out the last
    ``n % num_replicas`` indices of the order, so every rank takes as many steps; without it (evaluation) every
    index comes exactly once and shares differ by at most one, so the synced metrics equal one process's.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0, even_shares: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.num_replicas, self.rank, self.even_shares = num_replicas, rank, even_shares
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next pass over ``epoch`` leaves out its first ``batches`` batches (trained before an interruption)."""
        self.epoch, self._resume = epoch, (epoch, batches)

    def _share(self, order: Tensor) -> Tensor:
        if self.even_shares:
            order = order[: len(order) - len(order) % self.num_replicas]
        return order.tensor_split(self.num_replicas)[self.rank]

    def __len__(self) -> int:
        return -(-len(self._share(torch.arange(self.n))) // self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        skip = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                skip = self._resume[1]
            self._resume = None
        yield from self._share(order).split(self.batch_size)[skip:]


class TrainLoader(DataLoader):
    """The training DataLoader, resumable in the middle of an epoch.

    Lightning stores ``state_dict()`` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``)
    and hands it back on resume: the epoch and how many of its batches were trained (``batches_done``, the
    fit loop's count), so the resumed epoch goes on where it stopped instead of starting its order again.
    """

    def __init__(self, data: Dataset, sampler: EpochBatches, batches_done: Callable[[], int], **kwargs):
        # Its own generator for the per-iterator base seed, which DataLoader otherwise draws from torch's global RNG:
        # a run resumed mid-epoch starts an iterator the uninterrupted run did not, and its dropout would shift.
        super().__init__(data, sampler=sampler, batch_size=None, generator=torch.Generator().manual_seed(sampler.seed), **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.batches_done()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume_at(state_dict["epoch"], state_dict["batches"])
