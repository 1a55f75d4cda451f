"""The C step's library cache: a library planted where others can write is never loaded."""
import os
import subprocess

import pytest

from conftest import require_c_compiler
from sae import c_step

PLANT = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("planted library ran\n", f); fclose(f); }
}
"""


@pytest.fixture
def planted(tmp_path):
    """A harmless library that writes a marker file when loaded, under the name the cache would use."""
    require_c_compiler()
    marker = tmp_path / "marker"
    source = tmp_path / "plant.c"
    source.write_text(PLANT % marker)

    def plant(folder):
        lib = c_step.kernel_path(str(folder))
        subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-o", lib, str(source)], check=True)
        return lib
    return plant, marker


@pytest.mark.parametrize("writable", ["folder", "file"])
def test_a_library_planted_where_others_can_write_is_not_loaded(tmp_path, monkeypatch, planted, writable):
    plant, marker = planted
    cache = tmp_path / "cache"
    cache.mkdir()
    lib = plant(cache)
    os.chmod(cache if writable == "folder" else lib, 0o777)
    monkeypatch.setenv("SAE_KERNEL_CACHE", str(cache))
    step, why_not = c_step.load_c_step()
    assert step is not None, why_not
    assert not marker.exists(), "the planted library ran"
    assert os.path.dirname(step.path) != str(cache) and oct(os.stat(os.path.dirname(step.path)).st_mode & 0o777) == "0o700"


def test_a_private_cache_is_used(tmp_path, monkeypatch, planted):
    plant, marker = planted
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    plant(cache)
    monkeypatch.setenv("SAE_KERNEL_CACHE", str(cache))
    step, why_not = c_step.load_c_step()  # our own private folder and file: trusted (this is how the cache saves builds)
    assert marker.exists() and step is None and "delete it to rebuild" in why_not
