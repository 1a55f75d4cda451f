import importlib.util
import json
import os
import re
from collections import Counter

from conftest import ROOT

PATH = os.path.join(ROOT, "data", "cognitive_actions_sample.jsonl")
FIELDS = {"text", "primary_cognitive_action", "domain", "complexity", "perspective", "format_type", "metadata"}


def test_sample_dataset_schema_counts_and_lengths():
    records = [json.loads(line) for line in open(PATH, encoding="utf-8")]
    assert len(records) >= 900 and all(set(r) == FIELDS for r in records)
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts)
    assert all(30 <= len(t.split()) <= 120 for t in texts)
    counts = Counter(r["primary_cognitive_action"] for r in records)
    assert len(counts) == 45 and min(counts.values()) >= 20
    assert all(re.search(r"\b(I|my|me|we|our)\b", t) for t in texts), "texts are first-person"


def test_generator_is_deterministic(tmp_path):
    spec = importlib.util.spec_from_file_location("gen", os.path.join(ROOT, "data", "make_cognitive_actions_sample.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    out = str(tmp_path / "sample.jsonl")
    gen.main(out=out)
    assert open(out, "rb").read() == open(PATH, "rb").read()
