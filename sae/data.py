"""Reading a dataset of texts or chats, with a clear error for each bad record: JSONL (one object per line),
CSV or Parquet (one example per row, read with pandas; Parquet needs pyarrow).

A record holds its text in TEXT_FIELD (default "text"), or a `messages` list of {role, content} turns
(roles system/user/assistant; in a CSV cell, that list as JSON). The label field is carried along when
there is one. An example's index is its 0-based line (JSONL) or row (CSV, Parquet) in the file.
"""
import hashlib
import json
import os

ROLES = ("system", "user", "assistant")
AUTO_LABEL_FIELDS = ("primary_cognitive_action", "cognitive_action")


class DatasetError(Exception):
    """A problem with the dataset file; the message names the file and line and how to fix it."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _messages(record: dict, where: str, text_field: str) -> list[dict]:
    if text_field in record:
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where} has an empty or non-string '{text_field}'; fill it in or remove it")
        return [{"role": "user", "content": text}]
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{where} has a 'messages' field that is not a non-empty list of "
                               f"{{role, content}} turns; fix or remove the line")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                raise DatasetError(f"{where}: message {j} has role {role!r}; roles must be one of "
                                   f"{', '.join(ROLES)}")
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise DatasetError(f"{where}: message {j} ({m['role']}) has empty or non-string content; "
                                   f"fill it in or remove the turn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise DatasetError(f"{where} has no '{text_field}' field and no 'messages' list; set TEXT_FIELD to the "
                       f"field that holds the text (fields here: {', '.join(record)})")


def resolve_label_field(path: str, label_field: str | None) -> str | None:
    """LABEL_FIELD "auto" picks the first of AUTO_LABEL_FIELDS present in the first record."""
    if label_field in (None, "", "none", "None"):
        return None
    if label_field != "auto":
        return label_field
    for _, _, record in _records(path):
        return next((f for f in AUTO_LABEL_FIELDS if f in record), None)
    return None


def _table_records(path: str):
    """(index, where, record) of each row of a CSV or Parquet file, empty cells left out."""
    import pandas as pd
    try:
        if path.lower().endswith(".csv"):
            table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        else:
            table = pd.read_parquet(path)
    except ImportError as e:
        raise DatasetError(f"reading {path} needs a Parquet engine ({e}); pip install pyarrow") from None
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DatasetError(f"{path} cannot be read as {'CSV' if path.lower().endswith('.csv') else 'Parquet'} "
                           f"({str(e).strip().splitlines()[0][:200]}); fix the file or save it as JSONL") from None
    for i, row in enumerate(table.to_dict("records")):
        where = f"{path} row {i + 1}"
        record = {k: v for k, v in row.items() if not (v is None or (isinstance(v, str) and v == "")
                                                          or (isinstance(v, float) and v != v))}
        messages = record.get("messages")
        if isinstance(messages, str):
            try:
                record["messages"] = json.loads(messages)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: its 'messages' cell is not a JSON list ({e.msg}); write it as "
                                   f"[{{\"role\": \"user\", \"content\": \"...\"}}]") from None
        elif messages is not None and not isinstance(messages, list):  # Parquet: an array of structs
            record["messages"] = list(messages)
        yield i, where, record


def _records(path: str):
    """(0-based index, where, record) of each example in the file."""
    if not os.path.isfile(path):
        raise DatasetError(f"dataset {path} does not exist; set DATASET_PATH to a JSONL, CSV or Parquet file")
    if path.lower().endswith((".csv", ".parquet")):
        yield from _table_records(path)
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path} line {line_no} is not UTF-8 text (byte {e.start + 1} of the line); "
                                   f"save the file as UTF-8 or fix that line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path} line {line_no} is not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                                   f"fix or remove that line") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path} line {line_no} is a JSON {type(record).__name__}, not an object; "
                                   f"each line must be one object such as {{\"text\": \"...\"}}")
            yield line_no - 1, f"{path} line {line_no}", record


def iter_examples(path: str, text_field: str, label_field: str | None):
    """Yield (index, messages, label) per example; index is the 0-based line (JSONL) or row in the file."""
    n = 0
    for index, where, record in _records(path):
        messages = _messages(record, where, text_field)
        label = None
        if label_field is not None:
            value = record.get(label_field)
            label = "" if value is None else str(value)
        n += 1
        yield index, messages, label
    if n == 0:
        raise DatasetError(f"dataset {path} is empty; it needs one example per line (JSONL) or row (CSV, Parquet)")


def count_examples(path: str) -> int:
    """How many records the file holds (blank JSONL lines do not count)."""
    return sum(1 for _ in _records(path))
