"""Where outputs go and how they are written: one naming rule each for activation files and checkpoints, one atomic write,
one lock per output, and the checks made before a step's work starts (writable folder, full disk).

Every output is written under a temporary name in its own folder and then renamed, so a finished-looking
file is always complete; the temporary file is removed when writing fails. Outputs get the permissions
the umask gives a new file, whatever the library that wrote them chose.
"""
import atexit
import os
import tempfile


def activations_path(output_dir: str, layer: int) -> str:
    """The one naming rule for extracted activations: OUTPUT_DIR/activations_layer{L}.npz."""
    return os.path.join(output_dir, f"activations_layer{layer}.npz")


def checkpoint_path(run_name: str, m: int, k: int, root: str = "checkpoints") -> str:
    """The one naming rule every script uses: checkpoints/{RUN_NAME}/SAE_M={M}_K={K}.pt."""
    return os.path.join(root, run_name, f"SAE_M={m}_K={k}.pt")


def unfinished_path(path: str) -> str:
    """Where a run that has not finished keeps its state, so that a finished checkpoint at `path` is never
    replaced by an unfinished one (a killed retrain leaves the finished model in place)."""
    return (path[:-3] if path.endswith(".pt") else path) + ".unfinished.pt"


def extract_metrics_path(output_dir: str) -> str:
    """Extraction's timing (tokens, seconds, tokens/s) beside its activation files: OUTPUT_DIR/extract_metrics.json."""
    return os.path.join(output_dir, "extract_metrics.json")


def share_path(path: str, rank: int, world: int) -> str:
    """Where process `rank` of `world` writes its share of the output `path` (hidden until joined):
    folder/.name.rank{r}of{world}.ext."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.rank{rank}of{world}{ext}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, write) -> str:
    """Call write(temporary_path), then rename it to `path`; return `path`."""
    return write_all_atomic({path: write})[0]


def write_all_atomic(writers: dict) -> list[str]:
    """{path: write(temporary_path)}: every output is written to its temporary name first, and only then are
    they all renamed, so a failure (a full disk) leaves every old output as it was, not a mix of old and new."""
    tmps = {path: f"{path}.tmp{os.getpid()}" for path in writers}
    try:
        for path, write in writers.items():
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            write(tmps[path])
            os.chmod(tmps[path], 0o666 & ~_umask())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return list(writers)


def text_writer(text: str):
    """A writer for write_atomic / write_all_atomic that writes `text` as UTF-8."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def write_text_atomic(path: str, text: str) -> str:
    return write_atomic(path, text_writer(text))


class Busy(Exception):
    """Another process holds the lock of an output; the message says which and what to do."""


def _release(f, path: str):
    """At a normal exit: remove the lock file, then let the lock go (a killed process leaves the file, not
    the lock: the OS drops that)."""
    try:
        os.remove(path)
    except OSError:
        pass
    f.close()


def lock_path(path: str) -> str:
    """The hidden lock file beside an output: folder/.name.lock."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name.lstrip('.')}.lock")


def lock_output(path: str):
    """Hold an exclusive lock on lock_path(path) until the process exits, so two runs never write one output
    at once; raise Busy when another process holds it. A no-op where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    f = open(lock_path(path), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise Busy(f"another run is writing {path} right now (it holds {lock_path(path)}); wait for it to finish "
                   f"or choose another output") from None
    atexit.register(_release, f, lock_path(path))


def unwritable(folder: str) -> str | None:
    """None when files can be created in `folder` (made if missing), else the reason (the OS's words)."""
    try:
        os.makedirs(folder or ".", exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder or "."):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


NO_SPACE = (28, 27, 122)  # ENOSPC, EFBIG, EDQUOT: the disk (or quota) is full
