"""Examples as the model sees them in fine-tuning: the chat template applied, and each token tagged with
the role of the turn it belongs to (system, user, assistant, or template/special)."""
import warnings

import numpy as np

from .activations import ROLE_ASSISTANT, ROLE_SPECIAL, ROLE_SYSTEM, ROLE_USER


_ROLE_CODE = {"system": ROLE_SYSTEM, "user": ROLE_USER, "assistant": ROLE_ASSISTANT}


def format_chat(tokenizer, messages: list[dict], chat_template: bool) -> tuple[str, list[tuple[int, int, int]], bool]:
    """Text as the model sees it in fine-tuning, the character span and role code of each turn's
    content, and whether the tokenizer should add its own special tokens (raw text only)."""
    if chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        add_special = False  # the template writes BOS and turn markers itself, as in fine-tuning
    else:
        text = "\n\n".join(m["content"] for m in messages)
        add_special = True
    spans, pos = [], 0
    for m in messages:
        content = m["content"]
        start = text.find(content, pos)
        if start < 0:  # templates may trim the content
            content = content.strip()
            start = text.find(content, pos)
        if start >= 0:
            spans.append((start, start + len(content), _ROLE_CODE[m["role"]]))
            pos = start + len(content)
    return text, spans, add_special


def tokenize_example(tokenizer, messages: list[dict], chat_template: bool, max_length: int):
    """(token_ids int32, token_role int8, number of tokens cut by max_length) of one example.

    A token takes the role of the turn whose content it overlaps; template text, special tokens and
    the first token (the attention sink) are ROLE_SPECIAL."""
    text, spans, add_special = format_chat(tokenizer, messages, chat_template)
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    roles = np.full(len(ids), ROLE_SPECIAL, dtype=np.int8)
    special = set(tokenizer.all_special_ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if ids[t] in special or a == b:
            continue
        for start, end, role in spans:
            if a < end and b > start:
                roles[t] = role
                break
    roles[0] = ROLE_SPECIAL
    cut = max(0, len(ids) - max_length)
    return ids[:max_length], roles[:max_length], cut


def warn_no_template(tokenizer) -> bool:
    """True when the tokenizer has a chat template; otherwise warn once that raw text is used."""
    if getattr(tokenizer, "chat_template", None):
        return True
    warnings.warn("the tokenizer has no chat template; using the raw text of each example "
                  "(set CHAT_TEMPLATE=False to silence this)", stacklevel=2)
    return False
