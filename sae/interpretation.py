"""One interpreted feature: its statistics, the examples shown and held out, where its description came from
and how it scored; and the one formatter of those fields for the console, the CSV and the report's cards."""
from dataclasses import dataclass, field
from enum import Enum


def lift_text(lift: float) -> str:
    """A peak token's lift, as "×41" or "×2.5" (one decimal below 10)."""
    return f"×{lift:.1f}" if lift < 10 else f"×{lift:.0f}"


class Source(Enum):
    """Where a feature's description came from."""
    DATA = "data"  # built from the data: best label, peak tokens, a top example
    LLM = "llm"
    DATA_NO_ANSWER = "data (the LLM gave no answer; see the log)"


@dataclass
class Score:
    """How well annotators applying the description tell held-out activating from non-activating examples."""
    precision: float
    recall: float
    f1: float

    @classmethod
    def from_votes(cls, votes: list[tuple[bool, bool]]) -> "Score":
        """From (annotator said yes, the example activates the feature) pairs."""
        tp = sum(said and truth for said, truth in votes)
        fp = sum(said and not truth for said, truth in votes)
        fn = sum(truth and not said for said, truth in votes)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        return cls(precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0)


@dataclass
class Feature:
    """A selected feature. Examples are text snippets with the peak token marked «like this» (`shown`,
    `held_out`) or plain content (`shown_silent`, `held_silent`: examples where it does not fire)."""
    index: int
    template: bool  # fires mainly on template or shared-prefix positions
    prevalence: float  # share of examples where it fires
    mean_activation: float  # over the examples where it fires
    template_share: float | None  # share of its activation on template positions (None: it never fires)
    top_tokens: list[tuple[str, int, float]]  # its most distinctive peak tokens: text, peaks, lift over the text
    top_label: str | None  # its best label, and that label's AUROC
    top_label_auroc: float | None
    description: str
    shown: list[str] = field(default_factory=list)
    shown_silent: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    held_silent: list[str] = field(default_factory=list)
    source: Source = Source.DATA
    score: Score | None = None

    @property
    def kind(self) -> str:
        return "template" if self.template else "content"

    def stats(self) -> list[str]:
        """Its figures as short phrases, for the console and the report's card."""
        out = [f"{100 * self.prevalence:.1f}% of examples", f"mean activation {self.mean_activation:.3g}"]
        if self.template:
            out.append(f"template feature ({100 * (self.template_share or 0):.0f}% of its activation on template "
                       f"positions)")
        if self.score is not None:
            out.append(f"F1 {self.score.f1:.2f} (precision {self.score.precision:.2f}, recall {self.score.recall:.2f})")
        if self.top_label:
            out.append(f"best label {self.top_label} (AUROC {self.top_label_auroc:.2f})")
        if self.top_tokens:
            out.append("peak tokens (peaks, times as frequent as in the text): "
                       + ", ".join(f"{t!r} {c} {lift_text(lift)}" for t, c, lift in self.top_tokens))
        return out

    def console(self, n_examples: int = 3) -> str:
        kind = " [template feature]" if self.template else ""
        lines = [f"Neuron {self.index} ({100 * self.prevalence:.1f}% active){kind}: {self.description}",
                 "  " + " · ".join(self.stats()[1:])]
        return "\n".join(lines + [f"  - {s}" for s in self.shown[:n_examples]])

    def csv_row(self, n_examples: int = 5) -> dict:
        score = self.score
        row = {"neuron_idx": self.index, "kind": self.kind, "prevalence": self.prevalence,
               "mean_activation": self.mean_activation, "template_share": self.template_share,
               "interpretation": self.description, "source": self.source.value,
               "f1": score.f1 if score else None, "precision": score.precision if score else None,
               "recall": score.recall if score else None, "top_label": self.top_label,
               "top_label_auroc": self.top_label_auroc,
               "top_tokens": "; ".join(f"{t} ({c}, {lift_text(lift)})" for t, c, lift in self.top_tokens)}
        row.update({f"top_example_{j + 1}": self.shown[j] if j < len(self.shown) else "" for j in range(n_examples)})
        return row

    def card(self) -> dict:
        return {"neuron_idx": self.index, "title": f"Feature {self.index}", "interpretation": self.description,
                "source": self.source.value, "stats": " · ".join(self.stats()), "examples": self.shown}


def describe_prompt(feature: Feature, task_hint: str) -> list[dict]:
    """Chat messages asking an LLM what the feature's activating examples share that the others lack."""
    active = "\n".join(f"{j + 1}. {s}" for j, s in enumerate(feature.shown))
    inactive = "\n".join(f"{j + 1}. {s}" for j, s in enumerate(feature.shown_silent))
    return [{"role": "system", "content": "You label features of a sparse autoencoder trained on a language "
                                          "model's activations. Answer with the description only."},
            {"role": "user", "content": f"Dataset: {task_hint}.\n\nTexts where the feature is active; the token "
             f"where it is most active is marked «like this»:\n{active}\n\nTexts where the feature is not active:\n"
             f"{inactive}\n\nIn one short, concrete phrase (under 15 words), what property do the active texts "
             f"share that the inactive ones lack?"}]


def annotate_prompt(description: str, text: str) -> list[dict]:
    """Chat messages asking an annotator whether a text (peak marks removed) matches the description."""
    return [{"role": "system", "content": "You check whether a text matches a description. Answer yes or no."},
            {"role": "user", "content": f"Description: {description}\n\nText: {text.replace('«', '').replace('»', '')}"
                                        f"\n\nDoes the text match the description? Answer with one word: yes or no."}]


def score_descriptions(features: dict, descriptions: dict, annotate, map_fn=map):
    """Each described feature's Score: the annotator (annotate(messages) → answer or None) is asked whether
    each of the feature's held-out examples matches its description, activating ones (truth yes) and
    silent ones (truth no); `map_fn(fn, jobs)` runs the questions (a thread pool's map, in order)."""
    jobs = [(f, text, truth) for f, description in descriptions.items() if description
            for texts, truth in ((features[f].held_out, True), (features[f].held_silent, False)) for text in texts]
    answers = list(map_fn(lambda job: annotate(annotate_prompt(descriptions[job[0]], job[1])), jobs))
    for f in descriptions:
        votes = [(answer.strip().lower().startswith("yes"), truth)
                 for (g, _, truth), answer in zip(jobs, answers) if g == f and answer is not None]
        if votes:
            features[f].score = Score.from_votes(votes)


CSV_COLUMNS = list(Feature(0, False, 0.0, 0.0, None, [], None, None, "").csv_row())
