"""Per-example feature activations and what they relate to: prevalence, label AUROC, peak tokens.

An example's activation for a feature is its maximum over the example's tokens (the tokens the SAE was
trained on); the position of that maximum is kept, so the peak token can be shown in context.
No file I/O here beyond reading the memory-mapped activations given to `example_maxima`.
"""
import numpy as np
import torch

from .stream import eval_batches


@torch.no_grad()
def example_maxima(sae, acts, selection: str, device="cpu", chunk_tokens: int = 1 << 14):
    """(max_NM float32, peak_NM int32): per example and feature, the largest code over the example's
    trained-on tokens and the token position (within the example) where it occurs (-1: never fires)."""
    n, m = acts.n_examples, sae.m
    max_NM = np.zeros((n, m), dtype=np.float32)
    peak_NM = np.full((n, m), -1, dtype=np.int32)
    first_row = 0  # eval_batches walks all examples in file order, so chunks are consecutive rows
    for x, keep, _, _ in eval_batches(acts, np.arange(n), selection, chunk_tokens):
        row_ids = np.arange(first_row, first_row + len(x))
        example_of_row = np.searchsorted(acts.offsets, row_ids, side="right") - 1
        pos_in_example = row_ids - acts.offsets[example_of_row]
        idx, vals = sae.encode_sparse(x.to(device))
        vals = (vals * keep.to(device)[:, None]).cpu().numpy().reshape(-1)
        idx = idx.cpu().numpy()
        rows = np.repeat(np.arange(len(x)), idx.shape[1])
        live = vals > 0
        rows, feats, vals = rows[live], idx.reshape(-1)[live], vals[live]
        # write in increasing value (ties: the earliest position last), so each cell ends at its maximum
        order = np.lexsort((-pos_in_example[rows], vals))
        ex, feats, vals, pos = example_of_row[rows][order], feats[order], vals[order], pos_in_example[rows][order]
        max_NM[ex, feats] = vals  # chunks hold whole examples: each cell is written in one chunk only
        peak_NM[ex, feats] = pos
        first_row += len(x)
    return max_NM, peak_NM


def auroc(scores_NM: np.ndarray, labels_N: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One-vs-rest AUROC (L, M) of each feature's per-example score for each label, with ties counted
    half (Mann-Whitney U). Labels with no positives or no negatives get NaN."""
    classes = sorted(set(labels_N.tolist()) - {""})
    n = len(labels_N)
    order = np.argsort(scores_NM, axis=0, kind="stable")
    ranks = np.empty_like(scores_NM, dtype=np.float64)
    sorted_scores = np.take_along_axis(scores_NM, order, axis=0)
    for j in range(scores_NM.shape[1]):  # average ranks over ties
        s = sorted_scores[:, j]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        ends = np.r_[starts[1:], n]
        avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run of ties
        ranks[order[:, j], j] = np.repeat(avg, ends - starts)
    out = np.full((len(classes), scores_NM.shape[1]), np.nan)
    for c, label in enumerate(classes):
        pos = labels_N == label
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            out[c] = (ranks[pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out, classes


def mark_peak(tokenizer, token_ids: np.ndarray, roles: np.ndarray, peak: int, window: int) -> str:
    """Text around the peak token with the peak in «», leaving out chat-template tokens (kept when the
    peak itself is one, since the template is then what the feature responds to)."""
    lo, hi = max(0, peak - window), min(len(token_ids), peak + window + 1)
    content = [t for t in range(lo, hi) if roles[t] != 0 or roles[peak] == 0]

    def text(positions):
        return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(
            [int(token_ids[t]) for t in positions])) if positions else ""

    before = text([t for t in content if t < peak])
    after = text([t for t in content if t > peak])
    peak_text = text([peak])
    lead = "…" if any(roles[t] != 0 for t in range(0, lo)) else ""
    tail = "…" if any(roles[t] != 0 for t in range(hi, len(token_ids))) else ""
    core = peak_text.strip() or peak_text
    space = " " if peak_text[:1].isspace() else ""
    return " ⏎ ".join(f"{lead}{before}{space}«{core}»{after}{tail}".strip().splitlines())


def content_text(tokenizer, token_ids: np.ndarray, roles: np.ndarray, max_tokens: int) -> str:
    """The example's non-template text (its first max_tokens tokens)."""
    keep = [int(t) for t, r in zip(token_ids, roles) if r != 0][:max_tokens]
    more = "…" if int((roles != 0).sum()) > max_tokens else ""
    return tokenizer.decode(keep).strip() + more


def distinctive_tokens(peak_token_ids: np.ndarray, token_counts: dict, n_tokens: int, tokenizer, top: int = 5):
    """Tokens most over-represented at a feature's peaks against their frequency in the whole dataset
    (smoothed log ratio; a token must peak at least twice, or once when there are few peaks)."""
    if len(peak_token_ids) == 0:
        return []
    ids, counts = np.unique(peak_token_ids, return_counts=True)
    min_count = 2 if len(peak_token_ids) >= 10 else 1
    scored = []
    for t, c in zip(ids, counts):
        if c < min_count:
            continue
        ratio = (c / len(peak_token_ids)) / ((token_counts.get(int(t), 0) + 1) / n_tokens)
        scored.append((np.log(ratio), int(c), int(t)))
    scored.sort(reverse=True)
    return [(tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(t)]), c) for _, c, t in scored[:top]]
