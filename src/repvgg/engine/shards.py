"""Training and evaluation images read from WebDataset shards (:mod:`repvgg.io.shards`), split exactly over
the ranks of a distributed run and the data-loading workers of each rank.

The rule, per epoch: the shards are put in an order drawn from (seed, epoch) (the same on every rank), and
their samples in that order form the epoch's sequence of N samples. Rank r takes the positions
[r*S, (r+1)*S) with S = N // world_size (the N mod world_size left over change from epoch to epoch with the
shard order; none with one rank). With a ``batch_size`` the rank's share is cut to B = S // batch_size whole
batches, dealt to the DataLoader's workers as contiguous runs of whole batches, so that a DataLoader with
that batch size yields exactly B full batches on every rank (DDP needs the same number of steps on all) and
``len(loader)`` is right. Every sample is seen at most once per epoch, and all of them when nothing is left
over. Each worker reads only the shards its range overlaps and shuffles within a buffer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from torch.utils.data import IterableDataset, get_worker_info

from repvgg.exceptions import ArgumentValueError, DataError
from repvgg.io.files import PathLike
from repvgg.io.images import BadImage, decode_image
from repvgg.io.shards import REWRITE, iter_samples, read_index

Item = TypeVar("Item")


def rank_share(samples: int, world_size: int, batch_size: int | None = None) -> int:
    """The samples each rank yields per epoch: ``samples // world_size``, cut to whole batches."""
    share = samples // world_size
    return share - share % batch_size if batch_size else share


def worker_range(
    samples: int, world_size: int, rank: int, workers: int, worker: int, batch_size: int | None = None
) -> tuple[int, int]:
    """The positions ``[start, stop)`` of the epoch's sequence that one worker of one rank reads: the rank's
    share (see :func:`rank_share`) dealt to ``workers`` as contiguous runs of whole batches (of samples when
    ``batch_size`` is None), the first ``units % workers`` workers taking one more."""
    unit = batch_size or 1
    units = rank_share(samples, world_size, batch_size) // unit
    each, extra = divmod(units, workers)
    first = worker * each + min(worker, extra)
    start = rank * (samples // world_size) + first * unit
    return start, start + (each + (worker < extra)) * unit


def buffer_shuffled(items: Iterator[Item], size: int, rng: random.Random) -> Iterator[Item]:
    """``items`` shuffled within a buffer of ``size``: each comes out at random among the next ``size``."""
    buffer: list[Item] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        position = rng.randrange(size)
        yield buffer[position]
        buffer[position] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardedImages(IterableDataset[Any]):
    """The images of one split folder of shards (e.g. ``shards/train``) as ``(transform(image), label)``,
    or a :class:`BadImage` for an image that cannot be decoded (``collate_reporting_bad`` reports those).

    ``rank``/``world_size`` are this process's place in a distributed run; give the DataLoader's
    ``batch_size`` as ``batch_size`` too (see the module's rule). Call :meth:`set_epoch` before each epoch:
    the same seed and epoch give the same sequence (a resumed run replays it), another epoch another order.
    It reaches the workers when they start anew for each epoch (``persistent_workers=False``). With
    ``keys=True`` the items are ``(key, label)`` and no image is decoded (to see which samples come out).
    """

    def __init__(
        self,
        folder: PathLike,
        transform: Callable[[Any], Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        batch_size: int | None = None,
        in_chans: int = 3,
        keys: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ArgumentValueError(
                f"`rank` must be 0 to `world_size` - 1, got rank {rank} of {world_size}."
            )
        if (batch_size is not None and batch_size < 1) or shuffle_buffer < 1:
            raise ArgumentValueError(
                f"`batch_size` and `shuffle_buffer` must be at least 1, got {batch_size} and "
                f"{shuffle_buffer}."
            )
        self.index = read_index(folder)
        if rank_share(self.index.samples, world_size, batch_size) == 0:
            one = f"one batch of {batch_size}" if batch_size else "one sample"
            raise DataError(
                f"The shards in {self.index.folder} hold {self.index.samples} samples, fewer than {one} for "
                f"each of {world_size} processes; lower `batch_size`, or use fewer processes."
            )
        self.classes = list(self.index.classes)
        self.transform = transform
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.shuffle, self.shuffle_buffer, self.batch_size = shuffle, shuffle_buffer, batch_size
        self.in_chans, self.keys = in_chans, keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return rank_share(self.index.samples, self.world_size, self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start, stop = worker_range(
            self.index.samples, self.world_size, self.rank, workers, worker, self.batch_size
        )
        samples = self._read(start, stop)
        if self.shuffle:
            rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{self.rank}:{worker}")
            samples = buffer_shuffled(samples, self.shuffle_buffer, rng)
        for shard, key, ext, data, label in samples:
            if not label < len(self.classes):
                raise DataError(
                    f"Sample {key} in the shard {shard} has the class {label}, but the index lists "
                    f"{len(self.classes)} classes; {REWRITE} again."
                )
            yield (key, label) if self.keys else self._item(data, f"{shard}:{key}.{ext}", label)

    def _item(self, data: bytes, name: str, label: int) -> Any:
        image = decode_image(data, name, self.in_chans)
        return image if isinstance(image, BadImage) else (self.transform(image), label)

    def _read(self, start: int, stop: int) -> Iterator[tuple[Path, str, str, bytes, int]]:
        """The samples at positions ``[start, stop)`` of this epoch's sequence, reading only the shards
        that hold them, each from its first needed sample to its last."""
        order = list(range(len(self.index.shards)))
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(order)
        offset = 0
        for position in order:
            shard, count = self.index.shards[position]
            first, last = max(start, offset), min(stop, offset + count)
            if first < last:
                for sample in iter_samples(shard, skip=first - offset, count=last - first):
                    yield (shard, *sample)
            offset += count
