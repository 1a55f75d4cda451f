"""The per-user cache: where it is, and whether a path in it can be trusted.

It holds what is costly to make and safe to make again: the C training step built for this CPU
(sae/c_step.py) and GGUF models converted to transformers folders (sae/lm.py). Anything in it may be
deleted; it is rebuilt on next use. What is loaded from it is only loaded from a folder that is ours and
that nobody else can write, so nobody could have planted a file there.
"""
import os
import stat


def cache_dir(variable: str | None = None) -> str:
    """The environment variable `variable` when set, else $XDG_CACHE_HOME/sae-pipeline, else
    ~/.cache/sae-pipeline."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return (variable and os.environ.get(variable)) or os.path.join(base, "sae-pipeline")


def private(path: str) -> bool:
    """Whether path is ours and nobody else can write it (so nobody could have planted a file there)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    owner_ok = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return owner_ok and not stat.S_ISLNK(st.st_mode) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def private_folder(folder: str) -> str | None:
    """folder, created (0700) if missing, when it is ours and others cannot write it; else None."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        pass
    return folder if private(folder) else None
