"""torchrun with 2 CPU processes (gloo) on the tiny model: same extraction, working data-parallel training."""
import os
import subprocess
import sys

import numpy as np
import torch

from conftest import ROOT, kill_when, make_activations, run_script, tiny_records, write_jsonl
from sae.checkpoint import load_checkpoint


def torchrun(script, *args, cwd):
    return run_script(script, *args, cwd=cwd, nproc=2)


def test_two_process_extraction_equals_one_and_training_works(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", tiny_records(60))
    common = [f"--MODEL_NAME={tiny_model}", f"--DATASET_PATH={dataset}", "--LAYER_IDX=[1, 2]", "--BATCH_TOKENS=256"]
    run_script("extract_activations.py", *common, f"--OUTPUT_DIR={tmp_path / 'one'}", cwd=tmp_path)
    two = torchrun("extract_activations.py", *common, f"--OUTPUT_DIR={tmp_path / 'two'}", cwd=tmp_path)
    assert "on 2 processes" in two.stdout
    assert sorted(os.listdir(tmp_path / "two")) == ["activations_layer1.npz", "activations_layer2.npz",
                                                    "extract_metrics.json"]
    for layer in (1, 2):
        a = np.load(tmp_path / "one" / f"activations_layer{layer}.npz", allow_pickle=False)
        b = np.load(tmp_path / "two" / f"activations_layer{layer}.npz", allow_pickle=False)
        for key in ("offsets", "token_ids", "token_role", "example_index", "labels"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        np.testing.assert_allclose(a["activations"].astype(np.float32), b["activations"].astype(np.float32),
                                   rtol=1e-3, atol=1e-3)

    acts = tmp_path / "two" / "activations_layer2.npz"
    proc = torchrun("train_sae.py", f"--ACTIVATIONS_PATH={acts}", "--M=16", "--K=4", "--N_EPOCHS=3",
                    "--BATCH_SIZE=32", "--RUN_NAME=ddp", cwd=tmp_path)
    assert "Data parallel over 2 processes (gloo): effective batch 64" in proc.stdout
    assert "All 2 processes hold the same weights, threshold and dead-feature counters" in proc.stdout
    assert proc.stdout.count("Epoch 1/3") == 1, "only rank 0 prints"
    path = tmp_path / "checkpoints" / "ddp" / "SAE_M=16_K=4.pt"
    ckpt = torch.load(path, weights_only=True)
    losses = [h["train_loss"] for h in ckpt["history"]]
    assert losses[-1] < losses[0] and ckpt["provenance"]["processes"] == 2
    sae, _ = load_checkpoint(str(path))
    x = torch.from_numpy(np.load(acts, allow_pickle=False)["activations"][1:50].astype(np.float32))
    with torch.no_grad():
        top = sae.pre_acts(x).topk(4, dim=1)  # a TopK SAE: each token's 4 largest pre-activations, through ReLU
        assert sae(x).shape == x.shape
        torch.testing.assert_close(sae.encode(x), torch.zeros(len(x), 16).scatter(1, top.indices, top.values.relu()))


def test_training_killed_under_torchrun_resumes_to_the_uninterrupted_result(tmp_path):
    """kill -9 of a 2-process training, then --resume=True under torchrun: the same weights and history as a
    2-process run that was never interrupted (BatchTopK, so the threshold averaged across ranks is covered)."""
    acts = make_activations(tmp_path / "acts.npz", n_examples=300, seed=3)
    args = [f"--ACTIVATIONS_PATH={acts}", "--M=16", "--K=4", "--N_EPOCHS=25", "--PATIENCE=100", "--BATCH_SIZE=16",
            "--USE_BATCH_TOPK=True", "--EVAL_LM=False", "--EXPORT_SAELENS=False"]
    torchrun("train_sae.py", *args, "--RUN_NAME=whole", cwd=tmp_path)
    unfinished = tmp_path / "checkpoints" / "cut" / "SAE_M=16_K=4.unfinished.pt"
    kill_when("train_sae.py", *args, "--RUN_NAME=cut", cwd=tmp_path, nproc=2, timeout=300,
              ready=lambda: torch.load(unfinished, weights_only=True)["epoch"] >= 2)
    resumed = torchrun("train_sae.py", *args, "--RUN_NAME=cut", "--RESUME=True", cwd=tmp_path)
    assert "Resuming" in resumed.stdout and "All 2 processes hold the same weights" in resumed.stdout
    a, b = (torch.load(tmp_path / "checkpoints" / run / "SAE_M=16_K=4.pt", weights_only=True) for run in ("whole", "cut"))
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["state_dict"]["threshold"] > 0 and b["provenance"]["processes"] == 2


def test_run_pipeline_with_nproc_runs_extraction_and_training_on_two_processes(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", tiny_records(40))
    proc = run_script("run_pipeline.py", f"--model_name={tiny_model}", f"--dataset_path={dataset}", "--nproc=2",
                      f"--output_dir={tmp_path / 'acts'}", "--layer_idx=2", "--m=16", "--k=4", "--n_epochs=2",
                      "--eval_lm=False", "--steps=extract,train", "--run_name=p", cwd=tmp_path)
    assert "torch.distributed.run" in proc.stdout and "on 2 processes" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "p" / "SAE_M=16_K=4.pt", weights_only=True)
    assert ckpt["provenance"]["processes"] == 2 and ckpt["record"]["processes"] == 2
    again = run_script("run_pipeline.py", f"--model_name={tiny_model}", f"--dataset_path={dataset}", "--nproc=2",
                       f"--output_dir={tmp_path / 'acts'}", "--layer_idx=2", "--m=16", "--k=4", "--n_epochs=2",
                       "--eval_lm=False", "--steps=extract,train", "--run_name=p", cwd=tmp_path)
    assert again.stdout.count("up to date, skipped") == 2


LEAVE = """
import atexit, sys
from sae import dist
class Teardown:
    def __del__(self):
        print("teardown")
t = Teardown()
atexit.register(lambda: print("exit handler", end=" "))
print("written", end=" ")  # not flushed yet: leave() must flush it
dist.leave()
print("after leave", end=" ")
"""


def test_leave_runs_exit_handlers_and_skips_the_interpreter_teardown_under_torchrun():
    def run(**env):
        base = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as usual
        return subprocess.run([sys.executable, "-c", LEAVE], capture_output=True, text=True, cwd=ROOT,
                              env={**base, "PYTHONPATH": ROOT, **env})

    under_torchrun = run(WORLD_SIZE="2", RANK="1")
    assert (under_torchrun.returncode, under_torchrun.stdout) == (0, "written exit handler ")
    alone = run(WORLD_SIZE="1")  # without torchrun the script goes on and Python exits as usual
    assert alone.stdout.split() == ["written", "after", "leave", "exit", "handler", "teardown"]
