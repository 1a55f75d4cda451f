"""Per-example feature activations and what they relate to: prevalence, label AUROC, peak tokens,
template or content.

An example's activation for a feature is its maximum over the example's content tokens (user and
assistant turns outside prefixes shared by several examples; see sae.selection), or over the tokens the
SAE was trained on; the position of that maximum is kept, so the peak token can be shown in context.
A feature whose activation mass lies mostly on template positions (chat template, shared prefixes,
each distinct position counted once) is a template feature: it says what the format is, not the text.
No file I/O here beyond reading the memory-mapped activations given to `example_features`.
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .activations import ROLE_SPECIAL
from .probe import probe_accuracy
from .selection import TokenSelection, selected_alone
from .stream import eval_batches


@dataclass
class ExampleFeatures:
    """What the SAE's features do on each example and where in the file they fire.

    max_NM, peak_NM: per example and feature, the largest code over the example's read tokens and its
        position within the example (-1: does not fire there);
    mean_NM: per example and feature, the mean code over the same tokens (0 where it does not fire);
    mean_ND: the mean raw activation over the same tokens (the baseline the probe compares with);
    content_M, template_M: each feature's summed codes over distinct content and template positions
        (shared prefixes once; see sae.selection), whose ratio classes features;
    peak_token_M: the token id where each feature's code is largest over those positions (-1: never)."""
    max_NM: np.ndarray
    peak_NM: np.ndarray
    mean_NM: np.ndarray
    mean_ND: np.ndarray
    content_M: np.ndarray
    template_M: np.ndarray
    peak_token_M: np.ndarray

    @property
    def template_share_M(self) -> np.ndarray:
        """Share of each feature's activation mass on template positions (NaN: never fires)."""
        total = self.content_M + self.template_M
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, self.template_M / total, np.nan)


@torch.no_grad()
def example_features(sae, acts, selection: TokenSelection, tokens: str = "content", device="cpu",
                     chunk_tokens: int = 1 << 14, progress: bool = False) -> ExampleFeatures:
    """Per-example maxima over the example's content tokens (tokens="content") or over the positions
    the selection trains on within the example ("trained"), plus where each feature fires in the file.
    `selection` holds the shared prefixes of the whole file (TokenSelection(acts, name)); `progress` shows a
    bar over the tokens."""
    if tokens not in ("content", "trained"):
        raise ValueError(f"tokens={tokens!r} must be 'content' or 'trained'")
    n, m = acts.n_examples, sae.m
    max_NM = np.zeros((n, m), dtype=np.float32)
    peak_NM = np.full((n, m), -1, dtype=np.int32)
    sum_NM = np.zeros((n, m), dtype=np.float32)
    sum_ND = torch.zeros((n, acts.d), dtype=torch.float64)
    count_N = np.zeros(n)
    mass = {"content": np.zeros(m), "template": np.zeros(m)}
    peak_val_M, peak_token_M = np.zeros(m, dtype=np.float32), np.full(m, -1, dtype=np.int64)
    first_row = 0  # eval_batches walks all examples in file order, so chunks are consecutive rows
    bar = tqdm(total=acts.n_tokens, unit="tok", desc="feature maxima per example", leave=False,
               disable=None if progress else True)  # None: shown on a terminal
    for x, _, rows in eval_batches(acts, np.arange(n), selection, chunk_tokens):
        bar.update(len(x))
        row_ids = np.arange(first_row, first_row + len(x))
        example_of_row = acts.examples_of_rows(row_ids)
        pos_in_example = row_ids - acts.offsets[example_of_row]
        read = rows.content if tokens == "content" else selected_alone(selection.name, rows)
        sum_ND.index_add_(0, torch.from_numpy(example_of_row[read]), x[torch.from_numpy(read)].double())
        np.add.at(count_N, example_of_row[read], 1)
        idx, vals = sae.encode_sparse(x.to(device))
        idx, vals = idx.cpu().numpy(), vals.float().cpu().numpy()
        token_of_row = np.asarray(acts.token_ids[first_row:first_row + len(x)])
        for kind, where in (("content", rows.content), ("template", rows.template)):
            v = (vals * where[:, None]).reshape(-1)
            np.add.at(mass[kind], idx.reshape(-1), v)
            higher = np.flatnonzero(v > peak_val_M[idx.reshape(-1)])  # beats the feature's peak so far
            higher = higher[np.argsort(v[higher], kind="stable")]  # increasing: each feature ends at its max
            peak_val_M[idx.reshape(-1)[higher]] = v[higher]
            peak_token_M[idx.reshape(-1)[higher]] = token_of_row[higher // idx.shape[1]]
        vals = vals * read[:, None]
        r = np.repeat(np.arange(len(x)), idx.shape[1])
        live = vals.reshape(-1) > 0
        r, feats, v = r[live], idx.reshape(-1)[live], vals.reshape(-1)[live]
        np.add.at(sum_NM, (example_of_row[r], feats), v)
        # write in increasing value (ties: the earliest position last), so each cell ends at its maximum
        order = np.lexsort((-pos_in_example[r], v))
        ex, feats, v, pos = example_of_row[r][order], feats[order], v[order], pos_in_example[r][order]
        max_NM[ex, feats] = v  # chunks hold whole examples: each cell is written in one chunk only
        peak_NM[ex, feats] = pos
        first_row += len(x)
    bar.close()
    mean_ND = (sum_ND.numpy() / np.maximum(count_N, 1)[:, None]).astype(np.float32)
    mean_NM = sum_NM / np.maximum(count_N, 1)[:, None].astype(np.float32)
    return ExampleFeatures(max_NM, peak_NM, mean_NM, mean_ND, mass["content"], mass["template"], peak_token_M)


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
    content = [t for t in range(lo, hi) if roles[t] != ROLE_SPECIAL or roles[peak] == ROLE_SPECIAL]

    def text(positions):
        return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(
            [int(token_ids[t]) for t in positions])) if positions else ""

    before = text([t for t in content if t < peak])
    after = text([t for t in content if t > peak])
    peak_text = text([peak])
    lead = "…" if any(roles[t] != ROLE_SPECIAL for t in range(0, lo)) else ""
    tail = "…" if any(roles[t] != ROLE_SPECIAL for t in range(hi, len(token_ids))) else ""
    core = peak_text.strip() or peak_text
    space = " " if peak_text[:1].isspace() else ""
    return " ⏎ ".join(f"{lead}{before}{space}«{core}»{after}{tail}".strip().splitlines())


def content_text(tokenizer, token_ids: np.ndarray, roles: np.ndarray, max_tokens: int) -> str:
    """The example's non-template text (its first max_tokens tokens)."""
    keep = [int(t) for t, r in zip(token_ids, roles) if r != ROLE_SPECIAL][:max_tokens]
    more = "…" if int((roles != ROLE_SPECIAL).sum()) > max_tokens else ""
    return tokenizer.decode(keep).strip() + more


def distinctive_tokens(peak_token_ids: np.ndarray, token_counts: dict, n_tokens: int, tokenizer, top: int = 5):
    """The tokens that best tell a feature's peaks from the dataset, as (text, peaks, lift p/q): each token t
    scored by its term of the KL divergence between the two token distributions,

        p(t) · log(p(t) / q(t)),   p(t) = share of the peaks on t,   q(t) = (count of t in the data + 1) / n_tokens

    so a token ranks high when the feature peaks on it often *and* more often than the text holds it; a rare
    word at two peaks does not outrank the token of most peaks, as it would by the ratio alone. The lift says
    which of the two a shown token is (on the real development texts: ' a' at 35 peaks and 3.5 times as
    frequent as in the text is merely common, ' letting' at 37 peaks and 190 times is specific). A token must
    peak at least twice, or once when there are few peaks."""
    if len(peak_token_ids) == 0:
        return []
    ids, counts = np.unique(peak_token_ids, return_counts=True)
    min_count = 2 if len(peak_token_ids) >= 10 else 1
    scored = []
    for t, c in zip(ids, counts):
        if c < min_count:
            continue
        p = c / len(peak_token_ids)
        lift = p / ((token_counts.get(int(t), 0) + 1) / n_tokens)
        scored.append((p * np.log(lift), int(c), int(t), float(lift)))
    scored.sort(reverse=True)
    return [(token_text(tokenizer, t), c, lift) for _, c, t, lift in scored[:top]]


def token_text(tokenizer, token_id: int) -> str:
    """One token as the text it stands for ("" for -1: none)."""
    return tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(int(token_id))]) if token_id >= 0 else ""


def template_features(ex: ExampleFeatures, share: float) -> np.ndarray:
    """Boolean (M,): the features with at least `share` of their activation mass on template positions
    (chat template, shared prefixes): those that fire mainly there."""
    return np.nan_to_num(ex.template_share_M, nan=0.0) >= share


def best_labels(auroc_LM: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's own best label (index; -1 when no label beats 0.5, i.e. no association) and its AUROC."""
    filled = np.nan_to_num(auroc_LM, nan=0.0)
    best_M = filled.argmax(0) if len(filled) else np.zeros(auroc_LM.shape[1], dtype=np.int64)
    value_M = filled.max(0, initial=0.0)
    return np.where(value_M > 0.5, best_M, -1), value_M


def labels_covered(auroc_LM: np.ndarray, label_names: list[str], threshold: float = 0.8) -> list[str]:
    """The labels that are some feature's own best label with AUROC >= threshold."""
    best_M, value_M = best_labels(auroc_LM)
    return sorted({label_names[c] for c, v in zip(best_M, value_M) if c >= 0 and v >= threshold})


def default_selection(n: int, prevalence_M: np.ndarray, mean_activation_M: np.ndarray, template_M: np.ndarray,
                      auroc_LM: np.ndarray | None) -> list[int]:
    """The features to show first, never template features nor ones that never fire on content.

    With labels: by label association, each label's best feature first (in decreasing AUROC), then the
    other features by AUROC, so that n features cover as many labels as they can. Without labels: by
    prevalence (share of examples where the feature fires), ties by mean activation."""
    eligible = ~template_M & (prevalence_M > 0)
    if auroc_LM is None or not len(auroc_LM):
        order = np.lexsort((-mean_activation_M, -prevalence_M))
        return [int(f) for f in order if eligible[f]][:n]
    best_M, value_M = best_labels(auroc_LM)
    order = [int(f) for f in np.argsort(-value_M, kind="stable") if eligible[f]]
    seen, leaders, rest = set(), [], []
    for f in order:
        (leaders if best_M[f] >= 0 and best_M[f] not in seen else rest).append(f)
        seen.add(best_M[f])
    return (leaders + rest)[:n]


def data_description(label: str | None, label_auroc: float | None, top_tokens: list, example: str | None) -> str:
    """A feature described from the data alone: its best label, its peak tokens and one peak in context."""
    parts = []
    if label:
        parts.append(f"label '{label}' (AUROC {label_auroc:.2f})")
    if top_tokens:
        parts.append("peaks on " + ", ".join(repr(t) for t, *_ in top_tokens[:3]))
    if example:
        parts.append(f"e.g. “{example}”")
    return "From the data: " + ("; ".join(parts) if parts else "no label association and no repeated peak token")


def label_metrics(ex: ExampleFeatures, y, train_ids, val_ids, threshold=0.8):
    """What the features say about the labels y (one per example): the labels that are some feature's own
    best label at AUROC >= threshold (ex's per-example maxima, all examples), and a linear probe on
    those maxima and on the mean codes against the same probe on mean-pooled raw activations (fitted on
    the training examples, scored on the validation examples). The mean codes are pooled as the raw
    activations are, so their gap to the raw probe is what the SAE loses; the maxima's gap adds what
    reading each feature at its peak loses."""
    auroc_LM, names = auroc(ex.max_NM, y)
    covered = labels_covered(auroc_LM, names, threshold)
    best = np.nan_to_num(np.nanmax(auroc_LM, axis=0), nan=0.5) if len(names) else np.zeros(0)
    sae_probe, sae_mean_probe, raw_probe = (probe_accuracy(x[train_ids], y[train_ids], x[val_ids], y[val_ids])
                                            for x in (ex.max_NM, ex.mean_NM, ex.mean_ND))
    return {"n_labels": len(names), "auroc_threshold": threshold, "labels_covered": len(covered),
            "covered": covered, "mean_best_auroc": float(best.mean()) if len(best) else None,
            "probe_sae_accuracy": sae_probe["accuracy"], "probe_sae_mean_accuracy": sae_mean_probe["accuracy"],
            "probe_raw_accuracy": raw_probe["accuracy"],
            "probe_ratio": sae_probe["accuracy"] / raw_probe["accuracy"] if raw_probe["accuracy"] else None,
            "probe_chance": sae_probe["chance"], "probe_train_examples": sae_probe["n_train"],
            "probe_val_examples": sae_probe["n_test"]}
