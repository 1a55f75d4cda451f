from sae import sweep


def cell_row(layer, m, delta, labels, probe):
    metrics = {"val_nmse_content": 0.3, "dead_ratio": 0.0, "never_fired_ratio": 0.01, "train_seconds": 5.0, "epochs": 3,
               "lm_eval": {"delta_lm_loss_pct": delta, "frac_recovered_mean": 0.9}}
    if labels is not None:
        metrics["labels"] = {"labels_covered": labels, "mean_best_auroc": 0.7, "probe_sae_accuracy": probe,
                             "probe_raw_accuracy": 0.4}
    return sweep.row(sweep.Cell(layer, m, 8), f"ckpt_{layer}_{m}.pt", metrics)


def test_best_cell_rule():
    rows = [cell_row(6, 128, 12.0, 40, 0.5),  # the most labels, but over the ΔLM bound
            cell_row(6, 256, 9.0, 30, 0.2),
            cell_row(12, 128, 8.0, 30, 0.3),  # same labels as the next, better probe: the best
            cell_row(12, 256, 5.0, 30, 0.25),
            cell_row(18, 256, 10.0, 29, 0.9)]  # at the bound: allowed, one label fewer
    best, rule = sweep.choose(rows, max_delta_lm=10)
    assert best == 2 and rule.startswith("the most labels covered") and "at most 10%" in rule
    assert [r["best"] for r in rows] == [False, False, True, False, False]
    assert rows[0]["verdict"] == "ΔLM loss +12.00% is over the 10% bound"
    assert rows[3]["verdict"] == "same labels covered; probe 25.0%, the best 30.0%"
    assert rows[4]["verdict"] == "covers 29 labels, the best 30"
    assert sweep.choose(rows, max_delta_lm=4)[0] == 0 and "no cell has a ΔLM loss of at most 4%" in rows[0]["verdict"]

    unlabeled = [cell_row(6, 128, 7.0, None, None), cell_row(12, 128, 3.0, None, None), cell_row(18, 128, 11.0, None, None)]
    best, rule = sweep.choose(unlabeled)
    assert best == 1 and rule.startswith("the lowest ΔLM loss")


def test_table_round_trips_through_csv(tmp_path):
    rows = [cell_row(6, 128, 12.0, 40, 0.5), cell_row(12, 256, 9.0, 30, 0.2)]
    rows[0]["labels_covered"] = None  # a metric not measured stays empty, not 0
    sweep.choose(rows)
    path = tmp_path / "sweep.csv"
    path.write_text(sweep.to_csv(rows))
    back = sweep.read_csv(str(path))
    assert back == [{c: r.get(c) for c in sweep.CSV_COLUMNS} for r in rows]
    lines = sweep.console_table(back)
    assert len(lines) == 3 and lines[2].startswith("* ") and " n/a " in lines[1] and "+12.00" in lines[1]


def test_a_foreign_csv_is_refused(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text("layer,M\n6,128\n")
    try:
        sweep.read_csv(str(path))
    except ValueError as e:
        assert str(e) == "it has no column K"
    else:
        raise AssertionError("a CSV without the sweep's columns was read")
