"""Training data from a memory-mapped activations file: an example-level split, token selection, and
batches drawn from random chunks of examples through a shuffling mixing buffer (as in FAST).

Only one chunk and one buffer are in memory at a time, so memory does not grow with the file.
"""
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .activations import Activations
from .runtime import all_finite
from .selection import TokenSelection


class NonFiniteActivations(Exception):
    pass


def split_examples(n: int, labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Example indices for training and validation; stratified by label when there are labels."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == u) for u in np.unique(labels)]
    val = []
    for g in groups:
        g = rng.permutation(g)
        val.extend(g[:int(round(len(g) * val_fraction))])
    val = np.sort(np.asarray(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(n), val)
    return train, val


GPU_READERS = 8  # threads that read a GPU's batches from the file (one thread copies a few GB/s)
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def trained_on(acts: Activations, example_ids: np.ndarray, selection: TokenSelection) -> np.ndarray:
    """Boolean mask of the selected tokens of the given examples' rows, concatenated in the order given."""
    return selection.mask(selection.rows(acts, example_ids))


def _read(acts: Activations, example_ids: np.ndarray, selection: TokenSelection, out: np.ndarray | None = None):
    """(rows as stored (N, D), what each row is (Rows)) of the given examples, in the order given, read
    into the start of `out` when given."""
    info = selection.rows(acts, example_ids)
    dtype = acts.activations.dtype
    rows = np.empty((len(info.roles), acts.d), dtype=dtype) if out is None else out[:len(info.roles)]
    starts, ends = acts.offsets[example_ids], acts.offsets[example_ids + 1]
    row_ends = np.cumsum(ends - starts)  # where each example's rows end in `rows`
    for a, b, at in zip(starts, ends, row_ends - (ends - starts)):
        acts.read_rows(a, b, out=rows[at:at + b - a])
    if not all_finite(torch.from_numpy(rows)):
        uint, exponent = _EXPONENT_BITS[dtype]  # they have every exponent bit set: find the first such row
        bad_rows = np.flatnonzero(((rows.view(uint) & exponent) == exponent).any(1))
        example = int(example_ids[np.searchsorted(row_ends, bad_rows[0], side="right")])
        raise NonFiniteActivations(
            f"{acts.path} has NaN or inf activations in example {example} (line {acts.example_index[example] + 1} "
            f"of {acts.meta.get('dataset_path')}); re-extract with --store_dtype=float32 or drop that example")
    return rows, info


def init_sample(acts: Activations, train_ids: np.ndarray, selection: TokenSelection, seed: int,
                max_tokens: int = 1 << 13) -> torch.Tensor:
    """Trained-on rows of a random tenth of the training examples, at most max_tokens of them (so memory
    does not grow with the file): the sample for the input scale and b_pre's median."""
    perm = np.random.default_rng(seed).permutation(train_ids)
    lengths = acts.offsets[perm + 1] - acts.offsets[perm]
    within = int(np.searchsorted(np.cumsum(lengths), max_tokens)) + 1  # examples holding max_tokens tokens
    for ids in (perm[:min(max(1, len(perm) // 10), within)], perm[:within]):  # the second if the first has none
        rows, info = _read(acts, np.sort(ids), selection)
        keep = selection.mask(info)
        if keep.any():
            break
    return torch.from_numpy(rows[keep][:max_tokens]).float()


def chunks(acts: Activations, example_ids: np.ndarray, chunk_tokens: int) -> list[np.ndarray]:
    """Consecutive groups of the given examples holding about chunk_tokens tokens each."""
    lengths = acts.offsets[example_ids + 1] - acts.offsets[example_ids]
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(chunk_tokens, lengths.sum(), chunk_tokens))
    return [c for c in np.split(example_ids, np.unique(bounds)) if len(c)]


def count_tokens(acts: Activations, example_ids: np.ndarray, selection: TokenSelection, chunk_tokens: int = 1 << 16):
    """(trained-on tokens, left-out tokens) of the given examples."""
    kept = total = 0
    for c in chunks(acts, np.sort(example_ids), chunk_tokens):
        mask = trained_on(acts, c, selection)
        kept += int(mask.sum())
        total += len(mask)
    return kept, total - kept


class MixingStream:
    """Batches of trained-on tokens from random chunks of examples, shuffled in a mixing buffer.

    Each epoch visits every example once, in an order fixed by (seed, epoch), so a resumed run sees
    the same batches as an uninterrupted one. With `rank`/`world` each process takes every world-th chunk.
    """

    def __init__(self, acts: Activations, example_ids: np.ndarray, selection: TokenSelection, batch_size: int,
                 seed: int, chunk_tokens: int = 4096, buffer_bytes: int = 1 << 26, rank: int = 0, world: int = 1):
        self.acts, self.example_ids, self.selection = acts, np.asarray(example_ids), selection
        self.batch_size, self.seed, self.chunk_tokens = batch_size, seed, chunk_tokens
        # the mixing buffer: as many tokens as 64 MiB of float32 rows (held as stored: float16 halves it), and
        # at least 16 batches
        self.buffer_tokens = max(buffer_bytes // (4 * acts.d), 16 * batch_size)
        self.rank, self.world = rank, world

    def _my_chunks(self, rng) -> list[np.ndarray]:
        return chunks(self.acts, rng.permutation(self.example_ids), self.chunk_tokens)[self.rank::self.world]

    def n_tokens(self, epoch: int) -> int:
        """Trained-on tokens this process will see in that epoch."""
        mine = self._my_chunks(np.random.default_rng([self.seed, epoch]))
        return count_tokens(self.acts, np.concatenate(mine), self.selection)[0] if mine else 0

    def epoch(self, epoch: int, for_gpu: bool = False):
        """The batches of one epoch, float32 rows. For a GPU they are prepared ahead in a background thread
        and come as stored (float16 by default: half the bytes to copy) in pinned memory, so that
        `x.to(device, non_blocking=True).float()` copies while the GPU works and converts there. On a CPU
        the thread would take cores from the training step's own threads, and reading a batch costs far
        less than the step."""
        if not for_gpu:
            return self._batches(epoch, pinned=False, pool=None)
        return _prefetch(self._pooled(epoch))

    def _pooled(self, epoch: int):
        with ThreadPoolExecutor(GPU_READERS) as pool:
            yield from self._batches(epoch, pinned=True, pool=pool)

    def _batches(self, epoch: int, pinned: bool, pool: ThreadPoolExecutor | None):
        """Chunks are read into one buffer of rows as stored (float16 by default), those of one filling by
        the threads of `pool` at once when given (reading from the page cache is a memory copy that one
        thread does at a few GB/s); each batch is gathered from the buffer in shuffled order, into pinned
        memory as stored or converted to float32 on its own, so no whole-buffer copy is made."""
        rng = np.random.default_rng([self.seed, epoch])
        my_chunks = [np.sort(c) for c in self._my_chunks(rng)]
        sizes = [int((self.acts.offsets[c + 1] - self.acts.offsets[c]).sum()) for c in my_chunks]
        buf = np.empty((self.buffer_tokens + self.batch_size + max(sizes, default=0), self.acts.d),
                       dtype=self.acts.activations.dtype)
        rows_t = torch.from_numpy(buf)

        def read(job):  # (chunk, first row in buf) -> which of its rows are trained on, as rows of buf
            c, at = job
            return at + np.flatnonzero(self.selection.mask(_read(self.acts, c, self.selection, out=buf[at:])[1]))

        filled, kept, jobs = 0, [], []  # rows of buf in use, which of them are trained on, chunks to read
        for i, c in enumerate(my_chunks):
            jobs.append((c, filled))
            filled += sizes[i]
            last = i == len(my_chunks) - 1
            if filled - self.batch_size >= self.buffer_tokens or last:
                kept = np.concatenate(kept + list((pool.map if pool else map)(read, jobs)))
                jobs = []
                order = torch.from_numpy(kept[rng.permutation(len(kept))])
                n_out = len(order) if last else len(order) // self.batch_size * self.batch_size
                for batch in order[:n_out].split(self.batch_size):
                    if pinned:  # PyTorch's pinned-memory cache reuses a block only once its copy is done
                        out = torch.empty((len(batch), self.acts.d), dtype=rows_t.dtype, pin_memory=True)
                        yield torch.index_select(rows_t, 0, batch, out=out)
                    else:
                        yield rows_t.index_select(0, batch).float()
                rest = order[n_out:]  # fewer than a batch: carried to the front of the buffer
                buf[:len(rest)] = buf[rest.numpy()]
                filled, kept = len(rest), [np.arange(len(rest))]


def _prefetch(iterator, depth: int = 16):
    """Run a generator in a daemon thread, `depth` items ahead (numpy and torch release the GIL).
    Closing the consumer early (break) stops the thread."""
    q, done, stop = queue.Queue(maxsize=depth), object(), threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def work():
        try:
            for item in iterator:
                put(item)
                if stop.is_set():
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def eval_batches(acts: Activations, example_ids: np.ndarray, selection: TokenSelection, chunk_tokens: int = 1 << 13):
    """(rows, selected mask, what each row is (Rows)) of the given examples chunk by chunk, in file order."""
    for c in chunks(acts, np.sort(example_ids), chunk_tokens):
        rows, info = _read(acts, c, selection)
        yield torch.from_numpy(rows).float(), torch.from_numpy(selection.mask(info)), info
