import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import require_c_compiler, kill_when, ROOT, make_activations, run_script
from sae.checkpoint import load_checkpoint
from sae.data import sha256_file
from sae.selection import TokenSelection
from sae.stream import MixingStream, eval_batches, split_examples
from sae.activations import open_activations

SMALL = ["--m=16", "--k=4", "--batch_size=32", "--export_saelens=True"]


@pytest.fixture(scope="module")
def acts_path(tmp_path_factory):
    return make_activations(tmp_path_factory.mktemp("acts") / "activations_layer1.npz", n_examples=60)


def train(tmp_path, acts, *args, check=True, **kw):
    return run_script("train_sae.py", f"--activations_path={acts}", *SMALL, *args, cwd=tmp_path, check=check, **kw)


def test_train_prints_metrics_and_writes_loadable_checkpoint(tmp_path, acts_path):
    proc = train(tmp_path, acts_path, "--n_epochs=4", "--run_name=t", "--use_matryoshka=True")
    out = proc.stdout
    for line in ("Train: ", "Epoch 1/4: train_loss=", "Epoch 4/4:", "Val MSE: ", "Active features/token: 4.00",
                 "Dead neurons: ", "Matryoshka prefixes: first 4: normalized MSE", "Left-out tokens (distinct): "):
        assert line in out, line
    path = tmp_path / "checkpoints" / "t" / "SAE_M=16_K=4.pt"
    ckpt = torch.load(path, weights_only=True)
    assert "resume" not in ckpt and ckpt["epoch"] == 4 and ckpt["config"]["M"] == 16
    assert ckpt["record"]["inputs"]["activations"] == sha256_file(acts_path)
    assert ckpt["provenance"]["train_tokens"] == "distinct"
    assert "steps_since_fired" in ckpt["state_dict"] and "scale" in ckpt["state_dict"]
    history = ckpt["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"], "the loss should fall"
    metrics = json.loads((path.parent / "metrics.json").read_text())
    assert metrics["val_nmse"] == ckpt["metrics"]["val_nmse"] < 1 and metrics["l0"] == pytest.approx(4)
    sae, _ = load_checkpoint(str(path))
    assert sae.prefixes == [4, 16] and sae.k == 4
    assert (path.parent / "saelens_M=16_K=4" / "cfg.json").exists()
    outputs = [path, path.parent / "metrics.json", path.parent / "saelens_M=16_K=4" / "cfg.json",
               path.parent / "saelens_M=16_K=4" / "sae_weights.safetensors"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in outputs}
    assert len(set(modes.values())) == 1, f"every output follows the umask: {modes}"


def test_split_is_by_example_and_stratified(acts_path):
    acts = open_activations(acts_path)
    train_ids, val_ids = split_examples(acts.n_examples, acts.labels, 0.2, 0)
    assert not set(train_ids) & set(val_ids) and len(train_ids) + len(val_ids) == acts.n_examples
    labels, counts = np.unique(acts.labels[val_ids], return_counts=True)
    assert len(labels) == 4 and (counts == 3).all()
    # the stream only yields rows of training examples, each once per epoch, without first tokens
    stream = MixingStream(acts, train_ids, TokenSelection(acts, "no_first"), 7, seed=0)
    rows = torch.cat(list(stream.epoch(0)))
    expected = np.concatenate([np.asarray(acts.example(i))[1:] for i in train_ids]).astype(np.float32)
    assert sorted(map(tuple, rows.numpy().tolist())) == sorted(map(tuple, expected.tolist()))
    again = torch.cat(list(stream.epoch(0)))
    assert torch.equal(rows, again), "an epoch's order is fixed by (seed, epoch)"


def test_reading_with_threads_gives_the_same_batches(acts_path):
    """A GPU's batches are read by a pool of threads (the pinned-memory part needs CUDA): the same batches in
    the same order as one thread reads them, over several fillings of a small mixing buffer."""
    acts = open_activations(acts_path)
    stream = MixingStream(acts, np.arange(acts.n_examples), TokenSelection(acts, "all"), 7, seed=0,
                          chunk_tokens=16, buffer_bytes=4 * acts.d * 20)
    one = list(stream.epoch(1))
    with ThreadPoolExecutor(4) as pool:
        pooled = list(stream._batches(1, pinned=False, pool=pool))
    assert len(one) > 3 * 16 and len(pooled) == len(one)
    assert all(torch.equal(a, b) for a, b in zip(one, pooled))


def test_resume_after_kill_equals_uninterrupted(tmp_path, acts_path):
    big = make_activations(tmp_path / "big.npz", n_examples=400, seed=1)
    args = ["--n_epochs=6", "--patience=100", "--batch_size=8", "--export_saelens=False"]
    run_script("train_sae.py", f"--activations_path={big}", "--m=16", "--k=4", *args, "--run_name=a",
               cwd=tmp_path)
    path_b = tmp_path / "checkpoints" / "b" / "SAE_M=16_K=4.pt"
    unfinished = tmp_path / "checkpoints" / "b" / "SAE_M=16_K=4.unfinished.pt"
    kill_when("train_sae.py", f"--activations_path={big}", "--m=16", "--k=4", *args, "--run_name=b", cwd=tmp_path,
              ready=lambda: torch.load(unfinished, weights_only=True)["epoch"] >= 2)
    assert "resume" in torch.load(unfinished, weights_only=True) and not path_b.exists()
    resumed = run_script("train_sae.py", f"--activations_path={big}", "--m=16", "--k=4", *args, "--run_name=b",
                         "--resume=True", cwd=tmp_path)
    assert "Resuming" in resumed.stdout
    a = torch.load(tmp_path / "checkpoints" / "a" / "SAE_M=16_K=4.pt", weights_only=True)
    b = torch.load(path_b, weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert not unfinished.exists(), "the finished run removes its unfinished state"


def test_a_killed_retrain_keeps_the_finished_checkpoint(tmp_path, acts_path):
    train(tmp_path, acts_path, "--n_epochs=2", "--run_name=x", "--eval_lm=False")
    path = tmp_path / "checkpoints" / "x" / "SAE_M=16_K=4.pt"
    finished, metrics = path.read_bytes(), (path.parent / "metrics.json").read_text()
    big = make_activations(tmp_path / "big.npz", n_examples=400, seed=1)
    unfinished = path.parent / "SAE_M=16_K=4.unfinished.pt"
    kill_when("train_sae.py", f"--activations_path={big}", *SMALL, "--n_epochs=50", "--patience=100", "--batch_size=8",
              "--run_name=x", "--seed=5", "--eval_lm=False", cwd=tmp_path, ready=unfinished.exists)
    assert path.read_bytes() == finished and (path.parent / "metrics.json").read_text() == metrics
    assert "resume" in torch.load(unfinished, weights_only=True)


def test_batch_topk_trains_and_saves_threshold(tmp_path, acts_path):
    from safetensors.torch import load_file
    train(tmp_path, acts_path, "--n_epochs=2", "--use_batch_topk=True", "--run_name=bt", "--use_matryoshka=False")
    ckpt = torch.load(tmp_path / "checkpoints" / "bt" / "SAE_M=16_K=4.pt", weights_only=True)
    threshold, scale = ckpt["state_dict"]["threshold"], ckpt["state_dict"]["scale"]
    assert threshold > 0 and ckpt["sae_config"]["batch_topk"]
    # the evaluations after training (labels, LM) run at inference: they never move the saved threshold
    exported = load_file(tmp_path / "checkpoints" / "bt" / "saelens_M=16_K=4" / "sae_weights.safetensors")
    torch.testing.assert_close(exported["threshold"], (threshold / scale).expand(16))


def test_without_a_c_compiler_training_takes_the_pytorch_step_to_the_same_result(tmp_path, acts_path):
    args = [f"--activations_path={acts_path}", *SMALL, "--n_epochs=3", "--export_saelens=False"]
    plain = run_script("train_sae.py", *args, "--run_name=plain", cwd=tmp_path, env=dict(os.environ, CC="no-such-cc"))
    assert "Note: no C compiler (no-such-cc) on PATH; training uses the PyTorch step" in plain.stdout
    require_c_compiler()
    assert "PyTorch training step" in plain.stdout
    with_c = run_script("train_sae.py", *args, "--run_name=with_c", cwd=tmp_path)
    assert "C training step" in with_c.stdout and "Note:" not in with_c.stdout
    a, b = (torch.load(tmp_path / "checkpoints" / run / "SAE_M=16_K=4.pt", weights_only=True)
            for run in ("plain", "with_c"))
    assert [h["val_loss"] for h in a["history"]] == pytest.approx([h["val_loss"] for h in b["history"]], rel=1e-3)


def _truncated(tmp_path, acts_path):
    path = tmp_path / "truncated.npz"
    data = open(acts_path, "rb").read()
    path.write_bytes(data[:len(data) // 2])
    return path


def _flipped(tmp_path, acts_path):
    """64 bytes in the middle of the activations replaced by a finite float16 value (6560) that np.load's
    CRC check would catch but a memory map does not."""
    path = tmp_path / "flipped.npz"
    data = bytearray(open(acts_path, "rb").read())
    acts = open_activations(acts_path)
    middle = acts.activations.offset + acts.activations.nbytes // 2
    data[middle:middle + 64] = np.full(32, 6560, dtype=np.float16).tobytes()
    path.write_bytes(bytes(data))
    return path


def _foreign(tmp_path, _):
    path = tmp_path / "foreign.npz"
    np.savez(path, x=np.zeros(3))
    return path


BAD = [
    (lambda t, a: t / "nope.npz", [], "does not exist; run extract_activations.py"),
    (_truncated, [], "is truncated or corrupt"),
    (_foreign, [], "lacks activations, offsets"),
    (_flipped, [], "activations.npy fails its CRC-32 check"),
    (lambda t, a: a, ["--k=32"], "K=32 is larger than M=16"),
    (lambda t, a: a, ["--lr=-1.0"], "LR=-1.0 must be positive"),
    (lambda t, a: a, ["--grad_clip=0"], "GRAD_CLIP=0.0 must be positive"),
    (lambda t, a: a, ["--use_matryoshka=True", "--matryoshka_prefixes=[8, 4, 16]"], "must be strictly increasing"),
    (lambda t, a: a, ["--use_matryoshka=True", "--matryoshka_prefixes=[4, 8]"], "must end at M=16"),
    (lambda t, a: a, ["--matryoshka_prefixes=[4, 16]"], "is set but USE_MATRYOSHKA=False"),
    (lambda t, a: a, ["--input_norm=rms"], "INPUT_NORM='rms' must be one of 'layer_norm', 'none'"),
    (lambda t, a: make_activations(t / "nan.npz", nan_example=7), [], "NaN or inf activations in example 7"),
    (lambda t, a: make_activations(t / "tiny.npz", n_examples=3, labels=False), [], "too few for a validation split"),
    (lambda t, a: a, ["--train_tokens=assistant"], "selects no tokens"),
    (lambda t, a: a, ["--resume=True", "--run_name=none"], "does not exist; drop --resume"),
]


@pytest.mark.parametrize("make_path, args, expected", BAD)
def test_bad_inputs(tmp_path, acts_path, make_path, args, expected):
    proc = train(tmp_path, make_path(tmp_path, acts_path), "--n_epochs=1", *args, check=False)
    assert proc.returncode != 0 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_resume_with_other_settings_is_refused(tmp_path, acts_path):
    train(tmp_path, acts_path, "--n_epochs=1", "--run_name=r")
    shutil.copy(tmp_path / "checkpoints" / "r" / "SAE_M=16_K=4.pt", tmp_path / "keep.pt")
    proc = train(tmp_path, acts_path, "--n_epochs=2", "--run_name=r", "--resume=True", "--lr=0.01", "--eval_lm=False",
                 check=False)
    assert proc.returncode != 0 and "trained with other settings or data (differs: setting LR)" in proc.stderr, proc.stderr


def test_two_trainings_of_one_checkpoint_do_not_run_at_once(tmp_path, acts_path):
    big = make_activations(tmp_path / "big.npz", n_examples=400, seed=1)
    cmd = [sys.executable, os.path.join(ROOT, "train_sae.py"), f"--activations_path={big}", *SMALL, "--n_epochs=50",
           "--patience=100", "--batch_size=8", "--run_name=same", "--eval_lm=False"]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=ROOT))
    try:
        while "Epoch 1/50" not in first.stdout.readline():  # training under way: it holds the lock
            assert first.poll() is None
        second = train(tmp_path, acts_path, "--run_name=same", "--n_epochs=1", check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert "another run is writing checkpoints/same/SAE_M=16_K=4.pt right now" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_diverging_run_says_so_and_saves_nothing_broken(tmp_path, acts_path):
    proc = train(tmp_path, acts_path, "--lr=1e6", "--n_epochs=3", "--run_name=div", "--eval_lm=False", check=False)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "diverged in epoch" in out and "lower --lr (now 1000000.0)" in out
    path = tmp_path / "checkpoints" / "div" / "SAE_M=16_K=4.pt"
    if proc.returncode == 0:  # it diverged after a usable epoch: that one is kept
        ckpt = torch.load(path, weights_only=True)
        assert all(np.isfinite(h["val_loss"]) for h in ckpt["history"])
        assert all(torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values())
    else:
        assert proc.returncode == 2 and not path.exists() and "nothing was saved" in proc.stderr


def test_a_full_disk_while_training_is_one_sentence_and_no_half_file(tmp_path, acts_path):
    import resource
    proc = train(tmp_path, acts_path, "--n_epochs=2", "--run_name=full", "--eval_lm=False", check=False,
                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, 4_000)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "no space left while saving checkpoints/full/SAE_M=16_K=4.pt" in proc.stderr
    folder = tmp_path / "checkpoints" / "full"
    assert not [n for n in os.listdir(folder) if ".tmp" in n or n.endswith(".pt")], os.listdir(folder)


@pytest.mark.parametrize("args, expected", [
    (["--run_name=file.txt/sub"], "the checkpoint folder checkpoints/file.txt/sub is not writable (Not a directory)"),
])
def test_unwritable_outputs_are_found_before_the_work(tmp_path, acts_path, args, expected):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "file.txt").write_text("not a folder")
    proc = train(tmp_path, acts_path, *args, check=False)
    assert proc.returncode == 2 and expected in proc.stderr and "Epoch 1" not in proc.stdout



def test_quiet_drops_the_per_epoch_lines_but_not_the_results(tmp_path, acts_path):
    """(That a run without --quiet prints the per-epoch lines is checked by the first test of this file.)"""
    quiet = train(tmp_path, acts_path, "--n_epochs=2", "--run_name=q", "--eval_lm=False", "--quiet", "true").stdout
    assert "Epoch 1/2" not in quiet and "Val MSE: " in quiet and "Saved " in quiet


def test_the_saved_weights_are_the_best_epoch_not_the_last(tmp_path, acts_path):
    """Re-evaluated on the validation tokens, the saved state_dict has the lowest validation loss in the
    history; early stopping with patience 1 ends on an epoch worse than the best, so last ≠ best here."""
    from sae.metrics import reconstruction_metrics
    from sae.step import TorchStep
    train(tmp_path, acts_path, "--n_epochs=60", "--patience=1", "--lr=0.05", "--eval_lm=False", "--run_name=b")
    sae, ckpt = load_checkpoint(str(tmp_path / "checkpoints" / "b" / "SAE_M=16_K=4.pt"))
    losses = [h["val_loss"] for h in ckpt["history"]]
    assert int(np.argmin(losses)) < len(losses) - 1, f"the last epoch should not be the best here: {losses}"
    acts = open_activations(acts_path)
    train_ids, val_ids = split_examples(acts.n_examples, acts.labels, 0.1, 0)
    selection = TokenSelection(acts, "distinct", [train_ids, val_ids], 16)
    again = reconstruction_metrics(sae, acts, val_ids, selection, TorchStep(), torch.device("cpu"), 1 << 13)
    assert np.mean(again["prefix_nmse"]) == pytest.approx(min(losses), rel=1e-4)
    assert np.mean(again["prefix_nmse"]) != pytest.approx(losses[-1], rel=1e-4)


@pytest.mark.parametrize("input_norm", ["layer_norm", "none"])
def test_the_final_figures_are_measured_on_the_activations_themselves(tmp_path, acts_path, input_norm):
    """Whether or not the SAE trains on layer-normed tokens, the validation MSE it reports at the end is that
    of its reconstructions, back in the activations' units, against the activations."""
    train(tmp_path, acts_path, "--n_epochs=2", "--eval_lm=False", "--run_name=f", f"--input_norm={input_norm}")
    sae, ckpt = load_checkpoint(str(tmp_path / "checkpoints" / "f" / "SAE_M=16_K=4.pt"))
    assert sae.input_norm == input_norm
    acts = open_activations(acts_path)
    train_ids, val_ids = split_examples(acts.n_examples, acts.labels, 0.1, 0)
    selection = TokenSelection(acts, "distinct", [train_ids, val_ids], 16)
    x = torch.cat([x[keep] for x, keep, _ in eval_batches(acts, val_ids, selection)]).double()
    with torch.no_grad():
        nmse = ((x - sae(x.float()).double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert ckpt["metrics"]["val_nmse"] == pytest.approx(nmse, rel=1e-4)


@pytest.mark.parametrize("tokens", ["all", "no_special"])
def test_other_token_selections_train_on_exactly_their_tokens(tmp_path, acts_path, tokens):
    train(tmp_path, acts_path, "--n_epochs=1", "--eval_lm=False", f"--train_tokens={tokens}", f"--run_name={tokens}")
    ckpt = torch.load(tmp_path / "checkpoints" / tokens / "SAE_M=16_K=4.pt", weights_only=True)
    acts = open_activations(acts_path)
    train_ids, _ = split_examples(acts.n_examples, acts.labels, 0.1, 0)
    roles = [np.asarray(acts.token_role[acts.offsets[i]:acts.offsets[i + 1]]) for i in train_ids]
    want = sum(len(r) for r in roles) if tokens == "all" else sum(int((r != 0).sum()) for r in roles)
    assert ckpt["provenance"]["n_train_tokens"] == want and ckpt["provenance"]["train_tokens"] == tokens
