"""Load our SAELens exports with SAELens itself, for every variant, and compare codes and reconstructions.

sae-lens pulls transformer-lens and more, so it is not in the test extras; install it beside the project's
requirements (bench/requirements-saelens.txt), then:

    pip install -r bench/requirements-saelens.txt
    python bench/check_saelens_export.py      # after the default extraction: activations/activations_layer12.npz
    python bench/check_saelens_export.py --activations_path=other/activations_layer6.npz
    python bench/check_saelens_export.py --input_norm=none   # other train_sae.py settings for every variant

For each of TopK, Matryoshka TopK, BatchTopK and Matryoshka BatchTopK it runs train_sae.py (a few epochs,
export on), loads the export with `sae_lens.SAE.load_from_disk`, and on held-out tokens compares SAELens'
codes with ours divided by the input scale (the export's units) and its reconstructions with ours; it
checks the decoder rows have unit norm. It exits 1 if any variant differs.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from sae_lens import SAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sae.activations import open_activations  # noqa: E402
from sae.checkpoint import load_checkpoint  # noqa: E402
from sae.files import checkpoint_path  # noqa: E402

VARIANTS = {"TopK": [], "Matryoshka TopK": ["--use_matryoshka=True"],
            "BatchTopK": ["--use_batch_topk=True"], "Matryoshka BatchTopK": ["--use_batch_topk=True", "--use_matryoshka=True"]}


def main():
    work = tempfile.mkdtemp(prefix="check_saelens_")
    acts_path = os.path.abspath(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--activations_path=")),
                                     os.path.join(ROOT, "activations", "activations_layer12.npz")))
    if not os.path.isfile(acts_path):
        sys.exit(f"{acts_path} does not exist: run python extract_activations.py first or pass --activations_path=")
    more = [a for a in sys.argv[1:] if not a.startswith("--activations_path=")]
    acts = open_activations(acts_path)
    x = torch.from_numpy(np.asarray(acts.read_rows(acts.n_tokens - 4096, acts.n_tokens), dtype=np.float32))
    failed = False
    for name, flags in VARIANTS.items():
        run = name.replace(" ", "_")
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_sae.py"), f"--activations_path={acts_path}",
                               "--m=256", "--k=8", "--n_epochs=3", "--eval_lm=False", f"--run_name={run}",
                               "--use_matryoshka=False", *flags, *more], cwd=work, capture_output=True, text=True,
                              env=dict(os.environ, TQDM_DISABLE="1"))
        if proc.returncode:
            sys.exit(f"train_sae.py failed for {name}:\n{proc.stderr[-2000:]}")
        ours, _ = load_checkpoint(os.path.join(work, checkpoint_path(run, 256, 8)))
        theirs = SAE.load_from_disk(os.path.join(work, "checkpoints", run, "saelens_M=256_K=8"))
        with torch.no_grad():
            our_codes, their_codes = ours.encode(x) / ours.scale, theirs.encode(x)
            code_diff = ((our_codes - their_codes).abs().max() / our_codes.abs().max()).item()
            same_active = torch.equal(our_codes > 0, their_codes > 0)
            rel = ((ours(x) - theirs.decode(their_codes)).norm(dim=1) / x.norm(dim=1)).max().item()
            norms = theirs.W_dec.norm(dim=1)
        ok = same_active and code_diff < 1e-4 and rel < 1e-4 and torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        failed |= not ok
        print(f"{name:<21} SAELens {type(theirs).__name__:<12} same active features on {len(x)} tokens: {same_active}; "
              f"max code difference {code_diff:.1e} (relative); max relative reconstruction difference {rel:.1e}; "
              f"decoder row norms {norms.min():.6f}..{norms.max():.6f}; L0 {(their_codes > 0).sum(1).float().mean():.2f}"
              f" -> {'OK' if ok else 'DIFFERS'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
