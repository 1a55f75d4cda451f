"""torchrun support: which process this is, its device, its share of the work, the few collectives the
scripts need, and the way out. Without torchrun (WORLD_SIZE unset) everything is a no-op for one process."""
import atexit
import os
import sys

import numpy as np
import torch
import torch.distributed as tdist


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup(device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs), silence stdout on ranks other than 0 (only
    rank 0 prints; errors still reach stderr), and return this process's device (cuda:LOCAL_RANK)."""
    if world() == 1:
        return device
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def share_by_tokens(offsets: np.ndarray, n: int) -> list[int]:
    """Example boundaries (n + 1 of them) splitting the examples into n contiguous ranges of about
    the same number of tokens."""
    targets = offsets[-1] * np.arange(n + 1) / n
    bounds = np.searchsorted(offsets, targets, side="left").clip(0, len(offsets) - 1)
    bounds[0], bounds[-1] = 0, len(offsets) - 1
    return [int(b) for b in np.maximum.accumulate(bounds)]


def barrier():
    if world() > 1:
        tdist.barrier()


def all_reduce(values, op="sum") -> np.ndarray:
    """Element-wise sum or max of a list of numbers over all processes (float64)."""
    t = torch.tensor(np.asarray(values, dtype=np.float64))
    if world() > 1:
        if tdist.get_backend() == "nccl":  # NCCL reduces only GPU tensors
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
    return t.cpu().numpy()


def any_process(mask: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a boolean tensor over all processes."""
    t = mask.to(torch.uint8)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.bool()


def average_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean of a tensor over all processes."""
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.div_(world())


def differs_across_processes(values) -> list[int]:
    """Indices of the numbers that are not the same on every process (compared by their max and min)."""
    high = all_reduce(values, "max")
    low = -all_reduce([-v for v in values], "max")
    return [int(i) for i in np.flatnonzero(high != low)]


def sum_and_max(count, seconds):
    """Total of a count and the slowest time over all processes."""
    return int(all_reduce([count])[0]), float(all_reduce([seconds], "max")[0])


def finish():
    """Leave the process group after the last collective; processes other than rank 0, which have nothing
    left to do, then end (leave())."""
    if tdist.is_initialized():
        tdist.destroy_process_group()
    if rank() > 0:
        leave()


def leave():
    """End a torchrun process whose outputs are all written: run the exit handlers (lock files), flush, and
    exit with status 0 without the interpreter's teardown. A gloo worker thread frees a finished collective a
    moment after it completes, and the tensors it holds have Python objects; if that happens once teardown has
    begun, the thread cannot take the GIL and the process aborts ("terminate called without an active
    exception", SIGABRT: in a core dump, ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> decref_pyobject ->
    take_gil -> pthread_exit). It aborted 3 of 140 two-process extractions on a loaded 2-core machine
    (whose rank 0 exits right after the last barrier), and none of 80 since. Without torchrun: nothing happens."""
    if world() == 1:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
