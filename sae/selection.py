"""Which tokens of an activations file are trained on, measured and interpreted.

Every token has a role from extraction (special/template, system, user, assistant), and each example's
first token is the attention sink. Under causal attention a token's activation depends only on the ids up
to and including it, so a token whose ids so far equal another example's has the very same activation
there: the chat template's BOS and system prompt, an instruction every example starts with, a common
opening word. Such a position is *shared*; its copies after the first are *duplicates*. Shared positions are
found exactly from the token ids (no hashing), within a group of examples (a training or validation
split, or the whole file):

    duplicate_N[i] = the longest prefix of example i that an earlier example of its group starts with
                    (the earliest example holding a prefix has the one copy that measures count)
    repeated_N[i]  = the longest prefix of example i that at least `copies` earlier examples start with
                    (the first `copies` examples holding a prefix keep it for training; copies=1 → duplicate_N)
    shared_N[i]    = the longest prefix of example i that at least `common` examples of its group start
                    with (with common = max(2, ⌈1% of the group⌉): a template or an instruction, not the
                    odd duplicated example)

Training keeps a shared position in a few examples (SHARED_COPIES, 16 by default) rather than one: seen
once per epoch, the template was reconstructed so poorly that the next-token loss with the SAE spliced in
rose (every later token attends to it); seen 16 times it is reconstructed well and still weighs ~1% of the
tokens instead of a quarter.

*Content* tokens are those of user and assistant turns outside shared prefixes: what differs between
examples, and what interpretation reads by default.
"""
import math

from dataclasses import dataclass, replace

import numpy as np

from .activations import ROLE_ASSISTANT, ROLE_SPECIAL, ROLE_USER, Activations

TOKEN_SELECTIONS = {
    "distinct": "every token but each example's first (the attention sink); a position that several examples "
                "share (an identical prefix: chat template, common instruction) is kept in SHARED_COPIES of them",
    "no_first": "every token but each example's first (the attention sink)",
    "all": "every token",
    "no_special": "every token but special and chat-template tokens",
    "assistant": "assistant-turn tokens only",
    "content": "user and assistant turns outside prefixes shared by several examples",
}


def common_count(n_examples: int) -> int:
    """How many examples must start with a prefix for it to count as shared (not content)."""
    return max(2, math.ceil(0.01 * n_examples))


def shared_prefixes(token_ids: np.ndarray, offsets: np.ndarray, example_ids: np.ndarray,
                    common: int = 2, copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(shared_N, repeated_N) for the given examples (in the order given); see the module docstring. With
    copies > 1, repeated_N[i] is the longest prefix that at least `copies` earlier examples start with: the
    first `copies` examples holding a prefix keep it.

    Position by position, examples are grouped by their ids so far (a group id per example, refined with
    the next token by np.unique); an example leaves once its group has only itself, so the loop runs as
    long as the longest shared prefix, and its work is the number of shared tokens."""
    example_ids = np.asarray(example_ids, dtype=np.int64)
    n = len(example_ids)
    starts = np.asarray(offsets)[example_ids]
    lengths = np.asarray(offsets)[example_ids + 1] - starts
    shared, repeated = lengths.copy(), lengths.copy()  # settled below for examples that leave early
    alive = np.arange(n)  # positions (into example_ids) of examples whose prefix so far is shared
    group = np.zeros(n, dtype=np.int64)  # id of the class of equal prefixes, for the alive examples
    kept = np.zeros(n, dtype=bool)  # whether the example is among its class's first `copies` (settles repeated_N)
    settled = np.zeros(n, dtype=bool)  # whether shared_N is settled
    for p in range(int(lengths.max(initial=0))):
        alive = alive[lengths[alive] > p]
        if len(alive) == 0:
            break
        key = group[alive] * (1 << 32) + np.asarray(token_ids[starts[alive] + p], dtype=np.int64)
        _, group_of, size = np.unique(key, return_inverse=True, return_counts=True)
        alone = size[group_of] == 1
        rare = (size[group_of] < common) & ~settled[alive]
        shared[alive[rare]] = p  # at least `common` examples share its first p tokens, not p + 1
        settled[alive[rare]] = True
        order = np.lexsort((example_ids[alive], group_of))  # by class, then by example
        run_starts = np.flatnonzero(np.r_[True, np.diff(group_of[order]) != 0])
        rank = np.empty(len(order), dtype=np.int64)  # place of each example among its class's, earliest 0
        rank[order] = np.arange(len(order)) - np.repeat(run_starts, np.diff(np.r_[run_starts, len(order)]))
        newly = (rank < copies) & ~kept[alive]
        repeated[alive[newly]] = p
        kept[alive[newly]] = True
        group[alive] = group_of
        alive = alive[~alone]
    return shared, repeated


class TokenSelection:
    """A named token selection with the shared-prefix lengths it needs, for every example of a file.

    `groups` are the example sets within which positions count as shared (e.g. the training and the
    validation split, so each split keeps one copy of the template); they must not overlap. `copies`: how
    many copies of each shared position "distinct" keeps (1: each distinct position once)."""

    def __init__(self, acts: Activations, name: str, groups: list[np.ndarray] | None = None, copies: int = 1):
        if name not in TOKEN_SELECTIONS:
            raise ValueError(f"token selection {name!r} is not one of {', '.join(TOKEN_SELECTIONS)}")
        self.name = name
        self.shared_N = np.zeros(acts.n_examples, dtype=np.int64)
        self.repeated_N = np.zeros(acts.n_examples, dtype=np.int64)  # beyond the kept copies
        self.duplicate_N = np.zeros(acts.n_examples, dtype=np.int64)  # beyond the first copy
        for g in ([np.arange(acts.n_examples)] if groups is None else groups):
            g = np.sort(np.asarray(g, dtype=np.int64))
            self.shared_N[g], self.duplicate_N[g] = shared_prefixes(acts.token_ids, acts.offsets, g,
                                                                    common_count(len(g)))
            self.repeated_N[g] = self.duplicate_N[g] if copies == 1 else \
                shared_prefixes(acts.token_ids, acts.offsets, g, copies=copies)[1]

    @property
    def description(self) -> str:
        return TOKEN_SELECTIONS[self.name]

    def rows(self, acts: Activations, example_ids: np.ndarray) -> "Rows":
        """What each row of the given examples is, rows concatenated in the order given."""
        example_ids = np.asarray(example_ids, dtype=np.int64)
        starts, ends = acts.offsets[example_ids], acts.offsets[example_ids + 1]
        lengths = ends - starts
        row_starts = np.cumsum(lengths) - lengths
        pos = np.arange(int(lengths.sum())) - np.repeat(row_starts, lengths)
        roles = np.concatenate([acts.token_role[a:b] for a, b in zip(starts, ends)]) if len(example_ids) else \
            np.zeros(0, dtype=np.int8)
        return Rows(roles=roles, first=pos == 0, shared=pos < np.repeat(self.shared_N[example_ids], lengths),
                    repeated=pos < np.repeat(self.repeated_N[example_ids], lengths),
                    duplicate=pos < np.repeat(self.duplicate_N[example_ids], lengths))

    def mask(self, rows: "Rows") -> np.ndarray:
        """Boolean mask of the selected rows."""
        return selected_rows(self.name, rows)

    def example_mask(self, acts: Activations, i: int) -> np.ndarray:
        """The selection within example i on its own (nothing of it repeats another example's): the
        positions where the SAE stands in for the model when the example runs alone."""
        return selected_alone(self.name, self.rows(acts, np.array([i])))


@dataclass(frozen=True)
class Rows:
    """Per row of some examples: role code, first token of its example, in a shared prefix, a copy beyond
    those the selection keeps (repeated), a copy of an earlier example's position at all (duplicate)."""
    roles: np.ndarray
    first: np.ndarray
    shared: np.ndarray
    repeated: np.ndarray
    duplicate: np.ndarray

    @property
    def content(self) -> np.ndarray:
        return ((self.roles == ROLE_USER) | (self.roles == ROLE_ASSISTANT)) & ~self.shared

    @property
    def template(self) -> np.ndarray:
        """Distinct non-content positions (shared prefixes once, template and system tokens), no sinks."""
        return ~self.content & ~self.first & ~self.duplicate


def selected_alone(name: str, rows: Rows) -> np.ndarray:
    """The selection within each example on its own: no position counts as a copy of another example's."""
    return selected_rows(name, replace(rows, repeated=np.zeros_like(rows.repeated)))


def selected_rows(name: str, rows: Rows) -> np.ndarray:
    if name == "distinct":
        return ~rows.first & ~rows.repeated
    if name == "no_first":
        return ~rows.first
    if name == "all":
        return np.ones(len(rows.roles), dtype=bool)
    if name == "no_special":
        return (rows.roles != ROLE_SPECIAL) & ~rows.first
    if name == "assistant":
        return rows.roles == ROLE_ASSISTANT
    if name == "content":
        return rows.content
    raise ValueError(name)
