"""One training step of the SAE behind one interface: the objective of sae/model.py on a batch, its
gradients, and the optimizer update. Two implementations give the same `StepResult` on the same batch:
`TorchStep` (here; any device and dtype) and `CStep` (sae/c_step.py; float32 on a CPU, about twice as
fast there). Tests hold both against dense autograd.

    step, note = pick_step(device)                         # CStep where the C library builds, else TorchStep
    out = step(sae, x_BD, sae.dead_mask(), backward=True)  # StepResult; the gradients are in each .grad
    step.update(sae, optimizer, max_norm, out.grad_norm)   # clipping, Adam, unit-norm decoder rows
    out = step(sae, x_BD)                                  # evaluation: the loss and its parts only

The gradients are written by hand rather than by autograd: with e_p = x_s − x̂_p the residual of prefix
p and β = ‖x_s − mean‖², ∂loss/∂x̂_p = −2 e_p / (P β), and a selected feature of chunk c (the features
between two prefix ends) receives G_c = Σ_{p ≥ c} ∂loss/∂x̂_p. Then, per selected entry j of token b,
∂/∂code_j = ⟨G_c, W_dec[f_j]⟩, ∂/∂W_dec[f_j] += code_j G_c, and through the ReLU the pre-activation
gradient g_j reaches W_enc[f_j] (+= g_j (x_s − b_pre)), b_enc[f_j] and b_pre (−W_encᵀ ∂b_enc, plus
Σ_p ∂loss/∂x̂_p). The aux-K term adds the same for its dead features. Only the K selected (and aux_k
dead) features of each token are touched and no B×M graph is kept; W_dec's gradient has each row's
radial part removed (SparseAutoencoder.remove_parallel_grad).
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import AUX_COEF, SparseAutoencoder


@dataclass
class StepResult:
    """The objective and its parts on one batch (P = number of Matryoshka prefixes, J = selected per token).

    loss:        () float32, mean over prefixes of the normalized MSE + AUX_COEF · aux
    prefix_nmse: (P,) float32, normalized MSE of each prefix's reconstruction (the last: the whole SAE)
    sse:         (P,) float64, summed squared error ‖x_s − x̂_p‖² of each prefix, in the scaled space
    aux:         () float32, normalized MSE of the aux-K reconstruction of the residual (0: no dead
                 features, or no backward)
    idx, vals:   (B, J) the selected features of each token and their codes (0: not a real entry)
    fired:       (M,) bool, the features with a positive code in the batch
    grad_norm:   () total norm of the gradients written to .grad; None when they were not computed
    """
    loss: torch.Tensor
    prefix_nmse: torch.Tensor
    sse: torch.Tensor
    aux: torch.Tensor
    idx: torch.Tensor
    vals: torch.Tensor
    fired: torch.Tensor
    grad_norm: torch.Tensor | None = None

    @property
    def nmse(self) -> torch.Tensor:
        return self.prefix_nmse[-1]


def pre_activations(sae: SparseAutoencoder, x_BD: torch.Tensor, autocast=None):
    """(x_s − b_pre, pre-activations in float32): the dense encoder matmul both steps start from."""
    xc_BD = sae.centered(x_BD)
    with autocast or contextlib.nullcontext():
        pre_BM = torch.addmm(sae.b_enc_M, xc_BD, sae.W_enc_MD.t()).float()
    return xc_BD, pre_BM


class TorchStep:
    """The training step in PyTorch operations (any device; bfloat16 autocast on CUDA)."""
    name = "PyTorch"

    @torch.no_grad()
    def __call__(self, sae: SparseAutoencoder, x_BD: torch.Tensor, dead_M: torch.Tensor | None = None,
                 backward: bool = False, autocast=None) -> StepResult:
        """The objective on x_BD. With `backward` the gradients are written to the parameters' .grad and
        their norm to grad_norm, and `dead_M` marks the dead features of the aux-K term (None: no aux
        term); without, aux is 0 and loss is the prefixes' mean (evaluation)."""
        return torch_step(sae, *pre_activations(sae, x_BD, autocast), dead_M, backward)

    @staticmethod
    def update(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, max_norm: float, grad_norm):
        """Clip the gradients to max_norm (their total norm is grad_norm), step, renormalise the decoder rows."""
        torch.nn.utils.clip_grads_with_norm_(sae.parameters(), max_norm, grad_norm)
        optimizer.step()
        sae.normalize_decoder()


def pick_step(device: torch.device) -> tuple[TorchStep, str | None]:
    """The C step on a CPU where it can be built, else the PyTorch step and, on a CPU, the reason."""
    if device.type != "cpu":
        return TorchStep(), None
    from .c_step import load_c_step
    step, why_not = load_c_step()
    return (step, None) if step is not None else (TorchStep(), why_not)


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


def _aux_codes(sae: SparseAutoencoder, pre_BM: torch.Tensor, dead_M: torch.Tensor):
    """The aux_k largest dead pre-activations of each token, ReLU'd (zeros where fewer are dead)."""
    aux_idx_BA = pre_BM.masked_fill(~dead_M, float("-inf")).topk(sae.aux_k, dim=-1, sorted=False).indices
    return aux_idx_BA, pre_BM.gather(1, aux_idx_BA).relu_().mul_(dead_M[aux_idx_BA])


@torch.no_grad()
def torch_step(sae: SparseAutoencoder, xc_BD: torch.Tensor, pre_BM: torch.Tensor, dead_M: torch.Tensor | None,
               backward: bool) -> StepResult:
    """TorchStep after the encoder matmul (the module docstring derives the gradients)."""
    n_prefixes, (b, d) = len(sae.prefixes), xc_BD.shape
    idx_BJ, vals_BJ = sae.codes_sparse(pre_BM)
    # residuals of each prefix's reconstruction (the decoded sum without b_pre, subtracted from x_s − b_pre);
    # the decoded sums keep a small graph to their codes, so that embedding_bag's own backward gives
    # ⟨∂loss/∂x̂, W_dec[f_j]⟩ per entry without gathering the decoder rows
    vals_BJ.requires_grad_(backward)
    e_PBD = torch.empty(n_prefixes, b, d, dtype=xc_BD.dtype, device=xc_BD.device)
    with torch.enable_grad():
        bags = [F.embedding_bag(idx_BJ, sae.W_dec_MD, per_sample_weights=w_BJ, mode="sum")
                for w_BJ in sae.prefix_weights(idx_BJ, vals_BJ)]
    for p, bag_BD in enumerate(bags):
        torch.sub(xc_BD, bag_BD.detach(), out=e_PBD[p])
    beta = _spread_baseline(xc_BD)
    sse = torch.stack([_sum_sq(e) for e in e_PBD])
    prefix_nmse = sse / beta
    loss = prefix_nmse.mean()
    aux = torch.zeros((), device=xc_BD.device)
    use_aux = backward and dead_M is not None and sae.aux_k > 0 and bool(dead_M.any())
    if use_aux:  # the aux_k largest dead pre-activations reconstruct what the model missed
        aux_idx_BA, aux_vals_BA = _aux_codes(sae, pre_BM, dead_M)
        target_BD = e_PBD[-1]
        aux_beta = _spread_baseline(target_BD)
        with torch.enable_grad():
            aux_bag_BD = F.embedding_bag(aux_idx_BA, sae.W_dec_MD,
                                         per_sample_weights=aux_vals_BA.requires_grad_(backward), mode="sum")
        e_aux_BD = target_BD - aux_bag_BD.detach()
        aux = _sum_sq(e_aux_BD) / aux_beta
        loss = loss + AUX_COEF * aux
    out = StepResult(loss.float(), prefix_nmse.float(), sse.double(), aux.float(), idx_BJ, vals_BJ.detach(),
                     sae.fired(idx_BJ, vals_BJ.detach()))
    if backward:
        _write_grads(sae, xc_BD, idx_BJ, vals_BJ, bags, e_PBD, beta,
                     (aux_idx_BA, aux_vals_BA, aux_bag_BD, e_aux_BD, aux_beta) if use_aux else None)
        out.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in sae.parameters()])
    return out


def _write_grads(sae: SparseAutoencoder, xc_BD, idx_BJ, vals_BJ, bags, e_PBD, beta, aux):
    """The backward pass of torch_step, written to the parameters' .grad (the module docstring derives it).
    `bags` are the prefixes' decoded sums with their graph to vals_BJ, `e_PBD` the prefixes' residuals
    (overwritten), `aux` (aux_idx_BA, aux_vals_BA, aux_bag_BD, e_aux_BD, aux_beta) or None."""
    n_prefixes, (b, d), m = len(sae.prefixes), xc_BD.shape, sae.m
    G_PBD = e_PBD.mul_(-2 / (n_prefixes * beta))  # ∂loss/∂x̂_p
    d_vals_BJ, = torch.autograd.grad(bags, vals_BJ, grad_outputs=list(G_PBD))
    for c in range(n_prefixes - 2, -1, -1):  # now summed over the prefixes at or after p
        G_PBD[c] += G_PBD[c + 1]
    chunk_BJ = torch.bucketize(idx_BJ, torch.tensor(sae.prefixes[:-1], device=idx_BJ.device), right=True)
    tokens_BJ = torch.arange(b, device=idx_BJ.device)[:, None].expand_as(idx_BJ)
    vals_BJ = vals_BJ.detach()
    grad_W_dec = _rows_times(idx_BJ, chunk_BJ * b + tokens_BJ, vals_BJ, n_prefixes * b, G_PBD.view(-1, d), m)
    enc_idx, enc_rows, enc_grads = [idx_BJ], [tokens_BJ], [d_vals_BJ.mul_(vals_BJ > 0)]
    if aux is not None:
        aux_idx_BA, aux_vals_BA, aux_bag_BD, e_aux_BD, aux_beta = aux
        g_aux_BD = e_aux_BD.mul_(-2 * AUX_COEF / aux_beta)
        d_aux_BA, = torch.autograd.grad(aux_bag_BD, aux_vals_BA, grad_outputs=g_aux_BD)
        aux_vals_BA = aux_vals_BA.detach()
        tokens_BA = tokens_BJ[:, :1].expand_as(aux_idx_BA)
        grad_W_dec += _rows_times(aux_idx_BA, tokens_BA, aux_vals_BA, b, g_aux_BD, m)
        enc_idx.append(aux_idx_BA)
        enc_rows.append(tokens_BA)
        enc_grads.append(d_aux_BA.mul_(aux_vals_BA > 0))
    enc_idx, enc_rows, enc_grads = (torch.cat(t, 1) for t in (enc_idx, enc_rows, enc_grads))
    grad_b_enc = torch.zeros_like(sae.b_enc_M).index_add_(0, enc_idx.reshape(-1), enc_grads.reshape(-1))
    sae.W_enc_MD.grad = _rows_times(enc_idx, enc_rows, enc_grads, b, xc_BD, m)
    sae.b_enc_M.grad = grad_b_enc
    sae.W_dec_MD.grad = grad_W_dec
    sae.b_pre_D.grad = G_PBD[0].sum(0) - grad_b_enc @ sae.W_enc_MD
    sae.remove_parallel_grad()
