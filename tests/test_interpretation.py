"""The interpreted feature: its score from annotator votes (hand-counted) and its one formatter."""
import pytest

from sae.interpretation import CSV_COLUMNS, Feature, Score, Source, annotate_prompt, score_descriptions


def test_score_counts_votes_by_hand():
    # 3 true positives, 1 missed activating example, 1 false alarm, 5 correct rejections
    votes = [(True, True)] * 3 + [(False, True)] + [(True, False)] + [(False, False)] * 5
    score = Score.from_votes(votes)
    assert (score.precision, score.recall, score.f1) == (0.75, 0.75, 0.75)
    lopsided = Score.from_votes([(True, True), (True, False), (True, False), (True, False)])
    assert lopsided.precision == 0.25 and lopsided.recall == 1.0 and lopsided.f1 == pytest.approx(0.4)
    assert Score.from_votes([(False, True), (False, False)]) == Score(0.0, 0.0, 0.0)


def test_one_formatter_for_console_csv_and_card():
    f = Feature(7, False, 0.153, 2.5, 0.1, [(" rethink", 4, 41.3), (" again", 3, 2.54)], "reconsidering", 0.91,
                "reconsidering a decision",
                shown=["I «rethought» it"] * 6, source=Source.LLM, score=Score(0.5, 1.0, 2 / 3))
    assert f.console().startswith("Neuron 7 (15.3% active): reconsidering a decision")
    row = f.csv_row()
    assert list(row) == CSV_COLUMNS and row["kind"] == "content" and row["source"] == "llm"
    assert row["f1"] == pytest.approx(2 / 3) and row["top_example_5"] == "I «rethought» it"
    card = f.card()
    assert "F1 0.67 (precision 0.50, recall 1.00)" in card["stats"] and "best label reconsidering (AUROC 0.91)" in card["stats"]
    assert "peak tokens (peaks, times as frequent as in the text): ' rethink' 4 ×41, ' again' 3 ×2.5" in card["stats"]
    assert row["top_tokens"] == " rethink (4, ×41);  again (3, ×2.5)"
    assert "F1" not in Feature(1, True, 1.0, 1.0, 0.9, [], None, None, "x").card()["stats"]


def test_the_annotator_never_sees_the_peak_marks():
    assert "«" not in annotate_prompt("d", "a «b» c")[1]["content"]


def test_scores_come_from_each_features_own_held_out_examples():
    """An annotator that says yes to exactly some texts: each feature's precision and recall, counted by hand."""
    a = Feature(1, False, 0.5, 1.0, 0.0, [], None, None, "data", held_out=["a1", "a2", "a3"], held_silent=["s1", "s2"])
    b = Feature(2, False, 0.5, 1.0, 0.0, [], None, None, "data", held_out=["b1", "b2"], held_silent=["t1", "t2"])
    c = Feature(3, False, 0.5, 1.0, 0.0, [], None, None, "data", held_out=["c1"], held_silent=["u1"])
    yes = {"a1", "a2", "s1", "b1", "b2", "t1", "t2"}
    asked = []

    def annotate(messages):
        text = messages[1]["content"].split("Text: ")[1].split("\n")[0]
        asked.append((messages[1]["content"].split("\n")[0], text))
        return None if text == "u1" else ("Yes." if text in yes else "no")

    features = {1: a, 2: b, 3: c}
    score_descriptions(features, {1: "desc A", 2: "desc B", 3: "desc C"}, annotate)
    assert (a.score.precision, a.score.recall) == (2 / 3, 2 / 3)  # a1, a2 hit, a3 missed, s1 false alarm
    assert (b.score.precision, b.score.recall) == (0.5, 1.0)  # both hits, both silent ones said yes
    assert (c.score.precision, c.score.recall, c.score.f1) == (0.0, 0.0, 0.0)  # u1 unanswered: only c1, a miss
    assert ("Description: desc A", "s1") in asked and ("Description: desc B", "b1") in asked, "each its own"
    d = Feature(4, False, 0.5, 1.0, 0.0, [], None, None, "data", held_out=["x"])
    score_descriptions({4: d}, {4: None}, annotate)
    assert d.score is None, "no description, no score"
