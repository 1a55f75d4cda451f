import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TEXTS, run_script, tiny_records, write_jsonl
from sae import chat, lm, lm_eval


@pytest.fixture(scope="module")
def model_and_examples(tiny_model):
    location = lm.resolve_model(tiny_model)
    model, tok = lm.load_model(location, torch.device("cpu"), torch.float32), lm.load_tokenizer(location)
    examples = []
    for i, text in enumerate(TEXTS):
        ids, roles, _ = chat.tokenize_example(tok, [{"role": "user", "content": text * (1 + i % 2)}], True, 512)
        replace = np.ones(len(ids), dtype=bool)
        replace[0] = False  # no_first
        examples.append((ids, replace))
    return model, examples


def test_identity_sae_loses_nothing(model_and_examples):
    model, examples = model_and_examples
    out = lm_eval.evaluate_lm(model, examples, 1, lambda h: h, torch.zeros(32), batch_tokens=64)
    assert out["delta_lm_loss_pct"] == pytest.approx(0, abs=1e-9)
    assert out["frac_recovered_zero"] == pytest.approx(1) and out["frac_recovered_mean"] == pytest.approx(1)
    assert out["kl_sae"] == pytest.approx(0, abs=1e-7) and out["ce_zero"] != out["ce_clean"]


def test_each_replaced_pass_matches_a_hand_made_whole_forward(model_and_examples):
    """The replaced passes start from the clean pass's block output; a whole forward with a hook on the
    block, run example by example, is the reference for their losses and the KL."""
    model, examples = model_and_examples
    recon, mean_D = (lambda h: 0.5 * h + 0.1), torch.linspace(-1, 1, 32)
    out = lm_eval.evaluate_lm(model, examples, 1, recon, mean_D, batch_tokens=64)
    blocks = model.model.layers
    assert not any("forward" in block.__dict__ for block in blocks), "the blocks' own forward is back"
    fills = {"sae": recon, "zero": torch.zeros_like, "mean": lambda h: mean_D.expand_as(h)}
    total, kl, count = dict.fromkeys(fills, 0.0), 0.0, 0
    for ids, replace in examples:
        mask, x = torch.from_numpy(replace), torch.from_numpy(ids.astype(np.int64))[None]
        with torch.no_grad():
            clean = model(x).logits[0, :-1].log_softmax(-1)
        for name, fill in fills.items():
            def hook(module, args, output):
                h = (output[0] if isinstance(output, tuple) else output).clone()
                h[0, mask] = fill(h[0, mask])
                return h

            handle = blocks[1].register_forward_hook(hook)
            with torch.no_grad():
                logp = model(x).logits[0, :-1].log_softmax(-1)
            handle.remove()
            total[name] += F.nll_loss(logp, x[0, 1:], reduction="sum").item()
            if name == "sae":
                kl += (clean.exp() * (clean - logp)).sum().item()
        count += len(ids) - 1
    for name in fills:
        assert out[f"ce_{name}"] == pytest.approx(total[name] / count, rel=1e-5), name
    assert out["kl_sae"] == pytest.approx(kl / count, rel=1e-4) and out["kl_sae"] > 0
    assert out["predictions"] == count


def test_train_reports_lm_eval_and_token_kinds_that_add_up(tiny_model, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", tiny_records(40))
    run_script("extract_activations.py", f"--model_name={tiny_model}", f"--dataset_path={dataset}",
               f"--output_dir={tmp_path / 'acts'}", "--layer_idx=1")
    proc = run_script("train_sae.py", f"--activations_path={tmp_path / 'acts' / 'activations_layer1.npz'}", "--m=16",
                      "--k=4", "--n_epochs=2", "--batch_size=64", "--eval_max_examples=2", "--shared_copies=1", cwd=tmp_path)
    assert "ΔLM loss" in proc.stdout and "loss recovered" in proc.stdout and "first" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "cognitive_actions" / "SAE_M=16_K=4.pt", weights_only=True)
    lm_eval, kinds = ckpt["metrics"]["lm_eval"], ckpt["metrics"]["by_token_kind"]
    assert lm_eval["examples"] == 2 and lm_eval["ce_sae"] > 0 and "distinct" in lm_eval["replaced"]
    # with one copy, the selection trains on each distinct position once; the kinds count each position once
    # too, so the kinds but "first" are exactly the trained-on validation tokens
    used = [k for name, k in kinds.items() if k["tokens"] and name != "first"]
    n = sum(k["tokens"] for k in used)
    assert n == ckpt["provenance"]["n_val_tokens"]
    assert sum(k["mse"] * k["tokens"] for k in used) / n == pytest.approx(ckpt["metrics"]["val_mse"], rel=1e-5)
    assert sum(k["l0"] * k["tokens"] for k in used) / n == pytest.approx(ckpt["metrics"]["l0"], rel=1e-6)
    assert 3.5 < ckpt["metrics"]["l0"] <= 4
    assert kinds["first"]["tokens"] == 1, "every example starts with the same token: one distinct first position"
    content = ckpt["metrics"]["content"]
    assert 0 < content["tokens"] < n and ckpt["metrics"]["val_nmse_content"] == content["nmse"]
