"""The interpreted feature: its score from annotator votes (hand-counted) and its one formatter."""
import pytest

from sae.interpretation import CSV_COLUMNS, Feature, Score, Source, annotate_prompt


def test_score_counts_votes_by_hand():
    # 3 true positives, 1 missed activating example, 1 false alarm, 5 correct rejections
    votes = [(True, True)] * 3 + [(False, True)] + [(True, False)] + [(False, False)] * 5
    score = Score.from_votes(votes)
    assert (score.precision, score.recall, score.f1) == (0.75, 0.75, 0.75)
    lopsided = Score.from_votes([(True, True), (True, False), (True, False), (True, False)])
    assert lopsided.precision == 0.25 and lopsided.recall == 1.0 and lopsided.f1 == pytest.approx(0.4)
    assert Score.from_votes([(False, True), (False, False)]) == Score(0.0, 0.0, 0.0)


def test_one_formatter_for_console_csv_and_card():
    f = Feature(7, False, 0.153, 2.5, 0.1, [(" rethink", 4)], "reconsidering", 0.91, "reconsidering a decision",
                shown=["I «rethought» it"] * 6, source=Source.LLM, score=Score(0.5, 1.0, 2 / 3))
    assert f.console().startswith("Neuron 7 (15.3% active): reconsidering a decision")
    row = f.csv_row()
    assert list(row) == CSV_COLUMNS and row["kind"] == "content" and row["source"] == "llm"
    assert row["f1"] == pytest.approx(2 / 3) and row["top_example_5"] == "I «rethought» it"
    card = f.card()
    assert "F1 0.67 (precision 0.50, recall 1.00)" in card["stats"] and "best label reconsidering (AUROC 0.91)" in card["stats"]
    assert "F1" not in Feature(1, True, 1.0, 1.0, 0.9, [], None, None, "x").card()["stats"]


def test_the_annotator_never_sees_the_peak_marks():
    assert "«" not in annotate_prompt("d", "a «b» c")[1]["content"]
