"""Datasets as JSONL, CSV or Parquet: the same examples, labels and indices, and bad records named."""
import json

import pandas as pd
import pytest

from conftest import run_script, tiny_records, write_jsonl
from sae.data import DatasetError, count_examples, iter_examples, resolve_label_field

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I changed my mind."}]


def _records():
    rows = [{"text": r["text"], "cognitive_action": r["primary_cognitive_action"]} for r in tiny_records(7)[:6]]
    rows.append({"messages": CHAT, "cognitive_action": "reconsidering"})
    return rows


def test_csv_and_parquet_give_the_same_examples_as_jsonl(tmp_path):
    rows = _records()
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    table = pd.DataFrame([{**r, "messages": json.dumps(r["messages"]) if "messages" in r else ""} for r in rows])
    table.to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame([{**r, "messages": r.get("messages")} for r in rows]).to_parquet(tmp_path / "d.parquet")
    want = list(iter_examples(jsonl, "text", "cognitive_action"))
    assert want[-1] == (6, CHAT, "reconsidering")
    for path in (tmp_path / "d.csv", tmp_path / "d.parquet"):
        assert resolve_label_field(str(path), "auto") == "cognitive_action"
        assert list(iter_examples(str(path), "text", "cognitive_action")) == want, path.suffix
        assert count_examples(str(path)) == len(rows)


def test_bad_table_records_are_named_by_row(tmp_path):
    pd.DataFrame({"text": ["fine", ""], "cognitive_action": ["a", "b"]}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(DatasetError, match=r"empty.csv row 2 has no 'text' field"):
        list(iter_examples(str(tmp_path / "empty.csv"), "text", None))
    pd.DataFrame({"messages": ["[not json"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DatasetError, match=r"bad.csv row 1: its 'messages' cell is not a JSON list"):
        list(iter_examples(str(tmp_path / "bad.csv"), "text", None))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"broken.parquet cannot be read as Parquet"):
        list(iter_examples(str(tmp_path / "broken.parquet"), "text", None))


def test_extraction_reads_a_csv_dataset(tiny_model, tmp_path):
    rows = _records()
    write_jsonl(tmp_path / "d.jsonl", rows)
    pd.DataFrame([{**r, "messages": json.dumps(r["messages"]) if "messages" in r else ""} for r in rows]).to_csv(
        tmp_path / "d.csv", index=False)
    import numpy as np
    for name in ("d.jsonl", "d.csv"):
        run_script("extract_activations.py", f"--model_name={tiny_model}", f"--dataset_path={tmp_path / name}",
                   f"--output_dir={tmp_path / name}_acts", "--layer_idx=1", cwd=tmp_path)
    a, b = (np.load(tmp_path / f"{n}_acts" / "activations_layer1.npz", allow_pickle=False) for n in ("d.jsonl", "d.csv"))
    for key in ("token_ids", "token_role", "offsets", "example_index", "labels"):
        assert np.array_equal(a[key], b[key]), key
