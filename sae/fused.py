"""A CPU training step in C (sae/sae_step.c): after the encoder matmul, one function for selection,
prefix residuals, loss and hand-written gradients, and one for the optimizer step (Adam with clipping
and the unit-norm decoder). Built on first use with the system C compiler and kept in a cache folder
keyed by the source, the flags and the CPU. Where it cannot be built, `load` says why and training
takes the PyTorch path: the same math, about half the speed on a CPU.

    fused, why_not = load()          # FusedStep, None  or  None, "no C compiler (cc) on PATH"
    out = sae_loss(sae, x, dead, backward=True, fused=fused)
    fused.adam_step(optimizer, max_norm, out["grad_norm"], unit_rows=[sae.W_dec_MD])
"""
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sae_step.c")
# -march=native: the build is per machine (its CPU is in the cache key); the three math flags let the
# compiler vectorise float sums (reassociation) without -ffast-math's process-wide flush-to-zero
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fPIC", "-shared", "-fopenmp", "-lm"]
_P = ctypes.c_void_p


class _Step(ctypes.Structure):
    """sae_step.c's Step struct, field for field."""
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "D", "M", "J", "A", "P", "threads", "select", "grads")] + \
               [(n, _P) for n in ("prefix_ends", "xc", "pre", "W_dec", "W_enc", "dead", "idx", "vals", "fired",
                                  "g_W_enc", "g_b_enc", "g_W_dec", "g_b_pre")] + \
               [("aux_coef", ctypes.c_double), ("out", _P)]


class FusedStep:
    """Calls sae_step on contiguous float32 CPU tensors and returns PyTorch tensors."""

    def __init__(self, lib_path: str):
        self.path = lib_path
        lib = ctypes.CDLL(lib_path)
        self._fn = lib.sae_step
        self._fn.argtypes = [ctypes.POINTER(_Step)]
        self._fn.restype = ctypes.c_int
        self._adam = lib.adam_update
        self._adam.argtypes = [_P] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_double] * 6 + [ctypes.c_int64] * 2
        self._adam.restype = None

    def __call__(self, xc_BD, pre_BM, W_enc_MD, W_dec_MD, prefixes, k, aux_k, aux_coef, dead_M=None,
                 selected=None, grads=True):
        """Loss parts and (with `grads`) gradients. `selected` = (idx_BJ, vals_BJ) chosen elsewhere
        (BatchTopK); None: the K largest pre-activations per token, chosen here. Returns (idx_BJ,
        vals_BJ, fired_M, out, grads): fired_M the features with a positive code, out = [prefix
        normalized MSEs..., aux normalized MSE, loss, squared gradient norm, β (‖x_c − batch mean‖²)],
        grads for W_enc, b_enc, W_dec, b_pre (W_dec's rows orthogonal to the decoder rows). None if the
        C side could not allocate its scratch memory."""
        (b, d), m, p = xc_BD.shape, W_dec_MD.shape[0], len(prefixes)
        if selected is None:
            idx_BJ, vals_BJ = torch.empty(b, k, dtype=torch.long), torch.empty(b, k)
        else:
            idx_BJ, vals_BJ = (t.contiguous() for t in selected)
        tensors = [xc_BD.contiguous(), pre_BM.contiguous(), W_dec_MD.detach().contiguous(),
                   W_enc_MD.detach().contiguous()]
        grads = [torch.empty(m, d), torch.empty(m), torch.empty(m, d), torch.empty(d)] if grads else None
        ends = torch.tensor(prefixes, dtype=torch.long)
        dead = dead_M.contiguous() if dead_M is not None else None
        out = torch.zeros(p + 4, dtype=torch.float64)
        fired = torch.empty(m, dtype=torch.bool)
        step = _Step(b, d, m, idx_BJ.shape[1], aux_k if dead is not None else 0, p, torch.get_num_threads(),
                     selected is None, grads is not None, ends.data_ptr(), *(t.data_ptr() for t in tensors),
                     dead.data_ptr() if dead is not None else None, idx_BJ.data_ptr(), vals_BJ.data_ptr(),
                     fired.data_ptr(), *([g.data_ptr() for g in grads] if grads else [None] * 4), aux_coef,
                     out.data_ptr())
        if self._fn(ctypes.byref(step)) != 0:
            return None
        return idx_BJ, vals_BJ, fired, out, grads

    def adam_step(self, optimizer: torch.optim.Adam, max_norm: float, total_norm, unit_rows=()):
        """clip_grads_with_norm_(params, max_norm, total_norm), then optimizer.step() for a
        torch.optim.Adam without weight decay, amsgrad or maximize (the same formula on the same state),
        then the parameters in `unit_rows` renormalised row by row: one pass over each parameter, the
        clipping scale applied as each gradient is read."""
        grad_scale = min(1.0, max_norm / (float(total_norm) + 1e-6))  # clip_grads_with_norm_'s coefficient
        group, = optimizer.param_groups
        assert group["weight_decay"] == 0 and not group["amsgrad"] and not group["maximize"], group
        (beta1, beta2), threads = group["betas"], torch.get_num_threads()
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:  # as torch.optim.Adam starts it
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            cols = p.shape[-1]
            self._adam(p.data_ptr(), p.grad.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
                       p.numel() // cols, cols, group["lr"], beta1, beta2, group["eps"], float(state["step"]),
                       grad_scale, any(p is u for u in unit_rows), threads)


def cache_dir() -> str:
    """$SAE_KERNEL_CACHE, else $XDG_CACHE_HOME/sae-pipeline, else ~/.cache/sae-pipeline."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("SAE_KERNEL_CACHE") or os.path.join(base, "sae-pipeline")


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("flags", "model name")))
    except OSError:
        return platform.processor()


def _private(path: str) -> bool:
    """Whether path is ours and nobody else can write it (so nobody could have planted a library there)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    owner_ok = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return owner_ok and not stat.S_ISLNK(st.st_mode) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def kernel_path(folder: str | None = None) -> str:
    """Where the library built from this source, with these flags, for this CPU lives in the cache."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + repr((FLAGS, platform.machine(), _cpu_identity())).encode()).hexdigest()[:16]
    return os.path.join(folder or cache_dir(), f"sae_step-{key}.so")


def load() -> tuple[FusedStep | None, str | None]:
    """(FusedStep, None), building it if needed, or (None, the reason it cannot be had here).

    A cached library is loaded only from a folder that is ours and that others cannot write, and only when
    the file is ours and others cannot write it either; otherwise the library is built afresh into a new
    private temporary folder (0700), since a library planted where others can write would run in training."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc}) on PATH"
    folder = cache_dir()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        pass
    if not _private(folder):
        folder = tempfile.mkdtemp(prefix="sae-kernel-")
    lib = kernel_path(folder)
    if os.path.lexists(lib) and not _private(lib):
        folder = tempfile.mkdtemp(prefix="sae-kernel-")
        lib = kernel_path(folder)
    if not os.path.exists(lib):
        tmp = f"{lib}.tmp{os.getpid()}"  # built under a temporary name, then renamed: never half-written
        try:
            proc = subprocess.run([cc, *FLAGS, "-o", tmp, SOURCE], capture_output=True, text=True, timeout=120)
            if proc.returncode:
                return None, f"{cc} could not build {SOURCE}: {proc.stderr.strip()[-300:]}"
            os.chmod(tmp, 0o755)
            os.replace(tmp, lib)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{cc} could not build {SOURCE}: {e}"
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    try:
        return FusedStep(lib), None
    except (OSError, AttributeError) as e:  # not a library, or one without our functions
        return None, f"could not load {lib} ({e}); delete it to rebuild"
