"""A sweep over layers, dictionary sizes and K: one SAE per (layer, M, K) cell, one comparison table, one
stated rule for the best cell.

run_pipeline.py trains the cells; this module turns each cell's checkpoint metrics into a row of the
table (sweep.csv, the console, report.html's sweep section) and picks the best cell:

    among the cells whose ΔLM loss (next-token loss with the SAE spliced in, relative to the clean model)
    is at most MAX_DELTA_LM percent, the most labels covered (labels that are some feature's own best
    label at AUROC >= 0.8), then the best probe on SAE features, then the lowest ΔLM loss;

without labels the lowest ΔLM loss wins; without the LM evaluation the bound is not applied. Every row's
`verdict` says why it is or is not the best, so the rule is read where the numbers are.
"""
import csv
import io
from typing import NamedTuple

SWEPT = ("LAYER_IDX", "M", "K")  # the settings run_pipeline.py accepts as lists
MAX_DELTA_LM = 10.0  # percent: cells whose ΔLM loss is above it are not chosen while another is below


class Cell(NamedTuple):
    layer: int
    m: int
    k: int

    @property
    def name(self) -> str:
        return f"layer{self.layer}_M{self.m}_K{self.k}"


# (column, header in the console, format, meaning): the table's one list of metrics
COLUMNS = [
    ("layer", "layer", "{}", "output of decoder block L"),
    ("M", "M", "{}", "features"),
    ("K", "K", "{}", "active features per token"),
    ("content_nmse", "content NMSE", "{:.4f}", "normalized MSE on validation content tokens (user and assistant turns)"),
    ("delta_lm_pct", "ΔLM %", "{:+.2f}", "next-token loss with the SAE spliced in, relative to the clean model"),
    ("loss_recovered_pct", "recovered %", "{:.1f}", "loss recovered against mean ablation"),
    ("dead_pct", "dead %", "{:.1f}", "features that fired in none of the last DEAD_STEPS training steps"),
    ("never_fired_pct", "never %", "{:.1f}", "features that never fire on validation tokens"),
    ("labels_covered", "labels", "{}", "labels that are some feature's own best label at AUROC >= 0.8"),
    ("mean_best_auroc", "best AUROC", "{:.3f}", "mean over features of their best label's AUROC"),
    ("probe_sae_pct", "probe SAE %", "{:.1f}", "linear probe on per-example feature maxima, validation accuracy"),
    ("probe_raw_pct", "probe raw %", "{:.1f}", "the same probe on mean-pooled raw activations at that layer"),
    ("train_s", "train s", "{:.0f}", "training time (epochs only)"),
    ("epochs", "epochs", "{}", "epochs run before early stopping"),
]
CSV_COLUMNS = [c for c, *_ in COLUMNS] + ["checkpoint", "best", "verdict"]


def parse_list(name: str, value, where: str) -> list[int]:
    """A swept setting's values: an int, or a non-empty list of distinct positive ints (LAYER_IDX may be 0).
    Raises ValueError with one sentence naming `where`."""
    values = value if isinstance(value, list) else [value]
    low = 0 if name == "LAYER_IDX" else 1
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
        raise ValueError(f"{where}: {name.lower()} must be an int >= {low} or a list of them, such as [{low + 6}, "
                         f"{low + 12}]")
    if len(set(values)) != len(values):
        raise ValueError(f"{where} lists a value twice; give each {name.lower()} once")
    return values


def row(cell: Cell, checkpoint: str, metrics: dict) -> dict:
    """The cell's row from its checkpoint's metrics (None where a metric was not measured)."""
    lm = metrics.get("lm_eval") or {}
    lab = metrics.get("labels") or {}

    def pct(value):
        return None if value is None else 100 * value

    return {"layer": cell.layer, "M": cell.m, "K": cell.k, "content_nmse": metrics.get("val_nmse_content"),
            "delta_lm_pct": lm.get("delta_lm_loss_pct"), "loss_recovered_pct": pct(lm.get("frac_recovered_mean")),
            "dead_pct": pct(metrics.get("dead_ratio")), "never_fired_pct": pct(metrics.get("never_fired_ratio")),
            "labels_covered": lab.get("labels_covered"), "mean_best_auroc": lab.get("mean_best_auroc"),
            "probe_sae_pct": pct(lab.get("probe_sae_accuracy")), "probe_raw_pct": pct(lab.get("probe_raw_accuracy")),
            "train_s": metrics.get("train_seconds"), "epochs": metrics.get("epochs"), "checkpoint": checkpoint}


def choose(rows: list[dict], max_delta_lm: float = MAX_DELTA_LM) -> tuple[int, str]:
    """(index of the best row, the rule as applied) and each row's `best` and `verdict` filled in."""
    has_lm = all(r["delta_lm_pct"] is not None for r in rows)
    has_labels = all(r["labels_covered"] is not None for r in rows)
    within = [i for i, r in enumerate(rows) if not has_lm or r["delta_lm_pct"] <= max_delta_lm]
    pool = within or list(range(len(rows)))
    if has_labels:
        def key(i):
            r = rows[i]
            return (-r["labels_covered"], -(r["probe_sae_pct"] or 0), r["delta_lm_pct"] if has_lm else 0)
        rule = "the most labels covered, then the best probe on SAE features" + (", then the lowest ΔLM loss"
                                                                                 if has_lm else "")
    elif has_lm:
        def key(i):
            return rows[i]["delta_lm_pct"]
        rule = "the lowest ΔLM loss (the dataset has no labels)"
    else:
        def key(i):
            return i
        rule = "the first cell (neither labels nor the LM evaluation were measured, so nothing ranks the cells)"
    best = min(pool, key=key)
    if has_lm:
        rule += (f", among the cells whose ΔLM loss is at most {max_delta_lm:g}%" if within else
                 f" (no cell has a ΔLM loss of at most {max_delta_lm:g}%, so all cells are compared)")
    else:
        rule += "; the ΔLM bound is not applied (no LM evaluation)"
    b = rows[best]
    for i, r in enumerate(rows):
        r["best"] = i == best
        if i == best:
            r["verdict"] = "best: " + rule
        elif i not in pool:
            r["verdict"] = f"ΔLM loss {r['delta_lm_pct']:+.2f}% is over the {max_delta_lm:g}% bound"
        elif has_labels and r["labels_covered"] != b["labels_covered"]:
            r["verdict"] = f"covers {r['labels_covered']} labels, the best {b['labels_covered']}"
        elif has_labels and (r["probe_sae_pct"] or 0) != (b["probe_sae_pct"] or 0):
            r["verdict"] = f"same labels covered; probe {r['probe_sae_pct']:.1f}%, the best {b['probe_sae_pct']:.1f}%"
        elif has_lm:
            r["verdict"] = f"ΔLM loss {r['delta_lm_pct']:+.2f}%, the best {b['delta_lm_pct']:+.2f}%"
        else:
            r["verdict"] = "not ranked"
    return best, rule


def value_text(fmt: str, value) -> str:
    return "n/a" if value is None else fmt.format(value)


def console_table(rows: list[dict]) -> list[str]:
    """The sweep as aligned console lines, the best cell marked with *."""
    heads = [h for _, h, *_ in COLUMNS]
    cells = [[value_text(f, r[c]) for c, _, f, _ in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(x[j]) for x in cells)) for j, h in enumerate(heads)]
    lines = ["  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += [("* " if r["best"] else "  ") + "  ".join(x.rjust(w) for x, w in zip(xs, widths))
              for r, xs in zip(rows, cells)]
    return lines


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if r.get(c) is None else r[c]) for c in CSV_COLUMNS} for r in rows)
    return out.getvalue()


def read_csv(path: str) -> list[dict]:
    """sweep.csv's rows, numbers as numbers and empty cells as None."""
    def value(text: str):
        if text == "":
            return None
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if missing := [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]:
            raise ValueError(f"it has no column {missing[0]}")
        return [{k: value(v) for k, v in r.items()} for r in reader]
