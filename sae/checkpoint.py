"""Checkpoint files: one naming rule, atomic writes, and loading with a clear error for a bad file.

A checkpoint is a plain dict that `torch.load(path, weights_only=True)` reads: "sae_config" rebuilds the
model, "state_dict" holds its weights and buffers, plus "config" (the training script's settings),
"provenance", "metrics", "history" and, while training is unfinished, "resume".
"""
import os

import torch

from .files import unfinished_path, write_atomic
from .model import SparseAutoencoder

FORMAT = "sae-pipeline-checkpoint-1"


class _KeepsWriteErrors:
    """A file for torch.save that remembers the OSError of a failed write: torch reports it as a RuntimeError
    without the errno, which is what tells a full disk from a bug."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _torch_save(obj, tmp: str):
    with open(tmp, "wb") as f:
        sink = _KeepsWriteErrors(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def save_atomic(obj, path: str):
    """torch.save to a temporary name in the same folder, then rename: never a half-written file. A failed
    write raises its OSError (errno ENOSPC, EFBIG, ...)."""
    write_atomic(path, lambda tmp: _torch_save(obj, tmp))


def save_checkpoint(path: str, record: dict, resume: dict | None = None):
    """A finished run's checkpoint at `path` (resume None), then the unfinished state beside it removed; or,
    with `resume` (what continuing needs: "state_dict", "optimizer", "epoch", "best_loss", "bad_epochs"),
    the unfinished checkpoint at unfinished_path(path), leaving a finished one at `path` in place."""
    if resume is not None:
        save_atomic({**record, "resume": resume}, unfinished_path(path))
        return
    save_atomic(record, path)
    if os.path.exists(unfinished_path(path)):
        os.remove(unfinished_path(path))


class CheckpointError(Exception):
    """Missing, unreadable or not one of our checkpoints; the message says which and what to do."""


def load_checkpoint(path: str, device="cpu") -> tuple[SparseAutoencoder, dict]:
    if not os.path.isfile(path):
        raise CheckpointError(f"SAE checkpoint {path} does not exist; run train_sae.py first or set "
                              f"SAE_CHECKPOINT to an existing .pt file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"SAE checkpoint {path} could not be read ({type(e).__name__}); it is truncated "
                              f"or not a checkpoint of this project, retrain with train_sae.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an SAE checkpoint of this project (no '{FORMAT}' marker); "
                              f"point SAE_CHECKPOINT at a file written by train_sae.py")
    try:
        sae = build_sae(ckpt["sae_config"])
        sae.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise CheckpointError(f"{path} does not hold a consistent SAE (its config and weights disagree: "
                              f"{type(e).__name__}); retrain with train_sae.py") from None
    return sae.to(device).eval(), ckpt


def build_sae(sae_config: dict) -> SparseAutoencoder:
    c = sae_config
    return SparseAutoencoder(c["d_in"], c["m"], c["k"], aux_k=c["aux_k"], dead_steps=c["dead_steps"],
                             prefixes=c["prefixes"], batch_topk=c["batch_topk"],
                             input_norm=c.get("input_norm", "none"))  # checkpoints before it: none
