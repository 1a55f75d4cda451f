"""Shared prefixes: found exactly, trained on once, and features that live there classed as template."""

import numpy as np
import pytest
import torch

from conftest import run_script
from sae.activations import StreamingNpzWriter, open_activations
from sae.features import example_features, template_features
from sae.model import SparseAutoencoder
from sae.selection import TokenSelection, shared_prefixes
from sae.stream import MixingStream, count_tokens, split_examples

INSTRUCTION = 20  # tokens every example starts with


def brute_force(seqs, ids, common, copies):
    """(shared, repeated) by comparing every pair of examples."""
    def lcp(x, y):
        return next((p for p, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
    shared = [max((p for p in range(len(seqs[a]) + 1)
                   if sum(seqs[b][:p] == seqs[a][:p] for b in ids) >= common), default=0) for a in ids]
    repeated = [max((p for p in range(len(seqs[a]) + 1)
                     if sum(lcp(seqs[a], seqs[b]) >= p for b in ids if b < a) >= copies), default=0) for a in ids]
    return np.array(shared), np.array(repeated)


def test_shared_prefixes_match_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        seqs = [list(rng.integers(0, 3, rng.integers(1, 8))) if rng.random() < 0.7 else [1] * int(rng.integers(1, 8))
                for _ in range(n)]  # small alphabets: many shared prefixes, duplicates, prefixes of others
        token_ids = np.concatenate(seqs).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
        ids = np.sort(rng.choice(n, rng.integers(1, n + 1), replace=False))
        common, copies = int(rng.integers(2, 4)), int(rng.integers(1, 4))
        shared, repeated = shared_prefixes(token_ids, offsets, ids, common, copies)
        want_shared, want_repeated = brute_force(seqs, list(ids), common, copies)
        np.testing.assert_array_equal(shared, want_shared)
        np.testing.assert_array_equal(repeated, want_repeated)


def instruction_file(path, n_examples=30, d=8, seed=0):
    """Examples that start with the same 20-token instruction (identical activations there, as under causal
    attention), then text of their own; the instruction is template (role 0), the rest user turn (role 2)."""
    rng = np.random.default_rng(seed)
    prefix_ids, prefix_acts = rng.integers(100, 200, INSTRUCTION), rng.normal(size=(INSTRUCTION, d)) + 3
    ids, acts, roles, offsets = [], [], [], [0]
    own_ids = iter(range(200, 10_000))  # no two examples share a token after the instruction
    for _ in range(n_examples):
        n_own = int(rng.integers(5, 15))
        ids.append(np.concatenate([prefix_ids, [next(own_ids) for _ in range(n_own)]]))
        acts.append(np.concatenate([prefix_acts, rng.normal(size=(n_own, d)) - 3]))
        roles.append(np.r_[np.zeros(INSTRUCTION), np.full(n_own, 2)])
        offsets.append(offsets[-1] + INSTRUCTION + n_own)
    w = StreamingNpzWriter(str(path), (offsets[-1], d), np.float32)
    w.append(np.concatenate(acts))
    w.finish(offsets, np.concatenate(ids), np.concatenate(roles), np.arange(n_examples),
             {"model": "synthetic", "layer": 1, "dataset_path": "x.jsonl"}, np.array(["a", "b", "c"])[np.arange(n_examples) % 3])
    return str(path)


def test_a_shared_instruction_is_trained_on_once(tmp_path):
    acts = open_activations(instruction_file(tmp_path / "acts.npz"))
    train_ids, val_ids = split_examples(acts.n_examples, acts.labels, 0.2, 0)
    selection = TokenSelection(acts, "distinct", [train_ids, val_ids])
    lengths = acts.offsets[train_ids + 1] - acts.offsets[train_ids]
    # each split keeps the instruction once (19 positions after the first token), and every own token
    assert count_tokens(acts, train_ids, selection)[0] == (INSTRUCTION - 1) + int((lengths - INSTRUCTION).sum())
    assert count_tokens(acts, val_ids, selection)[0] == (INSTRUCTION - 1) + int(
        (acts.offsets[val_ids + 1] - acts.offsets[val_ids] - INSTRUCTION).sum())
    rows = torch.cat(list(MixingStream(acts, train_ids, selection, 7, seed=0).epoch(0))).numpy()
    instruction_rows = np.asarray(acts.example(int(train_ids[0])))[1:INSTRUCTION]
    for row in instruction_rows:  # each instruction position exactly once in an epoch
        assert (np.abs(rows - row).max(1) == 0).sum() == 1
    assert len(rows) == count_tokens(acts, train_ids, selection)[0]
    # the older selection sees the instruction in every example; with copies=16, in 16 of them
    assert count_tokens(acts, train_ids, TokenSelection(acts, "no_first"))[0] == int((lengths - 1).sum())
    capped = TokenSelection(acts, "distinct", [train_ids, val_ids], copies=16)
    assert count_tokens(acts, train_ids, capped)[0] == 16 * (INSTRUCTION - 1) + int((lengths - INSTRUCTION).sum())


@pytest.mark.parametrize("copies", [1, 16])
def test_train_sae_trains_on_the_instruction_a_bounded_number_of_times(tmp_path, copies):
    path = instruction_file(tmp_path / "acts.npz")
    args = [f"--activations_path={path}", "--m=8", "--k=2", "--n_epochs=1", "--eval_lm=False", "--export_saelens=False",
            "--val_fraction=0.2"] + ([f"--shared_copies={copies}"] if copies != 16 else [])  # 16: the default
    proc = run_script("train_sae.py", *args, cwd=tmp_path)
    acts = open_activations(path)
    train_ids, _ = split_examples(acts.n_examples, acts.labels, 0.2, 0)
    own = int((acts.offsets[train_ids + 1] - acts.offsets[train_ids] - INSTRUCTION).sum())
    assert f"Train: {len(train_ids)} examples, {copies * (INSTRUCTION - 1) + own} tokens" in proc.stdout


def test_a_feature_firing_only_on_the_shared_prefix_is_template(tmp_path):
    acts = open_activations(instruction_file(tmp_path / "acts.npz"))
    sae = SparseAutoencoder(acts.d, 4, 1, prefixes=None)
    with torch.no_grad():  # feature 0 reads +1 (the instruction's direction), feature 1 reads −1 (the text's)
        sae.W_enc_MD.zero_()
        sae.W_enc_MD[0] = 1.0
        sae.W_enc_MD[1] = -1.0
        sae.b_enc_M.fill_(-1.0)
    ex = example_features(sae, acts, TokenSelection(acts, "distinct"), "content")
    template = template_features(ex, 0.5)
    assert template[0] and not template[1]
    assert ex.template_share_M[0] == pytest.approx(1.0) and ex.template_share_M[1] == pytest.approx(0.0)
    assert (ex.max_NM[:, 0] == 0).all(), "content maxima never see the instruction"
    assert (ex.max_NM[:, 1] > 0).all()
    assert ex.peak_token_M[0] in np.asarray(acts.token_ids[1:INSTRUCTION])


def test_default_selection_skips_template_features_and_spreads_over_labels():
    from sae.features import default_selection
    prevalence = np.array([1.0, 0.5, 0.4, 0.3, 0.0])
    template = np.array([True, False, False, False, False])
    mean_act = np.ones(5)
    assert default_selection(5, prevalence, mean_act, template, None) == [1, 2, 3]  # never 0 (template), 4 (silent)
    auroc_LM = np.array([[0.99, 0.90, 0.85, 0.60, 0.5],   # label a: best feature 1 (0 is template)
                         [0.50, 0.20, 0.30, 0.80, 0.5]])  # label b: feature 3
    # each label's best feature first (by AUROC), then the rest
    assert default_selection(5, prevalence, mean_act, template, auroc_LM) == [1, 3, 2]
