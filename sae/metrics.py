"""How well an SAE reconstructs activations: running sums that merge batch by batch, and the per-epoch
and final reconstruction metrics of a set of examples (on the trained-on tokens, the left-out ones,
content tokens, and each kind of token)."""
import numpy as np
import torch
import torch.nn.functional as F

from .activations import Activations
from .model import SparseAutoencoder
from .selection import TokenSelection
from .step import TorchStep
from .stream import eval_batches

TOKEN_KINDS = ("first", "special", "system", "user", "assistant")  # each example's first token, then role codes 0..3


class ReconStats:
    """Running sums for MSE, normalized MSE (against the mean of the same tokens), relative error
    (against predicting zero: for sets of near-identical tokens, such as first tokens) and L0. The
    spread around the mean is merged batch by batch (Chan et al.'s pairwise update), so float32 sums
    of centred values suffice."""

    def __init__(self, d: int, n_prefixes: int = 1):
        self.n = 0
        self.sse = np.zeros(n_prefixes)
        self.mean = np.zeros(d)
        self.spread = 0.0  # Σ‖x − mean‖²
        self.sum_x2 = 0.0
        self.l0 = 0.0

    def add(self, x_BD: torch.Tensor, recon_PBD: list[torch.Tensor], l0_B: torch.Tensor):
        self.add_errors(x_BD, [F.mse_loss(r, x_BD, reduction="sum").item() for r in recon_PBD], l0_B)

    def add_errors(self, x_BD: torch.Tensor, sse_P, l0_B: torch.Tensor):
        """Tokens x with the summed squared reconstruction error of each prefix."""
        if len(x_BD) == 0:
            return
        b, total = len(x_BD), self.n + len(x_BD)
        self.sse += np.asarray(sse_P, dtype=np.float64)
        mean_D = x_BD.mean(0)
        delta = mean_D.double().cpu().numpy() - self.mean
        self.spread += F.mse_loss(x_BD, mean_D.expand_as(x_BD), reduction="sum").item() + \
            float(delta @ delta) * self.n * b / total
        self.mean += delta * b / total
        self.n = total
        self.sum_x2 += torch.linalg.vector_norm(x_BD).item() ** 2
        self.l0 += l0_B.sum().item()

    def result(self) -> dict:
        if self.n == 0:
            return {"tokens": 0}
        d, ss_total = len(self.mean), self.spread
        if ss_total <= 1e-6 * self.sum_x2:  # all alike (e.g. first tokens): no variance to normalize by
            nmse = np.full_like(self.sse, np.nan)
        else:
            nmse = self.sse / ss_total
        nmse = [None if np.isnan(v) else float(v) for v in nmse]  # None, not NaN: metrics.json stays valid JSON
        return {"tokens": self.n, "mse": float(self.sse[-1] / (self.n * d)), "nmse": nmse[-1],
                "relative_error": float(self.sse[-1] / max(self.sum_x2, 1e-12)), "prefix_nmse": nmse,
                "l0": self.l0 / self.n}


def _without_prefixes(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "prefix_nmse"}


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, acts: Activations, ids: np.ndarray, selection: TokenSelection,
                           step: TorchStep, device: torch.device, chunk_tokens: int, full: bool = False) -> dict:
    """ReconStats.result() of the selected tokens of the given examples. Without full: the per-epoch
    validation, through `step` without gradients, so on the tokens as the SAE reconstructs them (x_n, each
    token layer-normed when the SAE does so): the training objective. With full: on the activations
    themselves, and also "left_out" (the tokens the selection leaves out), "content" (user and assistant
    turns), "by_token_kind" (each position shared by several examples counted once) and "never_fired_ratio"
    (features that fire on none of the selected tokens)."""
    was_training = sae.training
    sae.eval()  # BatchTopK: the inference threshold, which training batches would move
    kept, left = ReconStats(acts.d, len(sae.prefixes)), ReconStats(acts.d, len(sae.prefixes))
    content = ReconStats(acts.d)
    kinds = {kind: ReconStats(acts.d) for kind in TOKEN_KINDS}
    fired = torch.zeros(sae.m, dtype=torch.bool, device=device)
    for x, keep, rows in eval_batches(acts, ids, selection, chunk_tokens):
        x, keep = x.to(device), keep.to(device)
        if not full:  # the trained-on tokens' errors, without building reconstructions
            x = x[keep]
            if len(x):
                out = step(sae, x)
                kept.add_errors(sae.normalized(x), (out.sse / sae.scale.double() ** 2).tolist(), (out.vals > 0).sum(1))
            continue
        idx, vals = sae.encode_sparse(x)
        recons = [sae.restore(r, x) for r in sae.decode_prefixes(idx, vals)]
        l0 = (vals > 0).sum(1)
        kept.add(x[keep], [r[keep] for r in recons], l0[keep])
        left.add(x[~keep], [r[~keep] for r in recons], l0[~keep])
        fired[idx[keep][vals[keep] > 0]] = True
        sel = torch.from_numpy(rows.content).to(device)
        content.add(x[sel], [recons[-1][sel]], l0[sel])
        kind = np.where(rows.first, 0, np.asarray(rows.roles, dtype=np.int64) + 1)
        kind[rows.duplicate] = -1  # a copy of an earlier example's position: counted once
        for k, name in enumerate(TOKEN_KINDS):
            sel = torch.from_numpy(kind == k).to(device)
            kinds[name].add(x[sel], [recons[-1][sel]], l0[sel])
    sae.train(was_training)
    out = kept.result()
    if full:
        out["never_fired_ratio"] = 1 - fired.float().mean().item()
        out["left_out"] = left.result()
        out["content"] = _without_prefixes(content.result())
        out["by_token_kind"] = {name: _without_prefixes(s.result()) for name, s in kinds.items()}
    return out
