import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_script, tiny_records, write_jsonl
from fake_openai import FakeOpenAI
from sae.provenance import read_record


def test_pipeline_end_to_end_then_skips_then_reruns_what_changed(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", tiny_records(40))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    args = [f"--model_name={tiny_model}", f"--dataset_path={dataset}", f"--output_dir={tmp_path / 'acts'}",
            "--layer_idx=2", "--m=16", "--k=4", "--n_epochs=2", "--batch_size=64", "--run_name=t",
            "--n_top_neurons=5", "--n_examples=3"]
    first = run_script("run_pipeline.py", *args, cwd=tmp_path, env=env)
    assert first.stdout.count("skipped") == 0 and "==== summary" in first.stdout
    assert "val normalized MSE" in first.stdout and "5 selected features" in first.stdout
    summary = first.stdout[first.stdout.index("==== summary"):]
    assert first.stdout.count("Selected features (") == 1, "the table once, in the summary"
    table = summary[summary.index("Selected features (5 of 16, content features by label association;"):].splitlines()[1:]
    assert len(table) == 5 and all("% active): From the data: " in line for line in table), "it ends with the table"

    f = np.load(tmp_path / "acts" / "activations_layer2.npz", allow_pickle=False)
    assert json.loads(str(f["meta"]))["n_examples"] == 40
    ckpt = torch.load(tmp_path / "checkpoints" / "t" / "SAE_M=16_K=4.pt", weights_only=True)
    assert ckpt["config"]["ACTIVATIONS_PATH"].endswith("activations_layer2.npz") and ckpt["metrics"]["l0"] == pytest.approx(4, abs=0.1), "TopK: K per token"
    lab = ckpt["metrics"]["labels"]
    assert f"probe on {lab['probe_val_examples']} validation examples" in summary
    means = f"feature means {100 * lab['probe_sae_mean_accuracy']:.1f}%"
    assert means in summary and f"SAE {means}" in (tmp_path / "report.html").read_text(), "the like-pooled probe"
    assert len(pd.read_csv(tmp_path / "interpretations.csv")) == 5
    assert read_record(str(tmp_path / "report.json"))["config"]["K"] == 4

    second = run_script("run_pipeline.py", *args, "--batch_tokens=256", cwd=tmp_path, env=env)
    assert second.stdout.count("up to date, skipped") == 3, "batching does not change the activations"

    third = run_script("run_pipeline.py", *args, "--k=2", cwd=tmp_path, env=env)
    assert third.stdout.count("up to date, skipped") == 1
    assert "==== train done" in third.stdout and "==== interpret done" in third.stdout
    assert (tmp_path / "checkpoints" / "t" / "SAE_M=16_K=2.pt").exists()

    # the LLM server is down: interpretation fails; once it is up, the same command redoes interpretation
    llm_args = [*args, "--k=2", "--max_retries=1", "--retry_base_s=0.01"]
    down = run_script("run_pipeline.py", *llm_args, cwd=tmp_path, check=False,
                      env=dict(env, OPENAI_BASE_URL="http://127.0.0.1:9/v1"))
    assert down.returncode == 2 and "could not reach the LLM server" in down.stderr
    server = FakeOpenAI()
    try:
        up = run_script("run_pipeline.py", *llm_args, cwd=tmp_path, env=dict(env, OPENAI_BASE_URL=server.url))
        assert up.stdout.count("up to date, skipped") == 2 and "==== interpret done" in up.stdout
        assert len(server.log) > 0 and "5 of 5 selected features described" in up.stdout
    finally:
        server.close()


def test_pipeline_errors(tiny_model, tmp_path):
    proc = run_script("run_pipeline.py", "--no_such_knob=1", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "unknown setting no_such_knob (in --no_such_knob=1): no script has it" in proc.stderr
    proc = run_script("run_pipeline.py", f"--model_name={tiny_model}", "--max_length=1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "step 'extract' (extract_activations.py) failed with exit code 2" in proc.stderr
    assert "MAX_LENGTH=1 is too small" in proc.stderr


def test_corrupt_outputs_are_redone_not_a_traceback(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", tiny_records(24))
    (tmp_path / "acts").mkdir()
    (tmp_path / "acts" / "activations_layer2.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "checkpoints" / "t").mkdir(parents=True)
    (tmp_path / "checkpoints" / "t" / "SAE_M=16_K=4.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "interpretations.csv").write_text("x")
    (tmp_path / "report.html").write_text("<html>")
    (tmp_path / "report.json").write_text('{"record": {broken')
    args = [f"--model_name={tiny_model}", f"--dataset_path={dataset}", f"--output_dir={tmp_path / 'acts'}",
            "--layer_idx=2", "--m=16", "--k=4", "--n_epochs=1", "--batch_size=64", "--run_name=t", "--eval_lm=False",
            "--n_top_neurons=3", "--n_examples=2"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    proc = run_script("run_pipeline.py", *args, cwd=tmp_path, env=env)
    assert "Traceback" not in proc.stderr and proc.stdout.count("cannot be read") == 3
    assert "==== extract done" in proc.stdout and "==== train done" in proc.stdout
    assert "==== interpret done" in proc.stdout



def test_sweep_trains_each_cell_once_and_compares_them(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", tiny_records(40))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    args = [f"--model_name={tiny_model}", f"--dataset_path={dataset}", f"--output_dir={tmp_path / 'acts'}",
            "--layer_idx=[1,2]", "--k=4", "--n_epochs=2", "--batch_size=64", "--run_name=t",
            "--n_top_neurons=3", "--n_examples=2", "--eval_max_examples=4"]
    first = run_script("run_pipeline.py", *args, "--m=[16,32]", cwd=tmp_path, env=env)
    assert first.stdout.count("==== extract done") == 1, "one forward pass for both layers"
    assert first.stdout.count("==== train layer") == 4 and first.stdout.count("==== interpret layer") == 1  # done lines
    for layer in (1, 2):
        for m in (16, 32):
            ckpt = torch.load(tmp_path / "checkpoints" / f"t_layer{layer}" / f"SAE_M={m}_K=4.pt", weights_only=True)
            assert ckpt["config"]["ACTIVATIONS_PATH"].endswith(f"activations_layer{layer}.npz") and ckpt["config"]["M"] == m
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert sorted(zip(table.layer, table.M)) == [(1, 16), (1, 32), (2, 16), (2, 32)]
    assert table.drop(columns="verdict").notna().all().all(), "every metric measured in every cell"
    assert table.best.sum() == 1 and table.verdict[table.best].str.startswith("best: the most labels covered").all()
    best = table[table.best].iloc[0]
    assert read_record(str(tmp_path / "report.json"))["config"]["SAE_CHECKPOINT"] == best.checkpoint
    report = (tmp_path / "report.html").read_text()
    assert "<h2>Sweep (4 cells)</h2>" in report and report.count("<svg") >= 2 + 11, "a plot per metric"
    summary = first.stdout[first.stdout.index("==== summary"):]
    assert "sweep.csv: 4 cells" in summary and sum(line.startswith("* ") for line in summary.splitlines()) == 1

    # one more size: only its cells train; extraction is current; every cell interpreted when asked
    second = run_script("run_pipeline.py", *args, "--m=[16,32,8]", "--interpret_cells=all", cwd=tmp_path, env=env)
    assert "==== extract done" not in second.stdout and second.stdout.count("==== train layer") == 2
    assert second.stdout.count("up to date, skipped") == 1 + 4
    assert "train layer1_M8_K4 (3/6) done" in second.stdout and "train layer2_M8_K4 (6/6) done" in second.stdout
    assert len(pd.read_csv(tmp_path / "sweep.csv")) == 6
    assert len(list(tmp_path.glob("report_layer*_M*_K4.html"))) == 5 and (tmp_path / "report.html").exists()

    # one more layer: extraction runs for it alone (each file records its own layer)
    third = run_script("run_pipeline.py", *args, "--layer_idx=[1,2,3]", "--m=[16,32,8]", "--steps=extract", cwd=tmp_path, env=env)
    assert "--LAYER_IDX=[3]" in third.stdout and "==== extract done" in third.stdout


def test_sweep_settings_are_checked(tmp_path):
    proc = run_script("run_pipeline.py", "--m=[16,0]", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--m=[16,0]: m must be an int >= 1 or a list of them" in proc.stderr
    proc = run_script("run_pipeline.py", "--layer_idx=[3,3]", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--layer_idx=[3,3] lists a value twice" in proc.stderr
    proc = run_script("run_pipeline.py", "--interpret_cells=some", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "interpret_cells must be best" in proc.stderr
