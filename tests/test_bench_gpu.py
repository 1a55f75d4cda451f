import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_bench_runs_at_the_reduced_shape(tmp_path):
    """bench/bench_gpu.py end to end on a CPU (the shape it uses there): extraction by the script against the
    reference loop (which it checks for equal activations), the three training variants, the step's phases."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, f"{ROOT}/bench/bench_gpu.py", "--shape=reduced", "--train_tokens=20000",
                           f"--out={out}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a REDUCED shape, not Llama-3.1-8B's" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["layers"] for r in report["extraction"]] == [[3], [1, 3, 4]]
    for r in report["extraction"]:
        assert r["ours"]["tokens"] == r["reference"]["tokens"] and r["max_relative_difference"] < 1e-2
        assert r["ours"]["peak_gpu_memory_bytes"] is None and r["ratio"] > 0
    training = report["training"]
    for variant in ("TopK", "Matryoshka", "BatchTopK"):
        assert training[variant]["train_loop_tokens_per_s"] > 0 and 0 < training[variant]["val_nmse"] < 5
    # one short epoch (35 steps) teaches TopK something; BatchTopK's inference threshold is still settling
    assert training["TopK"]["val_nmse"] < 1 and training["Matryoshka"]["val_nmse"] < 1
    assert list(training["phases_ms_per_step"]) == ["data", "encoder", "top-k", "decoder and gradients", "optimizer"]
    assert training["phases_ms_per_step"]["top-k"] > 0 and training["phases_ms_per_step"]["encoder"] > 0
    assert "HypotheSAEs" in training
    # what a GPU run cut short needs most comes first: the step's phases, then Matryoshka and HypotheSAEs
    keys = list(training)
    assert keys.index("phases_ms_per_step") < keys.index("Matryoshka") < keys.index("HypotheSAEs") < keys.index("TopK")
