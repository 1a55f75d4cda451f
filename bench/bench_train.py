"""SAE training speed and quality: train_sae.py against HypotheSAEs' SparseAutoencoder.fit, side by side.

Both train on the same activations with the same M, K, Matryoshka prefixes, epochs and batch size, on the
same example-level split (tokens: no_first), with early stopping off so both run every epoch. Ours runs
once before and once after theirs (the same seed: the same model), and its two rates are averaged. Tokens/s
counts training tokens over the whole loop (per-epoch validation included) on both sides; the
validation normalized MSE of both final models is computed by one function on the same tokens.
HypotheSAEs is installed with `pip install --no-deps hypothesaes` and its sae.py loaded as a file.

    python bench/bench_train.py                       # default activations, 5 epochs
    python bench/bench_train.py --memory              # also peak RSS on the file and on one 4x larger
    python bench/bench_train.py --loaded              # on a loaded machine: one busy loop per core beside both
"""
import os
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from peer import load_hypothesaes  # noqa: E402
from sae.activations import StreamingNpzWriter, open_activations  # noqa: E402
from sae.checkpoint import load_checkpoint  # noqa: E402
from sae.files import checkpoint_path  # noqa: E402
from sae.selection import TokenSelection  # noqa: E402
from sae.stream import eval_batches, split_examples  # noqa: E402

ACTS = os.path.join(ROOT, "activations", "activations_layer12.npz")
M, K, PREFIXES, EPOCHS, BATCH, LR, SEED = 256, 8, [64, 256], 5, 512, 5e-4, 0


def tokens(acts, ids):
    xs = [x[keep] for x, keep, _ in eval_batches(acts, ids, TokenSelection(acts, "no_first"))]
    return torch.cat(xs)


def val_nmse(recon_fn, x_val):
    with torch.no_grad():
        recon = torch.cat([recon_fn(x_val[s:s + 4096]) for s in range(0, len(x_val), 4096)])
    x = x_val.double()
    return float((x - recon.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

OUR_CHECKPOINT = checkpoint_path("bench_train", M, K, root=os.path.join(tempfile.gettempdir(), "checkpoints"))

def run_ours(acts_path, run_name, timed=False, epochs=EPOCHS):
    """train_sae.py with early stopping and the LM evaluation off (so memory is training's own)."""
    cmd = [sys.executable, os.path.join(ROOT, "train_sae.py"), f"--activations_path={acts_path}",
           f"--run_name={run_name}", f"--m={M}", f"--k={K}", "--use_matryoshka=True",
           f"--matryoshka_prefixes={PREFIXES}", f"--n_epochs={epochs}", f"--patience={epochs}",
           f"--batch_size={BATCH}", f"--lr={LR}",
           "--export_saelens=False", "--eval_lm=False", "--train_tokens=no_first",
           "--input_norm=none"]  # HypotheSAEs' math exactly: its tokens as they are, no per-token normalization
    if timed:
        cmd = ["/usr/bin/time", "-v"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode:
        sys.exit(f"train_sae.py failed:\n{proc.stderr[-3000:]}")
    return proc


def run_ours_rate() -> float:
    """train_sae.py's training throughput, as its metrics.json records it."""
    run_ours(ACTS, "bench_train")
    with open(os.path.join(os.path.dirname(OUR_CHECKPOINT), "metrics.json")) as f:
        return json.load(f)["train_tokens_per_s"]


def busy_loops(n: int) -> list[subprocess.Popen]:
    """n processes that each keep a core busy: the load of --loaded, on both sides alike."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main():
    load = busy_loops(os.cpu_count() or 1) if "--loaded" in sys.argv else []
    try:
        compare()
    finally:
        for p in load:
            p.kill()


def compare():
    torch.manual_seed(SEED)
    acts = open_activations(ACTS)
    train_ids, val_ids = split_examples(acts.n_examples, acts.labels, 0.1, SEED)
    x_train, x_val = tokens(acts, train_ids), tokens(acts, val_ids)

    # ours runs before and after theirs and the two rates are averaged, so that a shared machine's drift
    # during their ~30 s falls on both sides
    our_rates = [run_ours_rate()]
    hs = load_hypothesaes()
    theirs = hs.SparseAutoencoder(acts.d, M, K, prefix_lengths=PREFIXES, device="cpu")
    t0 = time.time()
    theirs.fit(x_train, x_val, batch_size=BATCH, learning_rate=LR, n_epochs=EPOCHS, patience=EPOCHS + 1,
               show_progress=False)
    their_rate = EPOCHS * len(x_train) / (time.time() - t0)
    theirs.eval()
    their_nmse = val_nmse(lambda x: theirs(x)[0], x_val)
    our_rates.append(run_ours_rate())
    our_rate = float(np.mean(our_rates))
    ours, _ = load_checkpoint(OUR_CHECKPOINT)
    our_best_nmse = val_nmse(ours, x_val)  # the checkpoint keeps the best epoch; theirs is its last one, so
    with open(os.path.join(os.path.dirname(OUR_CHECKPOINT), "metrics.json")) as f:  # compare last with last
        our_nmse = json.load(f)["history"][-1]["val_nmse"]

    print(f"activations: {ACTS} ({len(x_train)} train / {len(x_val)} val tokens, split by example)")
    print(f"M={M} K={K} prefixes={PREFIXES} epochs={EPOCHS} batch={BATCH} lr={LR}, "
          f"torch threads {torch.get_num_threads()}; machine: " + (
              f"LOADED (one busy loop per core, {os.cpu_count()})" if "--loaded" in sys.argv else "no load added"))
    print(f"HypotheSAEs SparseAutoencoder.fit: {their_rate:.0f} tokens/s, val normalized MSE {their_nmse:.4f}")
    print(f"train_sae.py:                      {our_rate:.0f} tokens/s, val normalized MSE {our_nmse:.4f} at the "
          f"last epoch, {our_best_nmse:.4f} at the saved best (runs before and after: {our_rates[0]:.0f}, "
          f"{our_rates[1]:.0f})")
    print(f"speed ratio: {our_rate / their_rate:.2f}x; normalized MSE difference, last epochs (ours - theirs): "
          f"{our_nmse - their_nmse:+.4f}")
    if abs(our_nmse - their_nmse) > 0.01:
        sys.exit(f"the two disagree by {our_nmse - their_nmse:+.4f} normalized MSE: the same math should "
                 f"agree within 0.01")

    if "--memory" in sys.argv:
        big = os.path.join(tempfile.mkdtemp(prefix="bench_train_"), "activations_x4.npz")
        w = StreamingNpzWriter(big, (4 * acts.n_tokens, acts.d), acts.activations.dtype)
        for _ in range(4):
            for s in range(0, acts.n_tokens, 1 << 16):
                w.append(acts.activations[s:s + (1 << 16)])
        offsets = np.concatenate([acts.offsets[:-1] + r * acts.n_tokens for r in range(4)] + [[4 * acts.n_tokens]])
        meta = dict(acts.meta, n_examples=4 * acts.n_examples, n_tokens=4 * acts.n_tokens)
        w.finish(offsets, np.tile(acts.token_ids, 4), np.tile(acts.token_role, 4), np.tile(acts.example_index, 4), meta,
                 np.tile(acts.labels, 4))
        rss = {}
        for name, path in (("1x", ACTS), ("4x", big)):
            out = run_ours(path, f"bench_mem_{name}", timed=True, epochs=2)
            rss[name] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
            print(f"peak RSS of train_sae.py (2 epochs) on {name} file ({os.path.getsize(path) / 2**20:.0f} MiB): "
                  f"{rss[name] / 1024:.0f} MiB")
        print(f"peak memory ratio 4x/1x: {rss['4x'] / rss['1x']:.3f}")
        shutil.rmtree(os.path.dirname(big))


if __name__ == "__main__":
    main()
