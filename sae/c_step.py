"""The training step in C (sae/sae_step.c), one of the two implementations of sae/step.py's interface:
after the encoder matmul, one C call for the selection (BatchTopK's batch-wide selection is a call of its
own), prefix residuals, loss and hand-written gradients, and one for the optimizer step (Adam with
clipping and the unit-norm decoder). For float32 on a CPU; any other batch, or a C call that could not
allocate its scratch memory, takes the PyTorch step. Built on first use with the system C compiler and
kept in a cache folder keyed by the source, the flags and the CPU. Where it cannot be built, `load_c_step`
says why and training takes the PyTorch step: the same math, about half the speed on a CPU.

    step, why_not = load_c_step()    # CStep, None  or  None, "no C compiler (cc) on PATH"
"""
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from . import cache
from .model import AUX_COEF, SparseAutoencoder
from .step import StepResult, TorchStep, pre_activations, torch_step

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sae_step.c")
# -march=native: the build is per machine (its CPU is in the cache key); the three math flags let the
# compiler vectorise float sums (reassociation) without -ffast-math's process-wide flush-to-zero
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fPIC", "-shared", "-lm"]
# tried in order until one builds: OpenMP (gcc, clang with libgomp/libomp), Apple clang with Homebrew's
# libomp, then one thread without OpenMP (Apple clang alone rejects -fopenmp)
THREADING = (["-fopenmp"], ["-Xpreprocessor", "-fopenmp", "-lomp"], [])
_P = ctypes.c_void_p


class _Totals(ctypes.Structure):
    """sae_step.c's Totals: the step's scalar results."""
    _fields_ = [(n, ctypes.c_double) for n in ("aux", "loss", "grad_sq", "beta")]


class _Step(ctypes.Structure):
    """sae_step.c's Step, field for field (its size is checked against the library's at load)."""
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "D", "M", "J", "A", "P", "threads", "select", "grads")] + \
               [(n, _P) for n in ("prefix_ends", "xc", "pre", "W_dec", "W_enc", "dead", "idx", "vals", "fired",
                                  "g_W_enc", "g_b_enc", "g_W_dec", "g_b_pre")] + \
               [("aux_coef", ctypes.c_double), ("prefix_nmse", _P), ("totals", ctypes.POINTER(_Totals))]


class CStep(TorchStep):
    """Calls sae_step on contiguous float32 CPU tensors; everything else goes to the PyTorch step."""
    name = "C"

    def __init__(self, lib_path: str):
        self.path = lib_path
        lib = ctypes.CDLL(lib_path)
        for name, struct in (("step_struct_size", _Step), ("totals_struct_size", _Totals)):
            size_fn = getattr(lib, name)
            size_fn.restype = ctypes.c_int64
            if size_fn() != ctypes.sizeof(struct):
                raise AttributeError(f"{name}() is {size_fn()} bytes in the library but {ctypes.sizeof(struct)} "
                                     f"here: it was built from another sae_step.c")
        self._fn = lib.sae_step
        self._fn.argtypes = [ctypes.POINTER(_Step)]
        self._fn.restype = ctypes.c_int
        self._select = lib.batch_select
        self._select.argtypes = [_P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double, _P, _P, _P]
        self._select.restype = ctypes.c_int64
        self._adam = lib.adam_update
        self._adam.argtypes = [_P] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_double] * 6 + [ctypes.c_int64] * 2
        self._adam.restype = None

    @torch.no_grad()
    def __call__(self, sae: SparseAutoencoder, x_BD: torch.Tensor, dead_M: torch.Tensor | None = None,
                 backward: bool = False, autocast=None) -> StepResult:
        xc_BD, pre_BM = pre_activations(sae, x_BD, autocast)
        if x_BD.device.type == "cpu" and xc_BD.dtype == torch.float32:
            selected = self._batch_select(sae, pre_BM.contiguous()) if sae.batch_topk else None
            out = self._run(sae, xc_BD, pre_BM, dead_M, selected, backward)
            if out is not None:
                return out
        return torch_step(sae, xc_BD, pre_BM, dead_M, backward)

    def _batch_select(self, sae: SparseAutoencoder, pre_BM: torch.Tensor):
        """SparseAutoencoder.select and codes_sparse for BatchTopK in one C call (the K·B largest in training,
        moving the threshold as select does; those above the threshold at inference): (idx_BJ, vals_BJ)."""
        b, m = pre_BM.shape
        idx, vals, kept_min = torch.empty(b * m, dtype=torch.long), torch.empty(b * m), ctypes.c_float()
        n = min(sae.k * b, b * m) if sae.training else 0
        j = self._select(pre_BM.data_ptr(), b, m, n, float(sae.threshold), idx.data_ptr(), vals.data_ptr(),
                         ctypes.byref(kept_min))
        if j < 0:  # no memory for the scratch: PyTorch's selection
            return sae.codes_sparse(pre_BM)
        if n and not math.isnan(kept_min.value):
            sae.update_threshold(kept_min.value)
        return idx[:b * j].view(b, j), vals[:b * j].view(b, j)

    def _run(self, sae, xc_BD, pre_BM, dead_M, selected, backward) -> StepResult | None:
        """One sae_step call; the gradients go to the parameters' .grad. None if C could not allocate."""
        (b, d), m, p = xc_BD.shape, sae.m, len(sae.prefixes)
        if selected is None:
            idx_BJ, vals_BJ = torch.empty(b, sae.k, dtype=torch.long), torch.empty(b, sae.k)
        else:
            idx_BJ, vals_BJ = (t.contiguous() for t in selected)
        xc_BD, pre_BM = xc_BD.contiguous(), pre_BM.contiguous()
        W_enc, W_dec = sae.W_enc_MD.detach().contiguous(), sae.W_dec_MD.detach().contiguous()
        grads = [torch.empty(m, d), torch.empty(m), torch.empty(m, d), torch.empty(d)] if backward else [None] * 4
        ends = torch.tensor(sae.prefixes, dtype=torch.long)
        dead = dead_M.contiguous() if dead_M is not None else None
        prefix_nmse, totals, fired = torch.zeros(p, dtype=torch.float64), _Totals(), torch.empty(m, dtype=torch.bool)

        def ptr(t):
            return None if t is None else t.data_ptr()

        step = _Step(B=b, D=d, M=m, J=idx_BJ.shape[1], A=sae.aux_k if dead is not None else 0, P=p,
                     threads=torch.get_num_threads(), select=selected is None, grads=backward,
                     prefix_ends=ptr(ends), xc=ptr(xc_BD), pre=ptr(pre_BM), W_dec=ptr(W_dec), W_enc=ptr(W_enc),
                     dead=ptr(dead), idx=ptr(idx_BJ), vals=ptr(vals_BJ), fired=ptr(fired),
                     g_W_enc=ptr(grads[0]), g_b_enc=ptr(grads[1]), g_W_dec=ptr(grads[2]), g_b_pre=ptr(grads[3]),
                     aux_coef=AUX_COEF, prefix_nmse=ptr(prefix_nmse), totals=ctypes.pointer(totals))
        if self._fn(ctypes.byref(step)) != 0:
            return None
        out = StepResult(loss=torch.tensor(totals.loss, dtype=torch.float32), prefix_nmse=prefix_nmse.float(),
                         sse=prefix_nmse * totals.beta, aux=torch.tensor(totals.aux, dtype=torch.float32),
                         idx=idx_BJ, vals=vals_BJ, fired=fired)
        if backward:
            for param, grad in zip((sae.W_enc_MD, sae.b_enc_M, sae.W_dec_MD, sae.b_pre_D), grads):
                param.grad = grad
            out.grad_norm = torch.tensor(totals.grad_sq, dtype=torch.float32).sqrt()
        return out

    def update(self, sae: SparseAutoencoder, optimizer: torch.optim.Adam, max_norm: float, grad_norm):
        """TorchStep.update in one pass over each parameter: clip_grads_with_norm_, torch.optim.Adam's step
        (no weight decay, amsgrad or maximize; the same formula on the same state) and the decoder rows
        renormalised, the clipping scale applied as each gradient is read."""
        grad_scale = min(1.0, max_norm / (float(grad_norm) + 1e-6))  # clip_grads_with_norm_'s coefficient
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
                       grad_scale, p is sae.W_dec_MD, threads)


def cache_dir() -> str:
    """$SAE_KERNEL_CACHE, else the per-user cache (sae/cache.py)."""
    return cache.cache_dir("SAE_KERNEL_CACHE")


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("flags", "model name")))
    except OSError:
        return platform.processor()


def kernel_path(folder: str | None = None, flags: list[str] = FLAGS + THREADING[0]) -> str:
    """Where the library built from this source, with these flags, for this CPU lives in the cache."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + repr((flags, platform.machine(), _cpu_identity())).encode()).hexdigest()[:16]
    return os.path.join(folder or cache_dir(), f"sae_step-{key}.so")


def _private_folder() -> str:
    """The cache folder when it is ours and others cannot write it, else a new private temporary folder."""
    return cache.private_folder(cache_dir()) or tempfile.mkdtemp(prefix="sae-kernel-")


def _build(cc: str, flags: list[str], lib: str) -> str | None:
    """Build the library at `lib` (under a temporary name, then renamed: never half-written); None, or why not."""
    tmp = f"{lib}.tmp{os.getpid()}"
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, SOURCE], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            return f"{cc} could not build {SOURCE}: {proc.stderr.strip()[-300:]}"
        os.chmod(tmp, 0o755)
        os.replace(tmp, lib)
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cc} could not build {SOURCE}: {e}"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_c_step(threading_options=THREADING) -> tuple[CStep | None, str | None]:
    """(CStep, None), building it if needed, or (None, the reason it cannot be had here). The threading
    options are tried in order; the first that builds is used (and cached under its own name).

    A cached library is loaded only from a folder that is ours and that others cannot write, and only when
    the file is ours and others cannot write it either; otherwise the library is built afresh into a new
    private temporary folder (0700), since a library planted where others can write would run in training."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc}) on PATH"
    folder, why_not = _private_folder(), None
    for threading_flags in threading_options:
        flags = FLAGS + list(threading_flags)
        lib = kernel_path(folder, flags)
        if os.path.lexists(lib) and not cache.private(lib):
            folder = tempfile.mkdtemp(prefix="sae-kernel-")
            lib = kernel_path(folder, flags)
        if not os.path.exists(lib):
            why_not = _build(cc, flags, lib)
            if why_not:
                continue
        try:
            step = CStep(lib)
        except (OSError, AttributeError) as e:  # not a library, or one without our functions
            return None, f"could not load {lib} ({e}); delete it to rebuild"
        if not threading_flags:
            step.name = "C (one thread: the compiler has no OpenMP)"
        return step, None
    return None, why_not
