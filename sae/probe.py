"""How much of the labels a representation carries: a multinomial logistic-regression probe.

For per-example features X (N, F) and labels y, the probe is softmax(W z + b) on the standardized
features z = (x − μ_train) / σ_train, fitted by L-BFGS on

    loss = mean_n CE(softmax(W z_n + b), y_n) + λ/2 ‖W‖²

with λ chosen from a small grid by stratified 3-fold accuracy on the training examples, then refitted on
all of them and scored on the held-out examples. Run on the SAE's per-example feature maxima and on the
mean-pooled raw activations, the two accuracies say how much of what a linear reader finds in the model's
activations the SAE keeps. Plain torch: no new dependency.
"""
import numpy as np
import torch
import torch.nn.functional as F

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _fit(z_NF: torch.Tensor, y_N: torch.Tensor, n_classes: int, l2: float, max_iter: int = 100):
    W_CF = torch.zeros(n_classes, z_NF.shape[1], dtype=z_NF.dtype, requires_grad=True)
    b_C = torch.zeros(n_classes, dtype=z_NF.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W_CF, b_C], max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-5, tolerance_change=1e-7)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z_NF @ W_CF.T + b_C, y_N) + 0.5 * l2 * W_CF.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W_CF.detach(), b_C.detach()


def _accuracy(x_train, y_train, x_test, y_test, n_classes, l2) -> float:
    mu, sigma = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    W, b = _fit((x_train - mu) / sigma, y_train, n_classes, l2)
    return float((((x_test - mu) / sigma @ W.T + b).argmax(1) == y_test).double().mean())


def stratified_folds(y_N: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified folds: each class's examples dealt round-robin after a shuffle."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y_N), dtype=np.int64)
    for c in np.unique(y_N):
        members = rng.permutation(np.flatnonzero(y_N == c))
        fold_of[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def probe_accuracy(x_train_NF: np.ndarray, y_train: np.ndarray, x_test_NF: np.ndarray, y_test: np.ndarray,
                   l2_grid=L2_GRID, folds: int = 3, seed: int = 0) -> dict:
    """Held-out accuracy of the probe (labels are any hashable values), the λ chosen, and chance (the
    share of the most common training label among the held-out examples)."""
    classes = sorted(set(y_train.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    ytr = torch.tensor([index[c] for c in y_train.tolist()])
    yte = torch.tensor([index.get(c, -1) for c in y_test.tolist()])  # an unseen label is always wrong
    xtr, xte = torch.from_numpy(np.asarray(x_train_NF, np.float32)), torch.from_numpy(np.asarray(x_test_NF, np.float32))
    torch.manual_seed(seed)
    cv = {}
    for l2 in l2_grid:
        parts = stratified_folds(ytr.numpy(), folds, seed)
        accs = []
        for f, held in enumerate(parts):
            fit = np.concatenate([p for g, p in enumerate(parts) if g != f])
            if len(held) and len(fit):
                accs.append(_accuracy(xtr[fit], ytr[fit], xtr[held], ytr[held], len(classes), l2))
        cv[l2] = float(np.mean(accs)) if accs else 0.0
    l2 = max(l2_grid, key=lambda v: (cv[v], v))  # ties: the stronger regularisation
    majority = np.bincount(ytr.numpy(), minlength=len(classes)).argmax()
    return {"accuracy": _accuracy(xtr, ytr, xte, yte, len(classes), l2), "l2": l2,
            "chance": float((yte == majority).double().mean()), "n_train": len(ytr), "n_test": len(yte)}


def cross_validated_accuracy(x_NF: np.ndarray, y_N: np.ndarray, folds: int = 10, seed: int = 0) -> float:
    """The probe's accuracy over all examples: each of `folds` stratified folds is scored by probe_accuracy
    fitted on the other folds (λ chosen on those alone). For benchmarks, where one split with a few held-out
    examples per label is too noisy to compare two representations."""
    y_N = np.asarray(y_N)
    correct = 0.0
    for held in stratified_folds(np.unique(y_N, return_inverse=True)[1], folds, seed):
        fit = np.setdiff1d(np.arange(len(y_N)), held)
        correct += probe_accuracy(x_NF[fit], y_N[fit], x_NF[held], y_N[held], seed=seed)["accuracy"] * len(held)
    return correct / len(y_N)
