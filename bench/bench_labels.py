"""What the features say about the labels: train_sae.py against HypotheSAEs on the same real activations.

Extracts the real development texts (../shared/data/cognitive_actions_real_dev.jsonl: 450 texts, 10 per
label) with the default model, trains our SAE with the default settings (LM evaluation off), then
HypotheSAEs' SparseAutoencoder.fit with the same M, K, Matryoshka prefixes as ours (none for a plain TopK
SAE), batch size, learning rate and number of epochs on the same training examples (every token but the
attention sinks, as its users feed it). Both are then measured by the same functions on the same examples:
- labels covered: how many labels are some feature's own best label at AUROC >= 0.8 (per-example maxima
  over content tokens, all examples), and the same count on per-example mean codes;
- the linear probe on those maxima and on the mean codes, on the validation examples, beside the probe on
  mean-pooled raw activations; and the same three probes cross-validated over all examples (10 folds), whose
  450 held-out scores make the ratio to the raw probe far less noisy than the 45 validation examples do (the
  SAE never saw a label, so scoring texts it was trained on leaks no label); beside them the same probe on
  the raw activations max-pooled as the maxima are, which says what that pooling alone costs;
- the normalized MSE on the validation examples' content tokens.

    python bench/bench_labels.py                  # seeds 0, 1, 2; work files under $TMPDIR/bench_labels
    python bench/bench_labels.py --seeds=0 --dataset=path/to/other.jsonl
    python bench/bench_labels.py --seeds=0,1,2,3,4,5,6          # the seeds of the README's figures
    python bench/bench_labels.py --seeds=0,1,2,3,4,5,6 --input_norm=none   # ours with other settings

One split of 45 validation examples for 45 labels makes one run's figures noisy (the label count moves
by ±3 and the probe ratio by ±0.3 between seeds), hence several seeds, their means, and the paired
difference of the label counts with its standard error.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from peer import load_hypothesaes  # noqa: E402
from sae.activations import open_activations  # noqa: E402
from sae.checkpoint import load_checkpoint  # noqa: E402
from sae.data import sha256_file  # noqa: E402
from sae.files import checkpoint_path  # noqa: E402
from sae.features import auroc, example_features, label_metrics, labels_covered  # noqa: E402
from sae.probe import cross_validated_accuracy  # noqa: E402
from sae.selection import TokenSelection  # noqa: E402
from sae.stream import eval_batches, split_examples  # noqa: E402

DATASET = os.path.join(ROOT, "..", "shared", "data", "cognitive_actions_real_dev.jsonl")
M, K, BATCH, LR, SEED, VAL_FRACTION = 256, 8, 512, 5e-4, 0, 0.1
CV_FOLDS = 10  # the probe cross-validated over all examples: 450 held-out scores instead of 45


def run(script, *args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode:
        sys.exit(f"{script} failed:\n{proc.stderr[-3000:]}")
    return proc


class Theirs:
    """HypotheSAEs' model seen through the two things our measures call: m and encode_sparse."""

    def __init__(self, model):
        self.model, self.m = model, model.m_total_neurons

    @torch.no_grad()
    def encode_sparse(self, x):
        _, info = self.model(x)
        vals, idx = info["activations"].topk(self.model.k_active_neurons, dim=-1)
        return idx, vals


def measure(sae, recon, acts, train_ids, val_ids, seed):
    """train_sae.py's label metrics (the same function), the probe cross-validated over all examples, and
    the content normalized MSE on validation."""
    ex = example_features(sae, acts, TokenSelection(acts, "distinct"), "content")
    lab = label_metrics(ex, acts.labels, train_ids, val_ids)
    cv = {name: cross_validated_accuracy(x, acts.labels, CV_FOLDS, seed)
          for name, x in (("max", ex.max_NM), ("mean", ex.mean_NM), ("raw", ex.mean_ND))}
    covered_by_means = len(labels_covered(*auroc(ex.mean_NM, acts.labels), lab["auroc_threshold"]))
    content = TokenSelection(acts, "content", [val_ids])
    x = torch.cat([x[keep] for x, keep, _ in eval_batches(acts, val_ids, content)])
    with torch.no_grad():
        err = (x.double() - recon(x).double()).pow(2).sum()
    nmse = float(err / (x.double() - x.double().mean(0)).pow(2).sum())
    return {"covered": lab["labels_covered"], "n_labels": lab["n_labels"], "probe": lab["probe_sae_accuracy"],
            "covered_by_means": covered_by_means, "probe_means": lab["probe_sae_mean_accuracy"],
            "raw": lab["probe_raw_accuracy"], "cv": cv,
            "mean_best_auroc": lab["mean_best_auroc"], "content_nmse": nmse}


def raw_maxima(acts) -> np.ndarray:
    """(N, D) each example's raw activations max-pooled over its content tokens, as the feature maxima are."""
    max_ND = torch.full((acts.n_examples, acts.d), float("-inf"))
    first_row = 0  # eval_batches walks all examples in file order, so chunks are consecutive rows
    for x, _, rows in eval_batches(acts, np.arange(acts.n_examples), TokenSelection(acts, "distinct")):
        content = torch.from_numpy(rows.content)
        example_of_row = torch.from_numpy(acts.examples_of_rows(np.arange(first_row, first_row + len(x))))
        index = example_of_row[content][:, None].expand(-1, acts.d)
        max_ND.scatter_reduce_(0, index, x[content], "amax")
        first_row += len(x)
    return torch.nan_to_num(max_ND, neginf=0.0).numpy()  # an example without content tokens: zeros, as its means


def one_seed(acts_path, work, seed, raw_max_ND, variant=()):
    """(ours, theirs, raw probe accuracy) for one seed (the split and both initialisations); `raw_max_ND`: the
    raw_maxima of the file (the same for every seed); `variant`: more train_sae.py settings for ours."""
    run("train_sae.py", *variant, f"--activations_path={acts_path}", f"--run_name=bench_labels_{seed}", "--eval_lm=False",
        "--export_saelens=False", f"--m={M}", f"--k={K}", f"--seed={seed}",
        cwd=work)
    path = checkpoint_path(f"bench_labels_{seed}", M, K, root=os.path.join(work, "checkpoints"))
    with open(os.path.join(os.path.dirname(path), "metrics.json")) as f:
        epochs = json.load(f)["epochs"]
    ours, _ = load_checkpoint(path)

    acts = open_activations(acts_path)
    train_ids, val_ids = split_examples(acts.n_examples, acts.labels, VAL_FRACTION, seed)
    no_first = TokenSelection(acts, "no_first")
    x_train = torch.cat([x[keep] for x, keep, _ in eval_batches(acts, train_ids, no_first)])
    x_val = torch.cat([x[keep] for x, keep, _ in eval_batches(acts, val_ids, no_first)])
    torch.manual_seed(seed)
    prefixes = ours.prefixes if len(ours.prefixes) > 1 else None  # HypotheSAEs' plain TopK takes None
    model = load_hypothesaes().SparseAutoencoder(acts.d, M, K, prefix_lengths=prefixes, device="cpu")
    model.fit(x_train, x_val, batch_size=BATCH, learning_rate=LR, n_epochs=epochs, patience=epochs + 1,
              show_progress=False)
    model.eval()
    a = measure(ours, ours, acts, train_ids, val_ids, seed)
    b = measure(Theirs(model), lambda x: model(x)[0], acts, train_ids, val_ids, seed)
    raw = a["raw"]  # the same for both: mean-pooled activations of the same examples
    a["cv"]["raw_max"] = b["cv"]["raw_max"] = cross_validated_accuracy(raw_max_ND, acts.labels, CV_FOLDS, seed)
    print(f"seed {seed}: {epochs} epochs (ours, early stopping; theirs the same count), prefixes {prefixes}, "
          f"{len(val_ids)} validation examples, raw probe {100 * raw:.1f}%; {CV_FOLDS}-fold over all examples: "
          f"raw mean-pooled {100 * a['cv']['raw']:.1f}%, raw max-pooled {100 * a['cv']['raw_max']:.1f}%", flush=True)
    for name, r in (("train_sae.py", a), ("HypotheSAEs", b)):
        print(f"  {name:<13} labels covered {r['covered']:>2} of {r['n_labels']} ({r['covered_by_means']} by mean "
              f"codes); mean best AUROC {r['mean_best_auroc']:.3f}; probe on maxima {100 * r['probe']:.1f}% ({r['probe'] / raw:.2f} of raw), "
              f"on means {100 * r['probe_means']:.1f}% ({r['probe_means'] / raw:.2f}); {CV_FOLDS}-fold over all "
              f"examples: maxima {100 * r['cv']['max']:.1f}%, means {100 * r['cv']['mean']:.1f}%, raw "
              f"{100 * r['cv']['raw']:.1f}%; content normalized MSE {r['content_nmse']:.4f}", flush=True)
    return a, b, raw


def main():
    dataset = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--dataset=")), DATASET)
    if not os.path.isfile(dataset):
        sys.exit(f"--dataset={dataset} does not exist: pass the path of a JSONL file with text and label fields")
    seeds_arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--seeds=")), "0,1,2")
    try:
        seeds = [int(v) for v in seeds_arg.split(",")]
    except ValueError:
        sys.exit(f"--seeds={seeds_arg} is not a list of whole numbers: pass e.g. --seeds=0,1,2")
    variant = [a for a in sys.argv[1:] if not a.startswith(("--dataset=", "--seeds="))]  # e.g. --input_norm=none
    work = os.path.join(tempfile.gettempdir(), "bench_labels")
    os.makedirs(work, exist_ok=True)
    acts_path = os.path.join(work, "activations", "activations_layer12.npz")
    if not os.path.isfile(acts_path) or open_activations(acts_path).meta.get("dataset_sha256") != sha256_file(dataset):
        run("extract_activations.py", f"--dataset_path={os.path.abspath(dataset)}", cwd=work)
    acts = open_activations(acts_path)
    print(f"data: {dataset} ({acts.n_examples} examples, {acts.n_tokens} tokens); M={M} K={K}; "
          f"seeds {seeds} (each: the split and both initialisations); ours with "
          f"{' '.join(variant) or 'the default settings'}", flush=True)
    raw_max_ND = raw_maxima(acts)
    results = [one_seed(acts_path, work, seed, raw_max_ND, variant) for seed in seeds]
    ours, theirs, raws = zip(*results)
    for name, rs in (("train_sae.py", ours), ("HypotheSAEs", theirs)):
        covered, by_means = [r["covered"] for r in rs], [r["covered_by_means"] for r in rs]
        maxima, means = (np.mean([r[key] for r in rs]) / np.mean(raws) for key in ("probe", "probe_means"))
        cv = {k: np.mean([r["cv"][k] for r in rs]) for k in ("max", "mean", "raw", "raw_max")}
        print(f"{name:<13} mean over seeds: labels covered {np.mean(covered):.1f} (runs {covered}), by mean codes "
              f"{np.mean(by_means):.1f} (runs {by_means}); probe on maxima "
              f"{maxima:.2f} of raw, on means {means:.2f} (ratios of the mean accuracies; {CV_FOLDS}-fold over all "
              f"examples: {cv['max'] / cv['raw']:.2f} and {cv['mean'] / cv['raw']:.2f}; raw max-pooled "
              f"{cv['raw_max'] / cv['raw']:.2f}); content normalized MSE "
              f"{np.mean([r['content_nmse'] for r in rs]):.4f}")
    diff = np.array([a["covered"] - b["covered"] for a, b in zip(ours, theirs)], dtype=float)
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    print(f"labels covered, ours - theirs (paired by seed): {diff.mean():+.1f} ± {se:.1f} (standard error over "
          f"{len(diff)} seeds; a lead smaller than about two of these is within the seeds' noise)")


if __name__ == "__main__":
    main()
