"""The one record per output and the one staleness rule, the same for every step."""
import json

import numpy as np
import pytest
import torch

from sae.provenance import (MAY_CHANGE_WHEN_CONTINUING, NO_EFFECT, differences, interpretation_record_path,
                            make_record, read_record)

CONFIGS = {"extract": {"MODEL_NAME": "m", "LAYER_IDX": 12, "BATCH_TOKENS": 8192, "DTYPE": "auto"},
           "train": {"M": 256, "K": 8, "RESUME": False, "N_EPOCHS": 100, "LR": 5e-4},
           "interpret": {"N_TOP_NEURONS": 20, "OPENAI_BASE_URL": "http://user:secret@host/v1"}}


@pytest.mark.parametrize("step", list(CONFIGS))
def test_staleness_is_decided_the_same_way_for_every_step(step):
    config, inputs = CONFIGS[step], {"data": "a" * 64}
    stored = make_record(step, config, inputs)
    assert differences(stored, make_record(step, dict(config), dict(inputs))) == []
    for name in NO_EFFECT[step]:  # never stale, never refused
        changed = make_record(step, {**config, name: "other"}, inputs)
        assert differences(stored, changed) == [] and differences(stored, changed, continuing=True) == []
    other = next(k for k in config if k not in NO_EFFECT[step] + MAY_CHANGE_WHEN_CONTINUING[step])
    assert differences(stored, make_record(step, {**config, other: "x"}, inputs)) == [f"setting {other}"]
    assert differences(stored, make_record(step, {**config, other: "x"}, inputs), continuing=True) == [f"setting {other}"]
    assert differences(stored, make_record(step, config, {"data": "b" * 64})) == ["input data"]
    assert differences(stored, make_record(step, config, inputs, processes=2)) == ["number of processes"]
    assert differences(None, stored) == ["no record of how it was made"]
    unfinished = make_record(step, config, inputs, complete=False)
    assert differences(unfinished, stored) == ["unfinished work"] and differences(unfinished, stored, continuing=True) == []


def test_settings_that_act_after_the_work_so_far_may_change_when_continuing_but_make_a_finished_output_stale():
    stored = make_record("train", CONFIGS["train"], {})
    longer = make_record("train", {**CONFIGS["train"], "N_EPOCHS": 200}, {})
    assert differences(stored, longer, continuing=True) == [] and differences(stored, longer) == ["setting N_EPOCHS"]


def test_secrets_are_not_recorded():
    record = make_record("interpret", CONFIGS["interpret"], {})
    assert "secret" not in json.dumps(record)


def test_the_record_is_read_from_each_kind_of_output(tmp_path):
    record = make_record("extract", CONFIGS["extract"], {"dataset": "d"})
    np.savez(tmp_path / "a.npz", meta=np.array(json.dumps({"record": record})))
    torch.save({"record": record}, tmp_path / "c.pt")
    torch.save({"record": record, "resume": {}}, tmp_path / "u.pt")
    (tmp_path / "report.json").write_text(json.dumps({"record": record}))
    assert interpretation_record_path(str(tmp_path / "report.html")) == str(tmp_path / "report.json")
    for name in ("a.npz", "c.pt", "report.json"):
        assert read_record(str(tmp_path / name)) == record, name
    assert read_record(str(tmp_path / "u.pt")) is None, "an unfinished checkpoint is never current"
