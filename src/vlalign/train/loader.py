"""A stage's batches, built off the main process (``train.num_workers``).

A torch ``DataLoader`` whose batch sampler yields, for every optimizer step from the one asked
for on, exactly the samples :func:`vlalign.train.loop.batch_indices` gives that step (this
process's share), so the data order stays a function of (seed, step) and resuming stays exact.
One loader item is one step: its micro-batches, collated in the worker. Each sample index
carries its epoch: :class:`StageExamples` picks an epoch's caption (``set_epoch``), and a
worker holds its own copy of the dataset, so the epoch travels with the index and each item is
built under the epoch the main process would have set.

``num_workers`` 0 builds the batches in the training process with no ``DataLoader`` (the path
every stage took before this module). The loader has its own RNG generator: creating its
iterator never draws from the global RNG that checkpoints save.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlalign.train.data import StageExamples, collate

MAX_AUTO_WORKERS = 8
PREFETCH_FACTOR = 2  # steps each worker builds ahead


def granted_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(setting: int | None, cpus: int | None = None) -> int:
    """``train.num_workers``: the value given, or (None) one worker per granted CPU but the
    training process's, capped at :data:`MAX_AUTO_WORKERS`: 0 on a 1-2 CPU machine."""
    if setting is not None:
        return int(setting)
    cpus = granted_cpus() if cpus is None else cpus
    return 0 if cpus <= 2 else min(cpus - 1, MAX_AUTO_WORKERS)


@dataclass(frozen=True)
class StepBatch:
    """What one optimizer step trains on (this process's share)."""

    step: int
    n_global: int  # samples of the step over all processes
    micro_batches: list[dict[str, torch.Tensor]]


class EpochItems(Dataset):
    """``StageExamples`` indexed by ``(step, n_global, slot, row, epoch)``: the item of ``row``
    under ``epoch`` (set per item, so a worker's copy gives the main process's text)."""

    def __init__(self, examples: StageExamples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int, int, int, int]) -> tuple[tuple, dict[str, Any]]:
        step, n_global, slot, row, epoch = key
        self.examples.set_epoch(epoch)
        return (step, n_global, slot), self.examples[row]


class StepSampler(Sampler[list[tuple[int, int, int, int, int]]]):
    """For each step from ``start`` to ``total``: this process's samples of the step, as
    ``(step, n_global, slot, row, epoch)``. ``steps(step)`` → (rows of the step over all
    processes, their epoch)."""

    def __init__(
        self,
        steps: Callable[[int], tuple[list[int], int]],
        total: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.steps, self.total, self.rank, self.world = steps, total, rank, world
        self.start = 0

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int, int]]]:
        for step in range(self.start, self.total):
            rows, epoch = self.steps(step)
            local = rows[self.rank :: self.world]
            yield [(step, len(rows), k, r, epoch) for k, r in enumerate(local)]


def make_collate(pad_id: int, micro: int) -> Callable[[list], StepBatch]:
    def collate_step(items: list[tuple[tuple, dict[str, Any]]]) -> StepBatch:
        items = sorted(items, key=lambda it: it[0][2])  # the sampler's order
        (step, n_global, _), _ = items[0]
        examples = [it[1] for it in items]
        micro_batches = [
            collate(examples[j : j + micro], pad_id) for j in range(0, len(examples), micro)
        ]
        return StepBatch(step, n_global, micro_batches)

    return collate_step


def _worker_init(worker_id: int) -> None:
    from vlalign.train.preemption import close_inherited_locks

    close_inherited_locks()


class StepBatches:
    """The batches of a stage's steps. :meth:`get` (step) returns that step's batch; steps
    asked in order stream from the loader, any other step restarts it there (a resume)."""

    def __init__(
        self,
        examples: StageExamples,
        steps: Callable[[int], tuple[list[int], int]],
        total: int,
        micro: int,
        pad_id: int,
        num_workers: int,
        rank: int = 0,
        world: int = 1,
        pin_memory: bool | None = None,
    ):
        self.examples, self.steps, self.total = examples, steps, total
        self.micro, self.pad_id, self.rank, self.world = micro, pad_id, rank, world
        self.num_workers = num_workers
        self._loader: DataLoader | None = None
        self._it: Iterator[StepBatch] | None = None
        self._next = -1
        if num_workers > 0:
            self.sampler = StepSampler(steps, total, rank, world)
            self._loader = DataLoader(
                EpochItems(examples),
                batch_sampler=self.sampler,
                collate_fn=make_collate(pad_id, micro),
                num_workers=num_workers,
                pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                prefetch_factor=PREFETCH_FACTOR,
                persistent_workers=True,
                # its own generator: the iterator's base seed is not drawn from the global RNG
                generator=torch.Generator().manual_seed(0),
                # a worker must not keep the trainer's checkpoint lock alive after it died
                worker_init_fn=_worker_init,
            )

    def get(self, step: int) -> StepBatch:
        if self._loader is None:  # in process
            rows, epoch = self.steps(step)
            local = rows[self.rank :: self.world]
            self.examples.set_epoch(epoch)
            items = [self.examples[i] for i in local]
            micro_batches = [
                collate(items[j : j + self.micro], self.pad_id)
                for j in range(0, len(items), self.micro)
            ]
            return StepBatch(step, len(rows), micro_batches)
        if self._it is None or step != self._next:
            self.sampler.start = step
            self._it = iter(self._loader)
        batch = next(self._it)
        if batch.step != step:  # cannot happen: the sampler yields the steps in order
            raise RuntimeError(f"loader gave step {batch.step} for step {step}")
        self._next = step + 1
        return batch

    def close(self) -> None:
        """Stop the workers (persistent workers live as long as the iterator)."""
        self._it = None
        self._next = -1
        if self._loader is not None:
            iterator = getattr(self._loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            self._loader._iterator = None
