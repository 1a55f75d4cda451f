"""report.html's contents: the metrics as metrics.json holds them (rounded), the LM table, and text escaped;
the console's feature table."""
import re

import numpy as np

from sae.report import feature_table, render_report

METRICS = {"val_nmse": 0.26668889785, "val_nmse_content": 0.2639936, "val_prefix_nmse": [0.47771, 0.26668889],
           "l0": 8.0, "dead_ratio": 0.00390625, "never_fired_ratio": 0.0, "epochs": 72, "train_tokens_per_s": 145023.4,
           "lm_eval": {"examples": 30, "predictions": 2973, "replaced": "content", "ce_clean": 4.30331,
                       "ce_sae": 4.66932, "ce_zero": 14.4671, "ce_mean": 9.2338, "delta_lm_loss_pct": 8.50327,
                       "frac_recovered_zero": 0.96398, "frac_recovered_mean": 0.92583, "kl_sae": 1.07582}}


def _render(cards=(), metrics=METRICS, train=None):
    return render_report("t", {"train": train}, metrics, [{"train_loss": 1.0, "val_loss": 1.1, "dead_ratio": 0.0039}],
                         np.array([0.1, 0.5]), None, [], list(cards), "note")


def _cell(html, label):
    return re.search(rf"<th>{re.escape(label)}</th><td>([^<]*)</td>", html).group(1)


def test_the_metrics_table_shows_metrics_json_rounded_under_their_names():
    html = _render()
    assert _cell(html, "normalized MSE") == "0.2667" and _cell(html, "normalized MSE, content tokens") == "0.2640"
    assert _cell(html, "normalized MSE per Matryoshka prefix") == "0.4777, 0.2667"
    assert _cell(html, "active features per token") == "8.00" and _cell(html, "dead features") == "0.4%"
    assert _cell(html, "epochs") == "72" and _cell(html, "training speed") == "145,023 tokens/s"
    assert _cell(html, "ΔLM loss (%)") == "8.5033" and _cell(html, "CE clean") == "4.3033"
    assert _cell(html, "loss recovered vs zero") == "0.9640"
    assert "per Matryoshka prefix" not in _render(metrics=dict(METRICS, val_prefix_nmse=[0.26668889])), \
        "a plain TopK SAE's one prefix is the overall figure again"


def test_the_loss_curve_says_what_loss_it_plots():
    assert ") loss: normalized MSE, on layer-normed tokens<" in _render(train={"USE_MATRYOSHKA": False,
                                                                             "INPUT_NORM": "layer_norm"})
    assert ") loss: normalized MSE, mean over Matryoshka prefixes<" in _render(train={"USE_MATRYOSHKA": True,
                                                                                   "INPUT_NORM": "none"})


def test_dataset_text_and_descriptions_stay_text():
    card = {"neuron_idx": 3, "title": "Feature 3", "interpretation": "<b>bold</b> claim", "source": "llm",
            "stats": "1.0% of examples", "examples": ["she typed <script>alert(1)</script> and «left»"]}
    html = _render([card])
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt; claim" in html and "<mark>left</mark>" in html


def test_the_console_table_keeps_the_peak_of_a_long_description_in_view():
    head = "From the data: label 'metacognitive_regulation' (AUROC 0.88); peaks on ' color', ' frame'; e.g. “"
    text = head + "it was hard, and after a long week of work I finally shifted «my» focus to what mattered”"
    line, = feature_table([(79, 0.767, text)], width=140)
    shown = line.split("active): ", 1)[1]
    assert len(shown) == 140 and shown.startswith(head + "…") and "«my»" in shown and shown.endswith("…")
    short = "From the data: label 'x' (AUROC 0.90); e.g. “a «b» c”"
    assert feature_table([(1, 0.5, short)]) == ["  Neuron     1 ( 50.0% active): " + short]
    no_example = "x" * 200
    assert feature_table([(2, 0.1, no_example)], width=50)[0].endswith("x" * 49 + "…")
