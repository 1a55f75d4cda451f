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
import contextlib
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
        """x_s − b_pre, in one pass."""
        return torch.addcmul(-self.b_pre_D, x_BD, self.scale)

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

    @torch.no_grad()
    def codes_sparse(self, pre_BM: torch.Tensor):
        """(idx_BJ, vals_BJ): the selected features of each token and their (non-negative) codes."""
        idx_BJ, valid_BJ = self.select(pre_BM)
        vals_BJ = pre_BM.gather(1, idx_BJ).relu_()
        return idx_BJ, vals_BJ if valid_BJ is None else vals_BJ.mul_(valid_BJ)

    @torch.no_grad()
    def encode_sparse(self, x_BD: torch.Tensor):
        return self.codes_sparse(self.pre_acts(x_BD))

    def decode_sparse(self, idx_BJ: torch.Tensor, vals_BJ: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the scaled space: the codes' sum of decoder rows, plus b_pre."""
        return F.embedding_bag(idx_BJ, self.W_dec_MD, per_sample_weights=vals_BJ, mode="sum") + self.b_pre_D

    def prefix_weights(self, idx_BJ: torch.Tensor, vals_BJ: torch.Tensor) -> list[torch.Tensor]:
        """The codes that each Matryoshka prefix keeps: those of features below the prefix's end."""
        return [vals_BJ if p == self.m else vals_BJ * (idx_BJ < p) for p in self.prefixes]

    def decode_prefixes(self, idx_BJ: torch.Tensor, vals_BJ: torch.Tensor) -> list[torch.Tensor]:
        """Scaled-space reconstruction from the first p features, for each Matryoshka prefix p."""
        return [self.decode_sparse(idx_BJ, w_BJ) for w_BJ in self.prefix_weights(idx_BJ, vals_BJ)]

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

    def fired(self, idx_BJ: torch.Tensor, vals_BJ: torch.Tensor) -> torch.Tensor:
        """(M,) whether each feature has a positive code in the batch."""
        return torch.zeros(self.m, dtype=vals_BJ.dtype, device=idx_BJ.device).index_add_(
            0, idx_BJ.reshape(-1), vals_BJ.reshape(-1)) > 0  # codes are >= 0: a positive sum means one fired

    @torch.no_grad()
    def update_dead(self, fired_M: torch.Tensor, combine=None):
        """One training step: features that fired reset to 0, the others age by one step. `combine`
        merges the fired mask over data-parallel processes (a feature fired if it fired anywhere)."""
        if combine is not None:
            fired_M = combine(fired_M)
        self.steps_since_fired.add_(1).masked_fill_(fired_M, 0)

    @torch.no_grad()
    def remove_parallel_grad(self):
        """Drop the gradient component along each decoder row, so a step keeps rows near unit norm."""
        if self.W_dec_MD.grad is not None:
            w = self.W_dec_MD.data
            self.W_dec_MD.grad.addcmul_(torch.linalg.vecdot(self.W_dec_MD.grad, w).unsqueeze(1), w, value=-1)

    @torch.no_grad()
    def normalize_decoder(self):
        w = self.W_dec_MD.data
        w.div_(torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min_(1e-12))


def _sum_sq(t: torch.Tensor) -> torch.Tensor:
    return torch.dot(t.reshape(-1), t.reshape(-1))


def _spread_baseline(t_BD: torch.Tensor) -> torch.Tensor:
    """‖t − batch mean‖², the denominator of the normalized MSE."""
    mean_D = t_BD.mean(0)
    return (_sum_sq(t_BD) - len(t_BD) * _sum_sq(mean_D)).clamp_min(1e-12)


def _rows_times(idx_BJ: torch.Tensor, rows_BJ: torch.Tensor, weights_BJ: torch.Tensor, n_rows: int,
                dense_ND: torch.Tensor, m: int) -> torch.Tensor:
    """(M, D) sum over the entries j of weights_j · dense[rows_j], added into row idx_j: a sparse matmul."""
    indices = torch.stack([idx_BJ.reshape(-1), rows_BJ.reshape(-1)])
    coo = torch.sparse_coo_tensor(indices, weights_BJ.reshape(-1), (m, n_rows), check_invariants=False)
    return torch.sparse.mm(coo, dense_ND)


@torch.no_grad()
def sae_loss(sae: SparseAutoencoder, x_BD: torch.Tensor, dead_M: torch.Tensor | None = None,
             backward: bool = False, autocast=None, fused=None) -> dict:
    """Training objective and its parts; `dead_M` marks dead features for the aux-K term (None: no aux).
    out["sse"] holds each prefix's summed squared error ‖x_s − x̂_p‖² (in the scaled space), out["fired"]
    the features with a positive code.

    With backward=True the gradients of the loss are written to the parameters' .grad, W_dec's with
    each row's radial part removed (remove_parallel_grad), and out["grad_norm"] is their total norm
    (for clipping; with several processes, recompute it after averaging). They are computed by hand
    rather than by autograd: with e_p = x_s − x̂_p the residual of prefix p and β = ‖x_s − mean‖²,
    ∂loss/∂x̂_p = −2 e_p / (P β), and a selected feature of chunk c (the features between two prefix
    ends) receives G_c = Σ_{p ≥ c} ∂loss/∂x̂_p. Then, per selected entry j of token b,
    ∂/∂code_j = ⟨G_c, W_dec[f_j]⟩, ∂/∂W_dec[f_j] += code_j G_c, and through the ReLU the pre-activation
    gradient g_j reaches W_enc[f_j] (+= g_j (x_s − b_pre)), b_enc[f_j] and b_pre (−W_encᵀ ∂b_enc, plus
    Σ_p ∂loss/∂x̂_p). Only the K selected (and aux_k dead) features of each token are touched and no
    graph is kept; tests check it against autograd on the dense formulas. `fused` (sae.fused.FusedStep)
    computes everything after the encoder matmul in one C call, for float32 on a CPU (with or without
    backward)."""
    n_prefixes, (b, d), m = len(sae.prefixes), x_BD.shape, sae.m
    W_enc, b_enc, W_dec = sae.W_enc_MD, sae.b_enc_M, sae.W_dec_MD
    xc_BD = sae.centered(x_BD)
    with autocast or contextlib.nullcontext():
        pre_BM = torch.addmm(b_enc, xc_BD, W_enc.t()).float()
    if fused is not None and xc_BD.device.type == "cpu" and xc_BD.dtype == torch.float32:
        done = fused(xc_BD, pre_BM, W_enc, W_dec, sae.prefixes, sae.k, sae.aux_k, AUX_COEF, dead_M,
                     selected=sae.codes_sparse(pre_BM) if sae.batch_topk else None, grads=backward)
        if done is not None:
            idx_BJ, vals_BJ, fired_M, parts, grads = done
            out = {"loss": parts[n_prefixes + 1].float(), "nmse": parts[n_prefixes - 1].float(),
                   "prefix_nmse": parts[:n_prefixes].float(), "sse": parts[:n_prefixes] * parts[-1],
                   "aux": parts[n_prefixes].float(), "idx": idx_BJ, "vals": vals_BJ, "fired": fired_M}
            if backward:
                for param, grad in zip((W_enc, b_enc, W_dec, sae.b_pre_D), grads):
                    param.grad = grad
                out["grad_norm"] = parts[-2].sqrt().float()
            return out
    idx_BJ, vals_BJ = sae.codes_sparse(pre_BM)
    # residuals of each prefix's reconstruction (the decoded sum without b_pre, subtracted from x_s − b_pre);
    # the decoded sums keep a small graph to their codes, so that embedding_bag's own backward gives
    # ⟨∂loss/∂x̂, W_dec[f_j]⟩ per entry without gathering the decoder rows
    vals_BJ.requires_grad_(backward)
    e_PBD = torch.empty(n_prefixes, b, d, dtype=xc_BD.dtype, device=xc_BD.device)
    with torch.enable_grad():
        bags = [F.embedding_bag(idx_BJ, W_dec, per_sample_weights=w_BJ, mode="sum")
                for w_BJ in sae.prefix_weights(idx_BJ, vals_BJ)]
    for p, bag_BD in enumerate(bags):
        torch.sub(xc_BD, bag_BD.detach(), out=e_PBD[p])
    beta = _spread_baseline(xc_BD)
    sse = torch.stack([_sum_sq(e) for e in e_PBD])
    prefix_nmse = sse / beta
    loss = prefix_nmse.mean()
    aux = torch.zeros((), device=x_BD.device)
    use_aux = dead_M is not None and sae.aux_k > 0 and bool(dead_M.any())
    if use_aux:  # the aux_k largest dead pre-activations reconstruct what the model missed
        aux_idx_BA = pre_BM.masked_fill(~dead_M, float("-inf")).topk(sae.aux_k, dim=-1, sorted=False).indices
        aux_vals_BA = pre_BM.gather(1, aux_idx_BA).relu_().mul_(dead_M[aux_idx_BA])  # fewer dead than aux_k: zeros
        target_BD = e_PBD[-1]
        aux_beta = _spread_baseline(target_BD)
        with torch.enable_grad():
            aux_bag_BD = F.embedding_bag(aux_idx_BA, W_dec, per_sample_weights=aux_vals_BA.requires_grad_(backward),
                                         mode="sum")
        e_aux_BD = target_BD - aux_bag_BD.detach()
        aux = _sum_sq(e_aux_BD) / aux_beta
        loss = loss + AUX_COEF * aux
    out = {"loss": loss, "nmse": prefix_nmse[-1], "prefix_nmse": prefix_nmse, "sse": sse, "aux": aux,
           "idx": idx_BJ, "vals": vals_BJ, "fired": sae.fired(idx_BJ, vals_BJ)}
    if not backward:
        return out

    G_PBD = e_PBD.mul_(-2 / (n_prefixes * beta))  # ∂loss/∂x̂_p
    d_vals_BJ, = torch.autograd.grad(bags, vals_BJ, grad_outputs=list(G_PBD))
    for c in range(n_prefixes - 2, -1, -1):  # now summed over the prefixes at or after p
        G_PBD[c] += G_PBD[c + 1]
    chunk_BJ = torch.bucketize(idx_BJ, torch.tensor(sae.prefixes[:-1], device=idx_BJ.device), right=True)
    tokens_BJ = torch.arange(b, device=idx_BJ.device)[:, None].expand_as(idx_BJ)
    vals_BJ = vals_BJ.detach()
    grad_W_dec = _rows_times(idx_BJ, chunk_BJ * b + tokens_BJ, vals_BJ, n_prefixes * b, G_PBD.view(-1, d), m)
    enc_idx, enc_rows, enc_grads = [idx_BJ], [tokens_BJ], [d_vals_BJ.mul_(vals_BJ > 0)]
    if use_aux:
        g_aux_BD = e_aux_BD.mul_(-2 * AUX_COEF / aux_beta)
        d_aux_BA, = torch.autograd.grad(aux_bag_BD, aux_vals_BA, grad_outputs=g_aux_BD)
        aux_vals_BA = aux_vals_BA.detach()
        tokens_BA = tokens_BJ[:, :1].expand_as(aux_idx_BA)
        grad_W_dec += _rows_times(aux_idx_BA, tokens_BA, aux_vals_BA, b, g_aux_BD, m)
        enc_idx.append(aux_idx_BA)
        enc_rows.append(tokens_BA)
        enc_grads.append(d_aux_BA.mul_(aux_vals_BA > 0))
    enc_idx, enc_rows, enc_grads = (torch.cat(t, 1) for t in (enc_idx, enc_rows, enc_grads))
    grad_b_enc = torch.zeros_like(b_enc).index_add_(0, enc_idx.reshape(-1), enc_grads.reshape(-1))
    sae.W_enc_MD.grad = _rows_times(enc_idx, enc_rows, enc_grads, b, xc_BD, m)
    sae.b_enc_M.grad = grad_b_enc
    sae.W_dec_MD.grad = grad_W_dec
    sae.b_pre_D.grad = G_PBD[0].sum(0) - grad_b_enc @ W_enc
    sae.remove_parallel_grad()
    out["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in sae.parameters()])
    return out
