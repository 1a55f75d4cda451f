"""A self-contained HTML report: inline SVG plots and CSS, nothing fetched from the network."""
import html
import json

import numpy as np

from .sweep import COLUMNS as SWEEP_COLUMNS, value_text

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1,h2{font-weight:600}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px}
.card{border:1px solid #ccc;border-radius:6px;padding:10px 14px;margin:12px 0}
.card h3{margin:0 0 6px 0;font-size:16px}.muted{color:#777;font-size:13px}
.ex{font-size:13px;margin:3px 0;padding:3px 6px;background:#f7f7f7;border-radius:3px}
mark{background:#ffd54f;padding:0 2px}svg text{font-size:11px;font-family:system-ui,sans-serif}
details{margin:8px 0}pre{white-space:pre-wrap;font-size:12px}"""


def _esc(x) -> str:
    return html.escape(str(x))


def line_plot(series: dict, width=520, height=220, ylabel="", floor=None, min_top=None, x_labels=None) -> str:
    """SVG line plot of {name: [values]}: one value per epoch, or per entry of `x_labels` (ticks named, None
    for a missing value); the y axis from `floor` (else the lowest value) to the highest value, at least `min_top`."""
    series = {k: [np.nan if v is None else v for v in vs] for k, vs in series.items() if vs}
    values = np.array([v for vs in series.values() for v in vs], dtype=float)
    if not series or np.isnan(values).all():
        return "<p class=muted>no data</p>"
    lo = float(np.nanmin(values)) if floor is None else floor
    hi = max(float(np.nanmax(values)), lo if min_top is None else min_top)
    hi = hi if hi > lo else lo + 1
    n = len(x_labels) if x_labels is not None else max(len(vs) for vs in series.values())
    left, bottom, top, right = 50, 30, 10, 110
    w, h = width - left - right, height - top - bottom

    def x(j):
        return left + (j / max(n - 1, 1)) * w

    def y(v):
        return top + h - (v - lo) / (hi - lo) * h

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    caption = f"epoch (1–{n}) {ylabel}" if x_labels is None else ylabel
    parts = [f'<svg width="{width}" height="{height}" role="img">',
             f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{hi:.3g}</text>',
             f'<text x="{left - 4}" y="{top + h}" text-anchor="end">{lo:.3g}</text>',
             f'<text x="{left + w / 2}" y="{height - 4}" text-anchor="middle">{_esc(caption)}</text>']
    if x_labels is not None:
        parts += [f'<text x="{x(j):.1f}" y="{top + h + 12}" text-anchor="middle">{_esc(t)}</text>'
                  for j, t in enumerate(x_labels)]
    for i, (name, vs) in enumerate(series.items()):
        c = colors[i % len(colors)]
        pts = [(x(j), y(v)) for j, v in enumerate(vs) if not np.isnan(v)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" '
                     f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in pts] if x_labels is not None else []
        parts.append(f'<text x="{left + w + 8}" y="{top + 14 + 16 * i}" fill="{c}">{_esc(name)}</text>')
    return "".join(parts) + "</svg>"


def histogram(values: np.ndarray, bins=20, width=520, height=220, xlabel="") -> str:
    counts, edges = np.histogram(values, bins=bins, range=(0, max(float(np.max(values)) if len(values) else 1, 1e-9)))
    left, bottom, top = 40, 30, 10
    w, h = width - left - 10, height - top - bottom
    peak = max(int(counts.max()), 1)
    bw = w / bins
    parts = [f'<svg width="{width}" height="{height}" role="img">']
    for i, c in enumerate(counts):
        bh = c / peak * h
        parts.append(f'<rect x="{left + i * bw:.1f}" y="{top + h - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" '
                     f'fill="#1f77b4"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}</title></rect>')
    parts += [f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
              f'<text x="{left}" y="{height - 14}">{edges[0]:.2g}</text>',
              f'<text x="{left + w}" y="{height - 14}" text-anchor="end">{edges[-1]:.2g}</text>',
              f'<text x="{left + w / 2}" y="{height - 2}" text-anchor="middle">{_esc(xlabel)}</text>']
    return "".join(parts) + "</svg>"


def heatmap(matrix: np.ndarray, row_names: list, col_names: list, cell=14) -> str:
    """Rows × columns of values in [0, 1] (AUROC): blue below 0.5, red above."""
    left, top = 220, 80
    width, height = left + cell * len(col_names) + 10, top + cell * len(row_names) + 10
    parts = [f'<svg width="{width}" height="{height}" role="img">']
    for j, name in enumerate(col_names):
        x = left + j * cell + cell / 2
        parts.append(f'<text transform="translate({x},{top - 4}) rotate(-60)">{_esc(name)}</text>')
    for i, name in enumerate(row_names):
        parts.append(f'<text x="{left - 4}" y="{top + i * cell + cell - 3}" text-anchor="end">{_esc(name)}</text>')
        for j in range(len(col_names)):
            v = matrix[i, j]
            if np.isnan(v):
                color = "#eee"
            else:
                t = max(-1.0, min(1.0, (v - 0.5) * 2))
                r, g, b = (255, int(255 * (1 - t)), int(255 * (1 - t))) if t >= 0 else \
                    (int(255 * (1 + t)), int(255 * (1 + t)), 255)
                color = f"rgb({r},{g},{b})"
            parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="{color}" stroke="#ddd"><title>{_esc(row_names[i])} × {_esc(col_names[j])}: {v:.3f}</title></rect>')
    return "".join(parts) + "</svg>"


# (key in metrics.json, label, format of the value, what it means); keys not listed are not shown here
METRICS = [
    ("val_nmse", "normalized MSE", "{:.4f}", "validation tokens trained on: the share of their variance the SAE does not "
     "reconstruct (0 perfect, 1 no better than their mean)"),
    ("val_nmse_content", "normalized MSE, content tokens", "{:.4f}", "the same on user and assistant text outside "
     "prefixes that several examples share"),
    ("val_prefix_nmse", "normalized MSE per Matryoshka prefix", "list", "reconstructing from the first p features only, "
     "for each prefix p"),
    ("val_mse", "MSE", "{:.4g}", "mean squared error per dimension, in the activations' units"),
    ("l0", "active features per token", "{:.2f}", "average number of non-zero codes per token (K for TopK)"),
    ("dead_ratio", "dead features", "percent", "share of features that fired in none of the last DEAD_STEPS training steps"),
    ("never_fired_ratio", "features never firing on validation", "percent", "share of features that are zero on "
     "every validation token"),
    ("best_val_loss", "best validation loss", "{:.4f}", "the training objective at the saved (best) epoch"),
    ("epochs", "epochs", "{}", "run before early stopping or N_EPOCHS"),
    ("train_tokens_per_s", "training speed", "{:,.0f} tokens/s", "tokens per second over all epochs"),
    ("train_seconds", "training time", "{:.1f} s", "wall time of the epochs (without the final evaluations)"),
]


def metric_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(label, rounded value, explanation) of each headline metric present in `metrics`."""
    rows = []
    for key, label, fmt, meaning in METRICS:
        value = metrics.get(key)
        if value is None or (fmt == "list" and len(value) < 2):  # one Matryoshka prefix: the overall figure again
            continue
        if fmt == "percent":
            text = f"{100 * value:.1f}%"
        elif fmt == "list":
            text = ", ".join("n/a" if v is None else f"{v:.4f}" for v in value)
        else:
            text = fmt.format(value)
        rows.append((label, text, meaning))
    return rows


def highlight(snippet: str) -> str:
    """«peak» → <mark>peak</mark>, everything else escaped."""
    return _esc(snippet).replace("«", "<mark>").replace("»", "</mark>")


def feature_table(rows, width: int = 140) -> list[str]:
    """Console lines for (feature index, share of examples active, description) rows, as in
    "Neuron 42 (15.3% active): describes reconsidering a previous decision"."""
    return [f"  Neuron {int(f):>5} ({100 * prevalence:5.1f}% active): {shorten(text, width)}"
            for f, prevalence, text in rows]


def shorten(text: str, width: int, lead: int = 24) -> str:
    """text in at most `width` characters, cut at the end with "…"; when that cut would hide the «peak» of a
    quoted example (“… «peak» …”), the example's opening is cut too, so that the peak shows with up to `lead`
    characters before it (fewer when the room left is smaller) and as many after it as fit."""
    if len(text) <= width:
        return text
    quote, peak = text.find("“"), text.find("«")
    close = text.find("»", peak)
    if 0 <= quote < peak < close and close >= width - 1:
        room = width - 1 - (quote + 2) - (close + 1 - peak)  # characters left beside the peak
        keep = min(lead, room // 2, peak - quote - 1)
        if keep >= 0:
            text = text[:quote + 1] + "…" + text[peak - keep:]
    return text if len(text) <= width else text[:width - 1] + "…"


def loss_label(train: dict) -> str:
    """What the training curve plots, from train_sae.py's settings: the normalized MSE, averaged over the
    Matryoshka prefixes when they were on, and on layer-normed tokens when they were (the objective, so not
    in the activations' units that the metrics table uses)."""
    return ("loss: normalized MSE" + (", mean over Matryoshka prefixes" if train.get("USE_MATRYOSHKA") else "")
            + (", on layer-normed tokens" if train.get("INPUT_NORM") == "layer_norm" else ""))


def render_report(title: str, config: dict, metrics: dict, history: list, prevalence: np.ndarray,
                  auroc_LM: np.ndarray | None, label_names: list, cards: list[dict], llm_note: str,
                  template_rows: list[dict] = (), label_note: str | None = None, sweep_rows: list[dict] = ()) -> str:
    """The self-contained report.html: training curves, metrics, the SAE in the model, reconstruction by token
    kind, labels, the sweep this SAE was chosen from, prevalence, label association, the selected features'
    cards and the template features."""
    hist = {k: [h.get(k) for h in history] for k in ("train_loss", "val_loss")}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>",
             f"<p class=muted>{_esc(llm_note)}</p>",
             "<h2>Training</h2>", line_plot(hist, ylabel=loss_label(config.get("train") or {})),
             line_plot({"dead": [100 * h.get("dead_ratio", 0) for h in history]}, ylabel="dead features (%)",
                       floor=0, min_top=1),
             "<h2>Metrics</h2><table><tr><th>metric</th><th>value</th><th>what it means</th></tr>"]
    parts += [f"<tr><th>{_esc(label)}</th><td>{_esc(value)}</td><td class=muted>{_esc(meaning)}</td></tr>"
              for label, value, meaning in metric_rows(metrics)]
    parts.append("</table>")
    parts += _lm_section(metrics.get("lm_eval") or {}) + _kinds_section(metrics) + _labels_section(metrics, label_note)
    parts += _sweep_section(sweep_rows)
    parts += ["<h2>Feature prevalence</h2>",
              histogram(prevalence, xlabel="share of examples where the feature fires")]
    if auroc_LM is not None and len(label_names):
        best = np.nan_to_num(np.nanmax(auroc_LM, axis=0), nan=0.0)
        top = np.argsort(-best, kind="stable")[:30]
        rows = [f"#{f} {label_names[int(np.nanargmax(auroc_LM[:, f]))]}" if best[f] > 0.5 else f"#{f}" for f in top]
        parts += ["<h2>Label association</h2><p class=muted>One-vs-rest AUROC of each feature's per-example "
                  "activation for each label (red: higher for that label, blue: lower), for the 30 features "
                  "most associated with a label.</p>", heatmap(auroc_LM[:, top].T, rows, label_names)]
    parts += ["<h2>Features</h2>"] + [_card(c) for c in cards] + _template_section(template_rows)
    parts.append(f"<details><summary>Configuration</summary><pre>{_esc(json.dumps(config, indent=2))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _lm_section(lm_eval: dict) -> list[str]:
    if "skipped" in lm_eval:
        return [f"<h2>The SAE in the model</h2><p class=muted>Skipped: {_esc(lm_eval['skipped'])}</p>"]
    if "ce_clean" not in lm_eval:
        return []
    rows = [("CE clean", lm_eval["ce_clean"]), ("CE with the SAE", lm_eval["ce_sae"]),
            ("CE zero-ablated", lm_eval["ce_zero"]), ("CE mean-ablated", lm_eval["ce_mean"]),
            ("ΔLM loss (%)", lm_eval["delta_lm_loss_pct"]), ("loss recovered vs zero", lm_eval["frac_recovered_zero"]),
            ("loss recovered vs mean", lm_eval["frac_recovered_mean"]),
            ("KL(clean ‖ SAE), nats/token", lm_eval["kl_sae"])]
    return ([f"<h2>The SAE in the model</h2><p class=muted>Next-token cross-entropy on {lm_eval['examples']} "
             f"validation examples ({lm_eval['predictions']} predictions) with the layer's output replaced at "
             f"{_esc(lm_eval.get('replaced', ''))}.</p><table>"]
            + [f"<tr><th>{_esc(k)}</th><td>{v:.4f}</td></tr>" for k, v in rows] + ["</table>"])


def _kinds_section(metrics: dict) -> list[str]:
    kinds = metrics.get("by_token_kind") or {}
    if not kinds:
        return []
    parts = ["<h2>Reconstruction by token kind</h2><p class=muted>Validation tokens; a position that several "
             "examples share (identical prefix) counted once. First: each example's first token, the attention "
             "sink, whose activation is far larger than the others' (the default selection leaves it out of "
             "training). Content: user and assistant turns outside shared prefixes.</p>"
             "<table><tr><th>kind</th><th>tokens</th><th>MSE</th><th>normalized MSE</th><th>relative error</th>"
             "<th>L0</th></tr>"]
    content = {"content": metrics["content"]} if metrics.get("content") else {}
    for name, r in {**kinds, **content}.items():
        if r.get("tokens"):
            nmse = "n/a" if r["nmse"] is None else f"{r['nmse']:.4f}"
            parts.append(f"<tr><td>{_esc(name)}</td><td>{r['tokens']}</td><td>{r['mse']:.5g}</td><td>{nmse}</td>"
                         f"<td>{r['relative_error']:.4f}</td><td>{r['l0']:.2f}</td></tr>")
    return parts + ["</table>"]


def _labels_section(metrics: dict, label_note: str | None) -> list[str]:
    lab = metrics.get("labels") or {}
    if not (label_note or lab):
        return []
    parts = ["<h2>What the features say about the labels</h2>"]
    if label_note:
        parts.append(f"<p>{_esc(label_note)}.</p>")
    if lab.get("probe_raw_accuracy") is not None:
        means = lab.get("probe_sae_mean_accuracy")  # absent from checkpoints of older versions
        means = "" if means is None else f"SAE feature means {100 * means:.1f}%, "
        parts.append(f"<p>Linear probe on {lab['probe_val_examples']} validation examples: SAE feature maxima "
                     f"{100 * lab['probe_sae_accuracy']:.1f}%, {means}mean-pooled raw activations "
                     f"{100 * lab['probe_raw_accuracy']:.1f}% (most common label: {100 * lab['probe_chance']:.1f}%)."
                     + (" The feature means are pooled as the raw activations are, so their gap is what the SAE "
                        "loses; the maxima are what the feature cards read." if means else "") + "</p>")
    return parts


def _sweep_section(rows: list[dict]) -> list[str]:
    """The sweep's table (best row in bold) and one plot per metric over the layers, one line per (M, K)."""
    if not rows:
        return []
    best = next((r for r in rows if r["best"]), rows[0])
    layers = sorted({r["layer"] for r in rows})
    ks = {r["K"] for r in rows}
    sizes = sorted({(r["M"], r["K"]) for r in rows})
    parts = [f"<h2>Sweep ({len(rows)} cells)</h2><p>This SAE is the best of the sweep by its rule: "
             f"{_esc(best['verdict'].removeprefix('best: '))}.</p><table><tr>"]
    parts += [f"<th title='{_esc(meaning)}'>{_esc(head)}</th>" for _, head, _, meaning in SWEEP_COLUMNS] + ["<th>verdict</th></tr>"]
    for r in rows:
        cells = [value_text(fmt, r[c]) for c, _, fmt, _ in SWEEP_COLUMNS]
        style = " style='font-weight:600;background:#fff8d6'" if r["best"] else ""
        parts.append(f"<tr{style}>" + "".join(f"<td>{_esc(x)}</td>" for x in cells) + f"<td>{_esc(r['verdict'])}</td></tr>")
    parts.append("</table><p class=muted>Hover a column's name for its meaning. Each plot: the metric over the "
                 "layers, one line per dictionary size.</p><div style='display:flex;flex-wrap:wrap;gap:8px'>")
    for column, head, _, meaning in SWEEP_COLUMNS[3:]:
        series = {(f"M={m}" if len(ks) == 1 else f"M={m} K={k}"): [
            next((r[column] for r in rows if (r["layer"], r["M"], r["K"]) == (L, m, k)), None) for L in layers]
            for m, k in sizes}
        if column == "probe_sae_pct":  # the raw-activation probe depends on the layer alone: one more line
            series["raw"] = [next((r["probe_raw_pct"] for r in rows if r["layer"] == L), None) for L in layers]
        elif column == "probe_raw_pct":
            continue
        parts.append(f"<div><b>{_esc(head)}</b> <span class=muted>{_esc(meaning)}</span><br>"
                     + line_plot(series, width=400, height=200, ylabel="layer", x_labels=layers) + "</div>")
    return parts + ["</div>"]


def _card(c: dict) -> str:
    source = "" if c.get("source") == "llm" else f" <span class=muted>({_esc(c.get('source', 'data'))})</span>"
    return "\n".join([f"<div class=card><h3>{_esc(c['title'])}</h3><div>{_esc(c['interpretation'])}{source}</div>",
                      f"<div class=muted>{_esc(c['stats'])}</div>"]
                     + [f"<div class=ex>{highlight(ex)}</div>" for ex in c["examples"]] + ["</div>"])


def _template_section(template_rows: list[dict]) -> list[str]:
    if not template_rows:
        return []
    return ([f"<h2>Template features ({len(template_rows)})</h2><p class=muted>Features whose activation lies "
             "mostly on the chat template or on prefixes that several examples share (each position counted "
             "once): they describe the format, not the text, and are not selected above.</p>"
             "<table><tr><th>feature</th><th>peak token</th><th>share on template</th></tr>"]
            + [f"<tr><td>{r['neuron_idx']}</td><td><code>{_esc(repr(r['peak_token']))}</code></td>"
               f"<td>{100 * r['share']:.0f}%</td></tr>" for r in template_rows] + ["</table>"])
