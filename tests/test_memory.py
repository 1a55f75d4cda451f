"""Neither extraction nor training holds a whole activations file (or a whole layer) in memory: the peak
resident memory of each script grows by far less than its file when the file grows fourfold."""
import os
import subprocess
import sys

import numpy as np
import torch

from conftest import ROOT, make_tiny_model, tiny_records, write_jsonl

sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_gpu import training_file  # noqa: E402

# runs a script as __main__ and reports its own peak resident memory when the interpreter exits: VmHWM of its
# memory map (Linux), which unlike getrusage's ru_maxrss does not carry over the parent's size from before exec
WITH_PEAK = ("import atexit, runpy, sys; atexit.register(lambda: print('PEAK_RSS_KIB', [line.split()[1] for line in "
             "open('/proc/self/status') if line.startswith('VmHWM')][0], file=sys.stderr)); sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")


def peak_mib(script: str, *args, cwd) -> float:
    proc = subprocess.run([sys.executable, "-c", WITH_PEAK, os.path.join(ROOT, script), "--quiet=True", *args],
                          cwd=cwd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stderr.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) / 1024


def assert_bounded(peaks: dict, sizes: dict):
    """The extra file is at least 60 MiB; the peak may grow by half of it at most, so a step that read the file,
    or a layer of it, whole (at least the extra file's size, twice that in float32) would fail. What does grow
    is per example or per token and small: per-example feature maxima and mean activations for the label
    metrics, token indices (34 MiB in one run for training's 4x file: 641 instead of 157 examples)."""
    growth, extra = peaks["4x"] - peaks["1x"], (sizes["4x"] - sizes["1x"]) / 2**20
    assert extra >= 60, extra
    assert growth < extra / 2, f"peak memory grew {growth:.0f} MiB for {extra:.0f} MiB more activations: {peaks}"


def test_training_memory_does_not_grow_with_the_file(tmp_path):
    peaks, sizes = {}, {}
    for name, n_tokens in (("1x", 30_000), ("4x", 120_000)):
        path = training_file(str(tmp_path / f"{name}.npz"), n_tokens, 768, np.random.default_rng(0), torch.device("cpu"))
        sizes[name] = os.path.getsize(path)
        peaks[name] = peak_mib("train_sae.py", f"--activations_path={path}", f"--run_name={name}", "--m=256", "--k=8",
                               "--n_epochs=1", "--eval_lm=False", "--export_saelens=False", cwd=tmp_path)
    assert_bounded(peaks, sizes)


def test_extraction_memory_does_not_grow_with_the_data(tmp_path):
    model = make_tiny_model(str(tmp_path / "model"), n_layers=1, hidden=768)
    peaks, sizes = {}, {}
    for name, n in (("1x", 150), ("4x", 600)):
        dataset = write_jsonl(tmp_path / f"{name}.jsonl", tiny_records(n))
        out = tmp_path / name
        peaks[name] = peak_mib("extract_activations.py", f"--model_name={model}", f"--dataset_path={dataset}",
                               f"--output_dir={out}", "--layer_idx=0", "--batch_tokens=1024", cwd=tmp_path)
        sizes[name] = os.path.getsize(out / "activations_layer0.npz")
    assert_bounded(peaks, sizes)
