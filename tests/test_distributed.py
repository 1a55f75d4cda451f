"""torchrun with 2 CPU processes (gloo) on the tiny model: same extraction, working data-parallel training."""
import os

import numpy as np
import torch

from conftest import run_script, tiny_records, write_jsonl
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
        a = np.load(tmp_path / "one" / f"activations_layer{layer}.npz")
        b = np.load(tmp_path / "two" / f"activations_layer{layer}.npz")
        for key in ("offsets", "token_ids", "token_role", "example_index", "labels"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        np.testing.assert_allclose(a["activations"].astype(np.float32), b["activations"].astype(np.float32),
                                   rtol=1e-3, atol=1e-3)

    acts = tmp_path / "two" / "activations_layer2.npz"
    proc = torchrun("train_sae.py", f"--ACTIVATIONS_PATH={acts}", "--M=16", "--K=4", "--N_EPOCHS=3",
                    "--BATCH_SIZE=32", "--RUN_NAME=ddp", cwd=tmp_path)
    assert "Data parallel over 2 processes (gloo): effective batch 64" in proc.stdout
    assert proc.stdout.count("Epoch 1/3") == 1, "only rank 0 prints"
    path = tmp_path / "checkpoints" / "ddp" / "SAE_M=16_K=4.pt"
    ckpt = torch.load(path, weights_only=True)
    losses = [h["train_loss"] for h in ckpt["history"]]
    assert losses[-1] < losses[0] and ckpt["provenance"]["processes"] == 2
    sae, _ = load_checkpoint(str(path))
    x = torch.from_numpy(np.load(acts)["activations"][1:50].astype(np.float32))
    with torch.no_grad():
        assert sae(x).shape == x.shape and ((sae.encode(x) > 0).sum(1) == 4).all()
