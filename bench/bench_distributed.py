"""Wall time of 1 and 2 processes (torchrun) for extraction and training on the default data, in one run.

On a CPU machine torchrun gives each process one thread (OMP_NUM_THREADS=1) and the processes share
the cores, so the ratio shows what data parallelism buys there; on a machine with one GPU per process
each process gets its own device.

    python bench/bench_distributed.py                # extraction of the sample data, 5 training epochs
"""
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sae.launch import launcher  # noqa: E402
EPOCHS = 5


def wall(nproc, script, *args, cwd):
    t0 = time.time()
    proc = subprocess.run([*launcher(sys.executable, nproc), os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode:
        sys.exit(f"{script} on {nproc} processes failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


def main():
    tmp = tempfile.mkdtemp(prefix="bench_distributed_")
    data = os.path.join(ROOT, "data", "cognitive_actions_sample.jsonl")
    times = {}
    for nproc in (1, 2):
        out = os.path.join(tmp, f"acts{nproc}")
        times["extract", nproc] = wall(nproc, "extract_activations.py", f"--DATASET_PATH={data}", f"--OUTPUT_DIR={out}",
                                       cwd=tmp)
        times["train", nproc] = wall(nproc, "train_sae.py", f"--ACTIVATIONS_PATH={out}/activations_layer12.npz",
                                     f"--N_EPOCHS={EPOCHS}", f"--PATIENCE={EPOCHS}", f"--RUN_NAME=bench{nproc}",
                                     "--EVAL_LM=False", "--EXPORT_SAELENS=False", cwd=tmp)
    print(f"cores: {os.cpu_count()}; default data ({data}); training {EPOCHS} epochs, LM evaluation off")
    for step in ("extract", "train"):
        print(f"{step:<8} 1 process {times[step, 1]:7.1f}s   2 processes {times[step, 2]:7.1f}s   "
              f"speed-up {times[step, 1] / times[step, 2]:.2f}x")


if __name__ == "__main__":
    main()
