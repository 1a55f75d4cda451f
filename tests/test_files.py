"""The one atomic write: the file appears whole or not at all, with the umask's permissions."""
import os

import pytest

from sae.files import activations_path, write_atomic, write_text_atomic


def test_write_text_atomic_replaces_whole_and_follows_the_umask(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    write_text_atomic(str(path), "old")
    write_text_atomic(str(path), "new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["out.txt"]
    old = os.umask(0o077)
    try:
        write_atomic(str(path), lambda tmp: os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o644)))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    write_text_atomic(str(path), "finished")

    def fails(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(str(path), fails)
    assert path.read_text() == "finished" and os.listdir(tmp_path) == ["out.txt"]


def test_activations_path_is_the_one_naming_rule():
    assert activations_path("acts", 12) == os.path.join("acts", "activations_layer12.npz")


def test_a_second_writer_of_one_output_is_refused(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    from sae.files import Busy, lock_output
    out = str(tmp_path / "out.csv")
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {ROOT!r}); "
                               f"from sae.files import lock_output; lock_output({out!r}); print('held', flush=True); "
                               f"time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match="another run is writing .*out.csv right now"):
            lock_output(out)
    finally:
        holder.kill()
        holder.wait()
    lock_output(out)  # the holder is gone (killed): its lock went with it


def test_rows_read_the_same_without_preadv(tmp_path):
    """Windows has no os.preadv: the seek-and-read fallback gives the same rows, and a short file is named."""
    import threading
    import numpy as np
    from conftest import make_activations
    from sae.activations import _read_at, open_activations
    acts = open_activations(make_activations(tmp_path / "a.npz"))
    want = acts.read_rows(3, 40)
    out = np.empty_like(want)
    offset = acts.activations.offset + 3 * acts.d * want.dtype.itemsize
    assert _read_at(acts._fd, memoryview(out).cast("B"), offset, threading.Lock(), preadv=None) == out.nbytes
    assert np.array_equal(out, want) and np.array_equal(want, np.asarray(acts.activations[3:40]))
    size = os.path.getsize(acts.path)
    assert _read_at(acts._fd, memoryview(out).cast("B"), size - 10, threading.Lock(), preadv=None) == 10
