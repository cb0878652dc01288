"""Chat-format data for task ``causal_lm`` (``data.chat_template: true``).

A row is one JSON object ``{"messages": [{"role": ..., "content": ...}, ...]}`` (roles ``system``, ``user``,
``assistant``; at least one ``assistant`` turn). The model sees the conversation rendered by the tokenizer's
own chat template (``tokenizer.apply_chat_template``), and the loss covers the assistant turns only: every
other token (system and user turns, the template's role headers, padding) gets label -100.

Assistant spans are found from the template itself, not from assumptions about its markup. For assistant turn
``i`` the conversation is rendered up to turn ``i`` with the generation prompt (where the assistant's text
starts) and up to and including turn ``i`` (where it ends, after the template's closing tokens such as
``<|im_end|>``; trailing whitespace the template puts after them is not supervised). Each rendering must be a
prefix of the whole conversation's rendering, so the span is a character range of the text the model sees.
The text is then tokenized piece by piece (the spans and the text between them), so no token straddles a
span boundary and the labels are exactly the assistant pieces' tokens. A template whose renderings are not
prefixes of each other (one that rewrites earlier turns depending on later ones) is an error naming the row.

Rows are checked when the data loads, before the model: a row without ``messages``, a message that is not a
``{role, content}`` object, an unknown role or a conversation without an assistant turn is reported with its
``file:line`` and the field, and fails the run or is skipped as ``data.bad_rows`` says.
"""

from __future__ import annotations

from typing import Any

from .data import Table, bad_row, read_table

ROLES = ("system", "user", "assistant")
MESSAGES = "messages"


def chat_options_problem(recipe: Any) -> str | None:
    """What is wrong with ``data.chat_template`` in ``recipe``, led by the dotted YAML path; None when nothing
    is (recipe.py raises it as a RecipeError). Whether the tokenizer has a template is checked when it loads."""
    if recipe.data.chat_template and recipe.task != "causal_lm":
        return f"data.chat_template: only task causal_lm reads it (task {recipe.task})"
    return None


def no_template_message(model: str) -> str:
    return (f"data.chat_template: the tokenizer of {model} has no chat template (tokenizer.chat_template is "
            "empty); use a model whose tokenizer has one, or set data.chat_template=false and give "
            "prompt / response columns")


def message_problem(row: dict[str, Any]) -> str | None:
    """Why a row is not a usable conversation (naming the field), or None."""
    messages = row.get(MESSAGES)
    if messages is None:
        return f"missing field {MESSAGES!r} (expected a list of {{role, content}} messages)"
    if not isinstance(messages, list) or not messages:
        return f"{MESSAGES}: expected a non-empty list of {{role, content}} messages, got {messages!r:.60}"
    for i, m in enumerate(messages):
        where = f"{MESSAGES}[{i}]"
        if not isinstance(m, dict):
            return f"{where}: expected an object with role and content, got {m!r:.60}"
        if "role" not in m:
            return f"{where}.role: missing"
        if m["role"] not in ROLES:
            return f"{where}.role: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m.get("content"), str):
            return f"{where}.content: expected a string, got {m.get('content')!r:.60}"
    if not any(m["role"] == "assistant" for m in messages):
        return f"{MESSAGES}: no assistant turn (the loss is on assistant turns; the row would train nothing)"
    return None


def read_conversations(source: str, limit: int | None, bad_rows: str) -> tuple[Table, list[list[dict[str, str]]]]:
    """The usable conversations of ``source`` (bad rows fail or are skipped, with ``file:line``)."""
    table = read_table(source, limit)
    keep, lines, skipped = [], [], list(table.skipped)
    for row, line in zip(table.rows, table.lines):
        problem = table.problems.get(line) or message_problem(row)
        if problem:
            bad_row(table, line, problem, bad_rows, skipped)
            continue
        keep.append([{"role": m["role"], "content": m["content"]} for m in row[MESSAGES]])
        lines.append(line)
    return Table(table.source, keep, lines, skipped), keep


def assistant_spans(tok: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character ranges of its assistant turns (see the module docstring)."""
    render = tok.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        if i == 0:  # no prefix to render: the generation prompt of an empty conversation is undefined
            start_text = render(messages[:1], tokenize=False)
            start_text = start_text[: start_text.find(m["content"])] if m["content"] else start_text
        end_text = render(messages[: i + 1], tokenize=False).rstrip()
        if not (text.startswith(start_text) and text.startswith(end_text) and len(start_text) <= len(end_text)):
            raise ValueError(f"the chat template renders turn {i} differently inside the whole conversation; "
                             "its assistant span cannot be located")
        spans.append((len(start_text), len(end_text)))
    return text, spans


def tokenize_conversation(tok: Any, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels (the ids on assistant spans, -100 elsewhere),
    truncated to ``max_length``."""
    text, spans = assistant_spans(tok, messages)
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, supervised in ((text[pos:start], False), (text[start:end], True)):
            if not piece:
                continue
            p = tok(piece, add_special_tokens=False)["input_ids"]
            ids += p
            labels += p if supervised else [-100] * len(p)
        pos = end
    return ids[:max_length], labels[:max_length]
