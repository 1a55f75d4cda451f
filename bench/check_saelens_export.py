"""Load an exported SAE with SAELens itself and compare its reconstructions with ours.

Needs sae-lens, which pulls transformer-lens and more, so it is not part of the test extras:
    pip install sae-lens
    python bench/check_saelens_export.py checkpoints/cognitive_actions/SAE_M=256_K=8.pt
"""
import os
import sys

import numpy as np
import torch
from sae_lens import SAE

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sae.activations import open_activations  # noqa: E402
from sae.checkpoint import load_checkpoint  # noqa: E402

path = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/cognitive_actions/SAE_M=256_K=8.pt"
ours, ckpt = load_checkpoint(path)
folder = os.path.join(os.path.dirname(path), f"saelens_M={ours.m}_K={ours.k}")
theirs = SAE.load_from_disk(folder)
acts = open_activations(ckpt["provenance"]["activations_path"])
x = torch.from_numpy(np.asarray(acts.activations[:4096], dtype=np.float32))
with torch.no_grad():
    a, b = ours(x), theirs(x)
    same = torch.equal(ours.encode(x) > 0, theirs.encode(x) > 0)
rel = ((a - b).norm(dim=1) / x.norm(dim=1)).max().item()
print(f"SAELens {type(theirs).__name__} from {folder}: same active features on {len(x)} tokens: {same}; "
      f"max relative reconstruction difference {rel:.2e}")
