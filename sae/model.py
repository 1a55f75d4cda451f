"""TopK sparse autoencoders: plain TopK, BatchTopK and Matryoshka share one encode/decode skeleton.

The math is HypotheSAEs' (Movva et al. 2025), itself after Gao et al. 2024 (TopK, aux-K) and Bussmann
et al. 2025 (BatchTopK, Matryoshka). With x the model activation (D) and s the saved input scale:

    x_s     = s · x                                   s makes E‖x_s‖² = D, so settings transfer across widths
    pre_M   = W_enc_MD (x_s − b_pre_D) + b_enc_M
    codes_M = ReLU(TopK(pre_M, K))                    TopK: the K largest per token
            = ReLU(pre_M) · [pre_M > threshold]       BatchTopK at inference (training keeps the top K·B
                                                      activations of the whole batch)
    x̂       = (W_dec_MDᵀ codes_M + b_pre_D) / s       rows of W_dec_MD have unit norm

Loss (all in the scaled space): normalized MSE ‖x − x̂‖² / ‖x − mean_batch(x)‖², averaged over the
Matryoshka prefixes (the reconstruction from the first p features only, for each p in `prefixes`),
plus AUX_COEF × the normalized MSE of reconstructing the residual x − x̂ from the `aux_k` largest
pre-activations among dead features (features that have not fired for `dead_steps` steps).

Codes are kept sparse, as (indices, values) of the J selected features per token (J = K for TopK):
decoding is an embedding-bag sum of J decoder rows, and the encoder's backward pass touches only the
selected pre-activations (a sparse matmul) instead of a dense B×M gradient. The math is unchanged;
`encode`/`decode` give the dense codes for users.

Everything needed to rebuild a model is in `sae.config` and the state dict (buffers: scale,
threshold, steps_since_fired). No file I/O here.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

AUX_COEF = 1 / 32  # weight of the aux-K loss, as in Gao et al. 2024
THRESHOLD_EMA = 1e-2  # BatchTopK threshold update rate, as in HypotheSAEs


def default_prefixes(m: int) -> list[int]:
    """Matryoshka prefixes that follow M: a quarter of the features, then all of them."""
    return [m // 4, m] if m >= 8 else [m]


def check_config(d_in: int, m: int, k: int, prefixes: list[int] | None, aux_k: int) -> str | None:
    """None when the sizes are consistent, else a sentence saying what is wrong and how to fix it."""
    if min(d_in, m, k) < 1:
        return f"d_in, M and K must be positive (got d_in={d_in}, M={m}, K={k})"
    if k > m:
        return f"K={k} is larger than M={m}; a token cannot use more features than exist, lower K or raise M"
    if aux_k < 0:
        return f"AUX_K={aux_k} must be >= 0"
    if prefixes is not None:
        if not prefixes or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in prefixes):
            return f"MATRYOSHKA_PREFIXES={prefixes} must be a list of positive ints"
        if any(b <= a for a, b in zip(prefixes, prefixes[1:])):
            return f"MATRYOSHKA_PREFIXES={prefixes} must be strictly increasing"
        if prefixes[-1] != m:
            return f"MATRYOSHKA_PREFIXES={prefixes} must end at M={m}, e.g. [{m // 4}, {m}]"
    return None


class _SelectedPreActs(torch.autograd.Function):
    """pre_BM.gather(1, idx_BJ), where pre_BM = xc_BD W_enc_MDᵀ + b_enc_M was computed without a graph.

    The backward pass is that of the dense expression, computed only at the J selected entries per row:
    grad W_enc = Gᵀ xc as a sparse matmul, grad xc = G W_enc as an embedding-bag sum."""

    @staticmethod
    def forward(ctx, xc_BD, W_enc_MD, b_enc_M, pre_BM, idx_BJ):
        ctx.save_for_backward(xc_BD, W_enc_MD, idx_BJ)
        return pre_BM.gather(1, idx_BJ)

    @staticmethod
    def backward(ctx, g_BJ):
        xc_BD, W_enc_MD, idx_BJ = ctx.saved_tensors
        (b, j), m = idx_BJ.shape, W_enc_MD.shape[0]
        flat_idx, flat_g = idx_BJ.reshape(-1), g_BJ.reshape(-1).to(xc_BD.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_BJ, W_enc_MD, per_sample_weights=g_BJ.to(W_enc_MD.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            rows = torch.arange(b, device=idx_BJ.device).repeat_interleave(j)
            g_MB = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), flat_g, (m, b), check_invariants=False)
            grad_W = torch.sparse.mm(g_MB, xc_BD)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(m, dtype=flat_g.dtype, device=flat_g.device).index_add_(0, flat_idx, flat_g)
        return grad_x, grad_W, grad_b, None, None


class SparseAutoencoder(nn.Module):
    """TopK / BatchTopK / Matryoshka SAE; see the module docstring for the formulas."""

    def __init__(self, d_in: int, m: int, k: int, aux_k: int | None = None, dead_steps: int = 256,
                 prefixes: list[int] | None = None, batch_topk: bool = False):
        super().__init__()
        aux_k = 2 * k if aux_k is None else aux_k
        problem = check_config(d_in, m, k, prefixes, aux_k)
        assert problem is None, problem
        self.config = {"d_in": d_in, "m": m, "k": k, "aux_k": min(aux_k, m), "dead_steps": dead_steps,
                       "prefixes": list(prefixes) if prefixes else [m], "batch_topk": batch_topk}
        self.d_in, self.m, self.k = d_in, m, k
        self.aux_k, self.dead_steps = min(aux_k, m), dead_steps
        self.prefixes = self.config["prefixes"]
        self.batch_topk = batch_topk
        W_dec_MD = F.normalize(torch.randn(m, d_in), dim=1)
        self.W_enc_MD = nn.Parameter(W_dec_MD.clone())  # W_enc = W_decᵀ at the start
        self.b_enc_M = nn.Parameter(torch.zeros(m))
        self.W_dec_MD = nn.Parameter(W_dec_MD)
        self.b_pre_D = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("steps_since_fired", torch.zeros(m, dtype=torch.long))

    # ---- initialisation from data
    @torch.no_grad()
    def init_from_data(self, sample_ND: torch.Tensor):
        """Input scale from the mean squared norm, b_pre from the coordinate-wise median of a sample."""
        sample_ND = sample_ND.float()
        self.scale.fill_(math.sqrt(self.d_in / sample_ND.pow(2).sum(1).mean().clamp_min(1e-12).item()))
        self.b_pre_D.data = (sample_ND * self.scale).median(dim=0).values.to(self.b_pre_D.device)

    # ---- the skeleton
    def centered(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD * self.scale - self.b_pre_D

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc_M, self.centered(x_BD), self.W_enc_MD.t())

    @torch.no_grad()
    def select(self, pre_BM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices of the selected features per token (B, J) and, for BatchTopK, which are real."""
        if not self.batch_topk:
            return pre_BM.topk(self.k, dim=-1, sorted=False).indices, None
        acts_BM = F.relu(pre_BM)
        if self.training:
            flat = acts_BM.flatten()
            vals, idx = flat.topk(min(self.k * pre_BM.shape[0], flat.numel()), sorted=False)
            keep_BM = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, idx[vals > 0], True).view_as(acts_BM)
            kept = vals[vals > 0]
            if kept.numel():
                self.threshold.lerp_(kept.min(), THRESHOLD_EMA)
        else:
            keep_BM = acts_BM > self.threshold
        j = max(int(keep_BM.sum(1).max()), 1)
        valid_BJ, idx_BJ = keep_BM.to(pre_BM.dtype).topk(j, dim=-1, sorted=False)
        return idx_BJ, valid_BJ

    def encode_sparse(self, x_BD: torch.Tensor, with_pre: bool = False):
        """(idx_BJ, vals_BJ): the selected features of each token and their (non-negative) codes;
        with_pre adds the centered input and the dense pre-activations (no graph) for the aux-K loss."""
        xc_BD = self.centered(x_BD)
        with torch.no_grad():
            pre_BM = torch.addmm(self.b_enc_M, xc_BD, self.W_enc_MD.t())
        idx_BJ, valid_BJ = self.select(pre_BM)
        vals_BJ = self.selected_codes(xc_BD, pre_BM, idx_BJ)
        if valid_BJ is not None:
            vals_BJ = vals_BJ * valid_BJ
        return (idx_BJ, vals_BJ, xc_BD, pre_BM) if with_pre else (idx_BJ, vals_BJ)

    def selected_codes(self, xc_BD, pre_BM, idx_BJ) -> torch.Tensor:
        """ReLU of the pre-activations at idx_BJ, differentiable with respect to the encoder."""
        return F.relu(_SelectedPreActs.apply(xc_BD, self.W_enc_MD, self.b_enc_M, pre_BM, idx_BJ))

    def decode_sparse(self, idx_BJ: torch.Tensor, vals_BJ: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the scaled space: the codes' sum of decoder rows, plus b_pre."""
        return F.embedding_bag(idx_BJ, self.W_dec_MD, per_sample_weights=vals_BJ, mode="sum") + self.b_pre_D

    def decode_prefixes(self, idx_BJ: torch.Tensor, vals_BJ: torch.Tensor) -> list[torch.Tensor]:
        """Scaled-space reconstruction from the first p features, for each Matryoshka prefix p.

        Each selected entry belongs to exactly one prefix chunk [p_prev, p), so the chunks are decoded
        as separate bags and summed cumulatively: the cost of one decode whatever the number of prefixes."""
        if len(self.prefixes) == 1:
            return [self.decode_sparse(idx_BJ, vals_BJ)]
        b = idx_BJ.shape[0]
        bounds = torch.tensor(self.prefixes[:-1], device=idx_BJ.device)
        chunk_BJ = torch.bucketize(idx_BJ, bounds, right=True)
        recon_BD, out = self.b_pre_D.expand(b, -1), []
        for c in range(len(self.prefixes)):
            mask_BJ = chunk_BJ == c
            counts_B = mask_BJ.sum(1)
            offsets_B = torch.cumsum(counts_B, 0) - counts_B  # entries come out row by row
            recon_BD = recon_BD + F.embedding_bag(idx_BJ[mask_BJ], self.W_dec_MD, offsets=offsets_B,
                                                  per_sample_weights=vals_BJ[mask_BJ], mode="sum")
            out.append(recon_BD)
        return out

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes (B, M)."""
        idx_BJ, vals_BJ = self.encode_sparse(x_BD)
        return torch.zeros(x_BD.shape[0], self.m, dtype=vals_BJ.dtype, device=vals_BJ.device).scatter(1, idx_BJ, vals_BJ)

    def decode(self, codes_BM: torch.Tensor) -> torch.Tensor:
        return (codes_BM @ self.W_dec_MD + self.b_pre_D) / self.scale

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decode_sparse(*self.encode_sparse(x_BD)) / self.scale

    # ---- training helpers
    def dead_mask(self) -> torch.Tensor:
        return self.steps_since_fired >= self.dead_steps

    @torch.no_grad()
    def update_dead(self, idx_BJ: torch.Tensor, vals_BJ: torch.Tensor, combine=None):
        """One training step: features that fired reset to 0, the others age by one step. `combine`
        merges the fired mask over data-parallel processes (a feature fired if it fired anywhere)."""
        fired_M = torch.zeros(self.m, dtype=torch.bool, device=idx_BJ.device).index_fill_(0, idx_BJ[vals_BJ > 0], True)
        if combine is not None:
            fired_M = combine(fired_M)
        self.steps_since_fired.add_(1).masked_fill_(fired_M, 0)

    @torch.no_grad()
    def remove_parallel_grad(self):
        """Drop the gradient component along each decoder row, so a step keeps rows near unit norm."""
        if self.W_dec_MD.grad is not None:
            w = self.W_dec_MD.data
            self.W_dec_MD.grad -= (self.W_dec_MD.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec_MD.data = F.normalize(self.W_dec_MD.data, dim=1)


def normalized_mse(pred_BD: torch.Tensor, target_BD: torch.Tensor, baseline=None) -> torch.Tensor:
    """‖target − pred‖² over ‖target − batch mean‖² (1 = no better than predicting the mean)."""
    if baseline is None:
        baseline = (target_BD - target_BD.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return F.mse_loss(pred_BD, target_BD, reduction="sum") / baseline


def sae_loss(sae: SparseAutoencoder, x_BD: torch.Tensor, dead_M: torch.Tensor | None = None) -> dict:
    """Training objective and its parts. `dead_M` marks dead features for the aux-K term (None: no aux)."""
    x_s_BD = x_BD * sae.scale
    idx_BJ, vals_BJ, xc_BD, pre_BM = sae.encode_sparse(x_BD, with_pre=True)
    recons = sae.decode_prefixes(idx_BJ, vals_BJ)
    baseline = (x_s_BD - x_s_BD.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    prefix_nmse = torch.stack([normalized_mse(r, x_s_BD, baseline) for r in recons])
    loss = prefix_nmse.mean()
    aux = torch.zeros((), device=x_BD.device)
    if dead_M is not None and sae.aux_k > 0 and bool(dead_M.any()):
        aux_idx_BA = pre_BM.masked_fill(~dead_M, float("-inf")).topk(sae.aux_k, dim=-1, sorted=False).indices
        aux_vals_BA = sae.selected_codes(xc_BD, pre_BM, aux_idx_BA) * dead_M[aux_idx_BA]  # fewer dead features than aux_k: pad with zeros
        aux_recon_BD = F.embedding_bag(aux_idx_BA, sae.W_dec_MD, per_sample_weights=aux_vals_BA, mode="sum")
        aux = normalized_mse(aux_recon_BD, x_s_BD - recons[-1].detach())
        loss = loss + AUX_COEF * aux
    return {"loss": loss, "nmse": prefix_nmse[-1], "prefix_nmse": prefix_nmse, "aux": aux,
            "idx": idx_BJ, "vals": vals_BJ}
