"""Reading a JSONL dataset of texts or chats, one example per line, with a clear error for each bad line.

A record holds its text in TEXT_FIELD (default "text"), or a `messages` list of {role, content} turns
(roles system/user/assistant). The label field is carried along when there is one.
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
            raise DatasetError(f"{where} has an empty or non-string '{text_field}'; fill it in or remove the line")
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
    for _, record in _records(path):
        return next((f for f in AUTO_LABEL_FIELDS if f in record), None)
    return None


def _records(path: str):
    if not os.path.isfile(path):
        raise DatasetError(f"dataset {path} does not exist; set DATASET_PATH to a JSONL file")
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
            yield line_no, record


def iter_examples(path: str, text_field: str, label_field: str | None):
    """Yield (line_index, messages, label) per example; line_index is the 0-based line in the file."""
    n = 0
    for line_no, record in _records(path):
        messages = _messages(record, f"{path} line {line_no}", text_field)
        label = None
        if label_field is not None:
            value = record.get(label_field)
            label = "" if value is None else str(value)
        n += 1
        yield line_no - 1, messages, label
    if n == 0:
        raise DatasetError(f"dataset {path} is empty; it needs one JSON object per line")
