"""Where and how a script runs: its device, its dtype, glibc's allocator policy for CPU runs, and the one-pass
NaN/inf check of activations."""
import ctypes
import math
import sys

import torch


def quiet_libraries():
    """No progress bars or info lines from transformers (loading, GGUF dequantizing): QUIET runs."""
    from transformers.utils import logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 weights on GPUs as in the FAST paper; float32 on CPUs, where bf16 is slow
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def all_finite(t: torch.Tensor) -> bool:
    """Whether t holds no NaN and no inf, in one pass: aminmax propagates a NaN, and an inf is its min or max."""
    return t.numel() == 0 or all(map(math.isfinite, torch.aminmax(t)))


def set_malloc(mmap_threshold: int, trim_threshold: int):
    """On glibc (Linux): allocations above mmap_threshold bytes are mapped afresh and unmapped when
    freed, smaller ones come from the heap, which gives memory back only above trim_threshold bytes
    free at its top. Setting them turns off glibc's own adjustment of both. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


def keep_freed_memory():
    """Serve large CPU tensors from the heap and keep freed memory for reuse.

    By default glibc maps every allocation above 32 MiB afresh and unmaps it when freed, so each padded
    batch's activations (B·T × intermediate size floats) page-fault in again: 20% of a CPU forward pass
    went to the kernel. The memory held stays bounded by the largest batch."""
    set_malloc(1 << 30, 1 << 30)


# Training's policy: a step's buffers (a few MiB) stay on the heap for reuse, larger blocks are mapped and
# unmapped. Left to itself glibc raises this threshold to the largest block freed so far; evaluation chunks
# of varying size then came from the heap and fragmented it, so memory grew with the file. On a CPU
# evaluation reads chunks below the threshold (heap reuse, no page faults).
TRAINING_MMAP_THRESHOLD = 4 << 20


def keep_training_memory_bounded():
    set_malloc(mmap_threshold=TRAINING_MMAP_THRESHOLD, trim_threshold=1 << 30)


def eval_chunk_tokens(device: torch.device, d: int) -> int:
    """Tokens per evaluation chunk: on a CPU small enough for the heap under training's mmap threshold."""
    return 1 << 13 if device.type == "cuda" else max(64, TRAINING_MMAP_THRESHOLD // 2 // (4 * d))


def peak_gpu_memory(device: torch.device) -> int | None:
    """Bytes of GPU memory PyTorch held at most so far in this process on `device` (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's is asynchronous; a CPU's is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
