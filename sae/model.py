"""TopK sparse autoencoders: plain TopK, BatchTopK and Matryoshka share one encode/decode skeleton.

The math is HypotheSAEs' (Movva et al. 2025), itself after Gao et al. 2024 (TopK, aux-K) and Bussmann
et al. 2025 (BatchTopK, Matryoshka). With x the model activation (D) and s the saved input scale:

    x_n     = (x − μ_x) / (σ_x + ε)                   input_norm="layer_norm": each token centred and scaled
                                                      by its own mean and (unbiased) standard deviation over
                                                      the D coordinates, ε = 1e-5 (SAELens' "layer_norm");
                                                      input_norm="none": x_n = x
    x_s     = s · x_n                                 s makes E‖x_s‖² = D, so settings transfer across widths
    pre_M   = W_enc_MD (x_s − b_pre_D) + b_enc_M
    codes_M = ReLU(TopK(pre_M, K))                    TopK: the K largest per token
            = ReLU(pre_M) · [pre_M > threshold]       BatchTopK at inference (training keeps the top K·B
                                                      activations of the whole batch)
    x̂_n     = (W_dec_MDᵀ codes_M + b_pre_D) / s       rows of W_dec_MD have unit norm
    x̂       = x̂_n · σ_x + μ_x                          (layer_norm; as SAELens restores it) or x̂_n

Per-token normalization gives every token the same weight in the loss, where without it the tokens with the
largest norms weigh most. train_sae.py turns it on by default: with plain TopK, on the real development texts
it gave more labels a feature of their own, a lower content MSE and a smaller next-token loss with the SAE
spliced in than Matryoshka on raw tokens (README, "Labels on real texts"). The class's own default stays
"none", which old checkpoints load as.

Loss (all in the scaled space): normalized MSE ‖x − x̂‖² / ‖x − mean_batch(x)‖², averaged over the
Matryoshka prefixes (the reconstruction from the first p features only, for each p in `prefixes`),
plus AUX_COEF × the normalized MSE of reconstructing the residual x − x̂ from the `aux_k` largest
pre-activations among dead features (features that have not fired for `dead_steps` steps).

Codes are kept sparse, as (indices, values) of the J selected features per token (J = K for TopK):
decoding is an embedding-bag sum of J decoder rows. `encode`/`decode` give the dense codes for users.
The objective's gradients and the optimizer update are sae/step.py's (one interface, a PyTorch and a C
implementation).

Everything needed to rebuild a model is in `sae.config` and the state dict (buffers: scale,
threshold, steps_since_fired). No file I/O here.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

AUX_COEF = 1 / 32  # weight of the aux-K loss, as in Gao et al. 2024
THRESHOLD_EMA = 1e-2  # BatchTopK threshold update rate, as in HypotheSAEs
INPUT_NORMS = ("layer_norm", "none")
LN_EPS = 1e-5  # SAELens' layer_norm epsilon, added to each token's standard deviation


def default_prefixes(m: int) -> list[int]:
    """Matryoshka prefixes that follow M: a quarter of the features, then all of them."""
    return [m // 4, m] if m >= 8 else [m]


def check_config(d_in: int, m: int, k: int, prefixes: list[int] | None, aux_k: int,
                 input_norm: str = "none") -> str | None:
    """None when the sizes are consistent, else a sentence saying what is wrong and how to fix it."""
    if input_norm not in INPUT_NORMS:
        return f"INPUT_NORM={input_norm!r} must be one of {', '.join(map(repr, INPUT_NORMS))}"
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
                 prefixes: list[int] | None = None, batch_topk: bool = False, input_norm: str = "none"):
        super().__init__()
        aux_k = 2 * k if aux_k is None else aux_k
        problem = check_config(d_in, m, k, prefixes, aux_k, input_norm)
        assert problem is None, problem
        self.config = {"d_in": d_in, "m": m, "k": k, "aux_k": min(aux_k, m), "dead_steps": dead_steps,
                       "prefixes": list(prefixes) if prefixes else [m], "batch_topk": batch_topk,
                       "input_norm": input_norm}
        self.d_in, self.m, self.k = d_in, m, k
        self.aux_k, self.dead_steps = min(aux_k, m), dead_steps
        self.prefixes = self.config["prefixes"]
        self.batch_topk, self.input_norm = batch_topk, input_norm
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
        """Input scale from the mean squared norm, b_pre from the coordinate-wise median of a sample (both
        of the normalized inputs)."""
        sample_ND = self.normalized(sample_ND.float())
        self.scale.fill_(math.sqrt(self.d_in / sample_ND.pow(2).sum(1).mean().clamp_min(1e-12).item()))
        self.b_pre_D.data = (sample_ND * self.scale).median(dim=0).values.to(self.b_pre_D.device)

    # ---- the skeleton
    def token_stats(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(σ_x, μ_x), each (B, 1), for layer_norm; None without per-token normalization."""
        return torch.std_mean(x_BD, dim=-1, keepdim=True) if self.input_norm == "layer_norm" else None

    def normalized(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x_n: what the SAE reconstructs, before the input scale."""
        stats = self.token_stats(x_BD)
        return x_BD if stats is None else (x_BD - stats[1]) / (stats[0] + LN_EPS)

    def centered(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x_s − b_pre, in one pass after the normalization."""
        return torch.addcmul(-self.b_pre_D, self.normalized(x_BD), self.scale)

    def restore(self, recon_BD: torch.Tensor, x_BD: torch.Tensor | None) -> torch.Tensor:
        """A reconstruction in the scaled space, back in the units of the input x it reconstructs (x is not
        read without per-token normalization)."""
        stats = self.token_stats(x_BD)
        if stats is None:
            return recon_BD / self.scale
        sigma_B1, mu_B1 = stats
        return torch.addcmul(mu_B1, recon_BD, sigma_B1 / self.scale)

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc_M, self.centered(x_BD), self.W_enc_MD.t())

    @torch.no_grad()
    def update_threshold(self, kept_min) -> None:
        """BatchTopK: move the inference threshold toward the smallest code a training batch kept."""
        self.threshold.lerp_(torch.as_tensor(kept_min, dtype=self.threshold.dtype, device=self.threshold.device),
                             THRESHOLD_EMA)

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
                self.update_threshold(kept.min())
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

    def decode(self, codes_BM: torch.Tensor, x_BD: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction from dense codes; with layer_norm, the input x_BD they were encoded from gives each
        token's mean and scale back."""
        if x_BD is None and self.input_norm != "none":
            raise ValueError("decode needs the encoded input x_BD: the SAE normalizes each token "
                             f"(input_norm={self.input_norm!r}) and restores its mean and scale from it")
        return self.restore(codes_BM @ self.W_dec_MD + self.b_pre_D, x_BD)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.restore(self.decode_sparse(*self.encode_sparse(x_BD)), x_BD)

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
