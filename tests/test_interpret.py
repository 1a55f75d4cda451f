import json
import re
import os

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import kill_when, ROOT, make_activations, run_script
from sae import chat, lm
from sae.activations import open_activations
from sae.checkpoint import load_checkpoint
from sae.features import auroc, distinctive_tokens, example_features, mark_peak
from sae.selection import TokenSelection
from fake_openai import DESCRIPTION, FakeOpenAI

@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """Extraction and training on the tiny model: (activations path, checkpoint path, dataset path)."""
    from conftest import tiny_records, write_jsonl
    root = tmp_path_factory.mktemp("pipeline")
    dataset = write_jsonl(root / "data.jsonl", tiny_records(40))
    run_script("extract_activations.py", f"--model_name={tiny_model}", f"--dataset_path={dataset}",
               f"--output_dir={root / 'acts'}", "--layer_idx=2")
    acts = str(root / "acts" / "activations_layer2.npz")
    run_script("train_sae.py", f"--activations_path={acts}", "--m=16", "--k=4", "--n_epochs=3",
               "--batch_size=64", "--run_name=tiny", cwd=root)
    return acts, str(root / "checkpoints" / "tiny" / "SAE_M=16_K=4.pt"), dataset


def offline_env():
    return {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}


def interpret(tmp_path, trained, *args, env=None, check=True):
    acts, ckpt, dataset = trained
    base = [f"--activations_path={acts}", f"--sae_checkpoint={ckpt}", f"--dataset_path={dataset}",
            "--n_top_neurons=3", "--n_examples=3", "--n_score_examples=2", "--retry_base_s=0.01", "--n_workers=2",
            f"--output_csv={tmp_path / 'interpretations.csv'}", f"--report_html={tmp_path / 'report.html'}"]
    return run_script("interpret_sae.py", *base, *args, cwd=tmp_path, env=env or offline_env(), check=check)


def test_offline_run_writes_csv_and_report(tmp_path, trained):
    proc = interpret(tmp_path, trained, "--select_by=prevalence")
    assert proc.stdout.count("rerun for LLM descriptions") == 1, "the offline note is printed once"
    df = pd.read_csv(tmp_path / "interpretations.csv")
    assert list(df.columns[:13]) == ["neuron_idx", "kind", "prevalence", "mean_activation", "template_share",
                                     "interpretation", "source", "f1", "precision", "recall", "top_label",
                                     "top_label_auroc", "top_tokens"]
    assert len(df) == 3 and list(df.prevalence) == sorted(df.prevalence, reverse=True)
    assert (df.kind == "content").all() and (df.source == "data").all() and df.f1.isna().all()
    assert df.interpretation.str.startswith("From the data: ").all() and not df.interpretation.str.contains(
        "not generated").any()
    table = proc.stdout[proc.stdout.index("Selected features (3 of 16"):].splitlines()[1:]
    assert [int(line.split()[1]) for line in table] == list(df.neuron_idx), "the console ends with the table"
    assert all(f"({100 * p:5.1f}% active): " in line for line, p in zip(table, df.prevalence))
    assert df.top_example_1.str.contains("«").all()
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") >= 3 and "http://" not in html and "https://" not in html
    assert "Feature " in html and "<mark>" in html
    shown = html[:html.index("<details>")]  # what a reader sees (the configuration below is the raw record)
    significant = [len(n.replace(".", "").lstrip("0")) for n in re.findall(r"\d+\.\d+", shown)]
    assert significant and max(significant) <= 5, "numbers are rounded (at most 5 significant digits)"
    for label in ("normalized MSE</th>", "active features per token</th>", "dead features</th>"):
        assert label in shown
    assert "val_prefix_nmse" not in shown and "never_fired_ratio" not in shown, "metrics by their meaning, not their keys"


def test_llm_descriptions_scores_retries_and_cache(tmp_path, trained):
    server = FakeOpenAI(failures=[429, 500, 429])
    try:
        env = dict(offline_env(), OPENAI_BASE_URL=server.url)
        proc = interpret(tmp_path, trained, env=env)
        statuses = server.statuses()
        assert statuses.count(429) == 2 and statuses.count(500) == 1, "failed requests were retried"
        df = pd.read_csv(tmp_path / "interpretations.csv")
        assert (df.interpretation == DESCRIPTION).all()
        assert df.f1.between(0, 1).all() and df.precision.notna().all() and df.recall.notna().all()
        summary = re.search(r"LLM: (\d+) requests made \((\d+) retries, (\d+) failed\), (\d+) answered from the cache",
                            proc.stdout).groups()
        # every request the server saw, 3 of them retries; at least the first description is answered from the
        # cache (asked alone, then again through the pool), and identical prompts are asked once
        requests, retries, failed, hits = map(int, summary)
        assert (requests, retries, failed) == (len(statuses), 3, 0) and hits >= 1, summary
        n_before = len(server.log)
        again = interpret(tmp_path, trained, env=env)
        assert len(server.log) == n_before, "a second run makes no request"
        # every question of the first run (answered by the server or by the cache) is now a cache hit
        assert f"LLM: 0 requests made (0 retries, 0 failed), {statuses.count(200) + hits} answered from the cache" \
            in again.stdout
        assert pd.read_csv(tmp_path / "interpretations.csv").equals(df)
    finally:
        server.close()


def test_killed_run_resumes_without_repeating_requests(tmp_path, trained):
    server = FakeOpenAI(delay=0.2)
    acts, ckpt, dataset = trained
    env = dict(offline_env(), OPENAI_BASE_URL=server.url)
    args = [f"--activations_path={acts}", f"--sae_checkpoint={ckpt}", f"--dataset_path={dataset}", "--n_top_neurons=3",
            "--n_examples=3", "--n_score_examples=2", "--n_workers=1", f"--output_csv={tmp_path / 'interpretations.csv'}",
            f"--report_html={tmp_path / 'report.html'}"]
    try:
        kill_when("interpret_sae.py", *args, cwd=tmp_path, env=env, ready=lambda: len(server.log) >= 5)
        first = len(server.log)
        cached = {json.loads(line)["key"] for line in open(tmp_path / "llm_cache.jsonl") if line.endswith("\n")}
        assert cached, "some answers were cached before the kill"
        server.delay = 0.0
        interpret(tmp_path, trained, "--n_workers=1", env=dict(offline_env(), OPENAI_BASE_URL=server.url))
        asked_again = set(server.keys(first)) & cached
        assert len(server.log) > first and not asked_again, "no finished request is asked again"
        assert (pd.read_csv(tmp_path / "interpretations.csv").interpretation == DESCRIPTION).all()
    finally:
        server.close()


def test_unreachable_server_writes_offline_outputs_and_fails(tmp_path, trained):
    env = dict(offline_env(), OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    proc = interpret(tmp_path, trained, "--max_retries=1", env=env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "could not reach the LLM server at http://127.0.0.1:9/v1" in proc.stderr
    assert (tmp_path / "interpretations.csv").exists() and (tmp_path / "report.html").exists()


@pytest.mark.parametrize("tokens", ["trained", "content"])
def test_example_maxima_and_peaks_match_brute_force(trained, tokens):
    acts_path, ckpt_path, _ = trained
    acts = open_activations(acts_path)
    sae, _ = load_checkpoint(ckpt_path)
    ex = example_features(sae, acts, TokenSelection(acts, "no_first"), tokens, chunk_tokens=50)  # many small chunks
    ids = [np.asarray(acts.token_ids[acts.offsets[i]:acts.offsets[i + 1]]).tolist() for i in range(acts.n_examples)]
    for i in range(acts.n_examples):
        x = torch.from_numpy(np.asarray(acts.example(i), dtype=np.float32))
        with torch.no_grad():
            codes = sae.encode(x).numpy()
        roles = np.asarray(acts.token_role[acts.offsets[i]:acts.offsets[i + 1]])
        shared = max(next((p for p, (a, b) in enumerate(zip(ids[i], ids[j])) if a != b), min(len(ids[i]), len(ids[j])))
                     for j in range(acts.n_examples) if j != i)  # the longest prefix another example starts with
        read = np.arange(len(roles)) > 0 if tokens == "trained" else (roles >= 2) & (np.arange(len(roles)) >= shared)
        codes[~read] = 0
        np.testing.assert_allclose(ex.max_NM[i], codes.max(0), rtol=1e-5, atol=1e-6)
        fired = codes.max(0) > 0
        np.testing.assert_array_equal(ex.peak_NM[i][fired], codes.argmax(0)[fired])
        assert (ex.peak_NM[i][~fired] == -1).all()
        if read.any():
            np.testing.assert_allclose(ex.mean_NM[i], codes[read].mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ex.mean_ND[i], x.numpy()[read].mean(0), rtol=1e-5, atol=1e-5)


def test_auroc_matches_hand_computation():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((40, 3)), 1)  # rounding makes ties
    scores[:, 2] = 0  # a feature that never fires: AUROC 0.5
    labels = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, 40)]
    result, names = auroc(scores, labels)
    assert names == ["a", "b", "c", "d"]
    for c, name in enumerate(names):
        pos, neg = scores[labels == name], scores[labels != name]
        for f in range(3):
            pairs = [(p > q) + 0.5 * (p == q) for p in pos[:, f] for q in neg[:, f]]
            assert result[c, f] == pytest.approx(np.mean(pairs))


class NamedIds:
    """A tokenizer whose token i reads "t{i}": what distinctive_tokens needs of one."""

    def convert_ids_to_tokens(self, i):
        return f"t{i}"

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def test_peak_tokens_rank_frequent_and_over_represented_first():
    """A feature peaks 50 times on token 1 (a tenth of the text), 10 times on token 2 and twice on token 3
    (both rare in the text), once on token 4: 63 peaks. By p·log(p/q), worked out by hand: token 1 scores
    50/63·log((50/63)/(1001/10000)) = 1.64, token 2 10/63·log((10/63)/(21/10000)) = 0.69, token 3
    2/63·log((2/63)/(3/10000)) = 0.15; token 4 peaks once, under the minimum of 2. By the ratio alone the
    order would be 3, 2, 1: the word at two peaks first. Each comes with that ratio, its lift: 7.93, 75.6,
    105.8."""
    peaks = np.array([1] * 50 + [2] * 10 + [3] * 2 + [4])
    counts = {1: 1000, 2: 20, 3: 2, 4: 5}
    shown = distinctive_tokens(peaks, counts, 10_000, NamedIds())
    assert [(t, c) for t, c, _ in shown] == [("t1", 50), ("t2", 10), ("t3", 2)]
    assert [lift for *_, lift in shown] == pytest.approx([7.93, 75.6, 105.8], rel=1e-3)
    assert [(t, c) for t, c, _ in distinctive_tokens(peaks, counts, 10_000, NamedIds(), top=1)] == [("t1", 50)]
    assert [(t, c) for t, c, _ in distinctive_tokens(np.array([4, 3]), counts, 10_000, NamedIds())] == \
        [("t3", 1), ("t4", 1)], "with few peaks one is enough"


def test_peak_token_marking(tiny_model):
    tok = lm.load_tokenizer(lm.resolve_model(tiny_model))
    messages = [{"role": "user", "content": "I stopped and reconsidered the plan after my sister pointed out the budget."}]
    ids, roles, _ = chat.tokenize_example(tok, messages, True, 512)
    content = np.flatnonzero(roles == 2)
    peak = int(content[4])
    text = mark_peak(tok, ids, roles, peak, window=2)
    marked = tok.decode(ids[peak:peak + 1]).strip()
    assert f"«{marked}»" in text and text.startswith("…") and text.endswith("…")
    assert "<|im_start|>" not in text, "template tokens are left out around a content peak"
    assert text.replace("«", "").replace("»", "").replace("…", "").strip() in messages[0]["content"]


def _bad_checkpoint(tmp_path, trained):
    path = tmp_path / "not_sae.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return [f"--sae_checkpoint={path}"]


def _truncated_checkpoint(tmp_path, trained):
    path = tmp_path / "cut.pt"
    data = open(trained[1], "rb").read()
    path.write_bytes(data[:len(data) // 3])
    return [f"--sae_checkpoint={path}"]


def _other_width(tmp_path, trained):
    acts = make_activations(tmp_path / "other.npz", d=24)
    return [f"--activations_path={acts}"]


def _other_dataset(tmp_path, trained):
    path = tmp_path / "other.jsonl"
    path.write_text(open(trained[2]).read() + '{"text": "one more line"}\n')
    return [f"--dataset_path={path}"]


def _disagreeing_checkpoint(tmp_path, trained):
    ckpt = torch.load(trained[1], weights_only=True)
    ckpt["sae_config"]["m"] = 32  # the weights are 16 wide
    torch.save(ckpt, tmp_path / "disagree.pt")
    return [f"--sae_checkpoint={tmp_path / 'disagree.pt'}"]


def _nan_activations(tmp_path, trained):
    """The same activations with a NaN in the middle, written with a valid CRC-32 (so only the values are bad)."""
    from sae.activations import StreamingNpzWriter
    acts = open_activations(trained[0])
    rows = np.asarray(acts.activations, dtype=np.float32).copy()
    rows[acts.offsets[5] + 2, 3] = np.nan
    w = StreamingNpzWriter(str(tmp_path / "nan.npz"), rows.shape, acts.activations.dtype)
    w.append(rows)
    w.finish(acts.offsets, acts.token_ids, acts.token_role, acts.example_index, acts.meta, acts.labels)
    return [f"--activations_path={tmp_path / 'nan.npz'}"]


def _file(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    return tmp_path / "file.txt"


@pytest.mark.parametrize("make_args, expected", [
    (lambda t, tr: [f"--sae_checkpoint={t / 'none.pt'}"], "does not exist; run train_sae.py first"),
    (_bad_checkpoint, "is not an SAE checkpoint of this project"),
    (_truncated_checkpoint, "could not be read"),
    (_other_width, "was trained on 32-wide activations but"),
    (_other_dataset, "is not the dataset"),
    (lambda t, tr: ["--select_by=[1, 99]"], "features [99] that do not exist; indices must be in 0..15"),
    (lambda t, tr: ["--n_top_neurons=-1"], "N_TOP_NEURONS=-1 must be at least 1"),
    (lambda t, tr: ["--n_workers=0"], "N_WORKERS=0 must be at least 1"),
    (lambda t, tr: ["--timeout_s=0"], "TIMEOUT_S=0.0 must be positive"),
    (lambda t, tr: ["--interpret_tokens=everything"], "INTERPRET_TOKENS='everything' must be 'content' or 'trained'"),
    (lambda t, tr: ["--template_share=1.5"], "TEMPLATE_SHARE=1.5 must be in (0, 1]"),
    (_disagreeing_checkpoint, "does not hold a consistent SAE (its config and weights disagree"),
    (_nan_activations, "has NaN or inf activations in example 5 (line 6 of"),
    (lambda t, tr: [f"--report_html={_file(t)}/sub/report.html"], "/sub/report.html cannot be written there (Not a"),
])
def test_bad_inputs(tmp_path, trained, make_args, expected):
    proc = interpret(tmp_path, trained, *make_args(tmp_path, trained), check=False)
    assert proc.returncode != 0 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_default_interpretation_of_the_sample_selects_no_template_feature(tiny_model, tmp_path):
    from conftest import write_jsonl
    with open(os.path.join(ROOT, "data", "cognitive_actions_sample.jsonl"), encoding="utf-8") as f:
        dataset = write_jsonl(tmp_path / "sample.jsonl", f.read().splitlines()[:150])
    run_script("extract_activations.py", f"--model_name={tiny_model}", f"--dataset_path={dataset}",
               f"--output_dir={tmp_path / 'acts'}", "--layer_idx=2")
    acts = str(tmp_path / "acts" / "activations_layer2.npz")
    run_script("train_sae.py", f"--activations_path={acts}", "--m=32", "--k=4", "--n_epochs=3", "--batch_size=256",
               "--eval_lm=False", "--export_saelens=False", "--run_name=s", cwd=tmp_path)
    args = [f"--activations_path={acts}", f"--dataset_path={dataset}", "--n_top_neurons=10",
            f"--sae_checkpoint={tmp_path / 'checkpoints' / 's' / 'SAE_M=32_K=4.pt'}"]
    proc = run_script("interpret_sae.py", *args, cwd=tmp_path, env=offline_env())
    df = pd.read_csv(tmp_path / "interpretations.csv")
    assert len(df) == 10 and (df.kind == "content").all() and (df.template_share < 0.5).all()
    assert "content features by label association" in proc.stdout
    # a lower bar makes some features template ones (a random tiny model has few): none of them is selected
    run_script("interpret_sae.py", *args, "--template_share=0.02", cwd=tmp_path, env=offline_env())
    df = pd.read_csv(tmp_path / "interpretations.csv")
    html = (tmp_path / "report.html").read_text()
    listed = {int(x) for x in re.findall(r"<tr><td>(\d+)</td>", html[html.index("<h2>Template features"):])}
    assert listed and not listed & set(df.neuron_idx) and (df.template_share < 0.02).all()


def test_a_refused_key_ends_with_one_sentence_and_no_outputs(tmp_path, trained):
    server = FakeOpenAI(failures=[401] * 100)
    try:
        env = dict(offline_env(), OPENAI_BASE_URL=server.url.replace("http://", "http://user:secret@"),
                   OPENAI_API_KEY="sk-bad")
        proc = interpret(tmp_path, trained, env=env, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "refused the API key (401); set OPENAI_API_KEY to a valid key" in proc.stderr
        assert "secret" not in proc.stdout + proc.stderr, "credentials in the URL are never printed"
        assert len(server.log) == 1 and not (tmp_path / "interpretations.csv").exists()
        flag = interpret(tmp_path, trained, f"--openai_base_url={server.url.replace('http://', 'http://u:secret@')}",
                         check=False)
        assert "secret" not in flag.stdout + flag.stderr and "http://***@127.0.0.1" in flag.stdout
        assert len(server.log) == 2
    finally:
        server.close()


def test_an_unfinished_checkpoint_is_named_as_such(tmp_path, trained):
    acts, ckpt_path, dataset = trained
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["resume"] = {"epoch": ckpt["epoch"]}
    unfinished = tmp_path / "SAE_M=16_K=4.unfinished.pt"
    torch.save(ckpt, unfinished)
    proc = interpret(tmp_path, (acts, str(unfinished), dataset))
    assert f"Note: {unfinished} is an unfinished run (training stopped after epoch {ckpt['epoch']})" in proc.stdout
    assert "is an unfinished run" not in interpret(tmp_path, trained).stdout


def test_a_full_disk_leaves_all_old_outputs(tmp_path, trained):
    import resource
    interpret(tmp_path, trained)
    names = ["interpretations.csv", "report.html", "report.json"]
    old = [(tmp_path / name).read_bytes() for name in names]
    acts, ckpt, dataset = trained
    base = [f"--activations_path={acts}", f"--sae_checkpoint={ckpt}", f"--dataset_path={dataset}", "--n_top_neurons=2",
            f"--output_csv={tmp_path / 'interpretations.csv'}", f"--report_html={tmp_path / 'report.html'}"]
    # room for the CSV (and the few KB torch 2.6 writes while it is imported), not for the report
    limit = len(old[0]) + 10_000
    assert limit < len(old[1]), "the report must not fit, or this tests nothing"
    proc = run_script("interpret_sae.py", *base, cwd=tmp_path, env=offline_env(), check=False,
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the previous outputs are unchanged" in proc.stderr
    assert [(tmp_path / name).read_bytes() for name in names] == old
    assert sorted(os.listdir(tmp_path)) == names



def test_select_by_label_auroc_puts_each_labels_best_feature_first(tmp_path, trained):
    """SELECT_BY=label_auroc: the leading rows are the best features of distinct labels, in decreasing AUROC,
    and no row is a template feature."""
    interpret(tmp_path, trained, "--select_by=label_auroc", "--n_top_neurons=6")
    df = pd.read_csv(tmp_path / "interpretations.csv")
    n_labels = df.top_label.nunique()
    leaders = df.head(n_labels)
    assert leaders.top_label.is_unique and list(leaders.top_label_auroc) == sorted(leaders.top_label_auroc, reverse=True)
    assert (df.kind == "content").all() and len(df) == 6
