"""Training and evaluation images read from WebDataset shards (:mod:`repvgg.io.shards`), split exactly over
the ranks of a distributed run and the data-loading workers of each rank.

The rule, per epoch: the shards are put in an order drawn from (seed, epoch) (the same on every rank), and
their samples in that order form the epoch's sequence of N samples. Rank r takes the positions
[r*S, (r+1)*S) with S = N // world_size (the N mod world_size left over change from epoch to epoch with the
shard order; none with one rank). With a ``batch_size`` the rank's share is cut to B = S // batch_size whole
batches, dealt to the DataLoader's workers as contiguous runs of whole batches, so that a DataLoader with
that batch size yields exactly B full batches on every rank (DDP needs the same number of steps on all) and
``len(loader)`` is right. Every sample is seen at most once per epoch, and all of them when nothing is left
over. Each worker reads only the shards its range overlaps and shuffles within a buffer. For evaluation
(``whole``) the ranks instead share out all N samples, so that each is counted exactly once.
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


def _deal(count: int, parts: int, part: int) -> tuple[int, int]:
    """Where one of ``parts`` contiguous runs of ``count`` items begins and how long it is: the first
    ``count % parts`` runs take one more."""
    each, extra = divmod(count, parts)
    return part * each + min(part, extra), each + (part < extra)


def rank_range(
    samples: int, world_size: int, rank: int, batch_size: int | None = None, whole: bool = False
) -> tuple[int, int]:
    """The positions ``[start, stop)`` of the epoch's sequence that one rank reads: for training the same
    ``samples // world_size`` on every rank, cut to whole batches; with ``whole`` (for evaluation) every
    sample once over all ranks, their shares differing by at most one."""
    if whole:
        start, length = _deal(samples, world_size, rank)
        return start, start + length
    share = samples // world_size
    return rank * share, rank * share + (share - share % batch_size if batch_size else share)


def worker_range(
    start: int, stop: int, workers: int, worker: int, batch_size: int | None = None
) -> tuple[int, int]:
    """One worker's part of a rank's ``[start, stop)``: contiguous runs of whole batches (of samples when
    ``batch_size`` is None), the first ``runs % workers`` workers taking one more."""
    unit = batch_size or 1
    first, length = _deal((stop - start) // unit, workers, worker)
    return start + first * unit, start + (first + length) * unit


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

    ``rank``/``world_size`` are this process's place in a distributed run; for training give the
    DataLoader's ``batch_size`` as ``batch_size`` too (see the module's rule); for evaluation ``whole``
    reads every sample once over all ranks (shares differing by one at most, not cut to batches).

    Call :meth:`set_epoch` before each epoch: the same seed and epoch give the same sequence (a resumed run
    replays it), another epoch another order. It reaches the workers when they start anew for each epoch
    (``persistent_workers=False``). With ``keys=True`` the items are ``(key, label)`` and no image is
    decoded (to see which samples come out).
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
        whole: bool = False,
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
        if whole and batch_size is not None:
            raise ArgumentValueError("`whole` reads every sample, not whole batches: leave `batch_size` out.")
        self.index = read_index(folder)
        self.start, self.stop = rank_range(self.index.samples, world_size, rank, batch_size, whole)
        if self.start == self.stop and not whole:
            one = f"one batch of {batch_size}" if batch_size else "one sample"
            raise DataError(
                f"The shards in {self.index.folder} hold {self.index.samples} samples, fewer than {one} for "
                f"each of {world_size} processes; lower `batch_size`, or use fewer processes."
            )
        self.classes = list(self.index.classes)
        self.transform = transform
        self.rank, self.seed, self.epoch = rank, seed, 0
        self.shuffle, self.shuffle_buffer, self.batch_size = shuffle, shuffle_buffer, batch_size
        self.in_chans, self.keys = in_chans, keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = self._read(*worker_range(self.start, self.stop, workers, worker, self.batch_size))
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
