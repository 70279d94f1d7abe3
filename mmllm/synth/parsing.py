"""Parsing teacher answers. Nothing here raises on malformed text: it returns what it could parse
(an empty list, None), and the caller counts the answer as malformed and drops it."""

from __future__ import annotations

import re

# "Task 9: ...", "**Task 9.** ...", "9. ...", "9) ..." at the start of a line.
_TASK = re.compile(r"(?:^|\n)[ \t]*(?:[*#\-]+[ \t]*)?(?:task[ \t]*)?\d{1,3}[ \t]*(?:\*\*)?[ \t]*[:.)][ \t]*(?:\*\*)?",
                   re.IGNORECASE)
_EXAMPLE = re.compile(r"(?:^|\n)[ \t]*(?:[*#]+[ \t]*)?example[ \t]*\d{0,3}[ \t]*(?:\*\*)?[ \t]*[:.]?[ \t]*(?:\*\*)?[ \t]*(?=\n|$)",
                      re.IGNORECASE)
_INPUT = re.compile(r"(?:^|\n)[ \t]*(?:\*\*)?input(?:\*\*)?[ \t]*:(?:\*\*)?", re.IGNORECASE)
_OUTPUT = re.compile(r"(?:^|\n)[ \t]*(?:\*\*)?output(?:\*\*)?[ \t]*:(?:\*\*)?", re.IGNORECASE)
_LABEL = re.compile(r"(?:^|\n)[ \t]*(?:\*\*)?class[ \t]+label(?:\*\*)?[ \t]*:(?:\*\*)?", re.IGNORECASE)
_NEXT_FIELD = re.compile(f"{_INPUT.pattern}|{_OUTPUT.pattern}", re.IGNORECASE)
_NEXT_TASK = re.compile(r"\n[ \t]*(?:\*\*)?task[ \t]*\d{0,3}[ \t]*:", re.IGNORECASE)
_NONE_INPUTS = {"", "<none>", "none", "(none)", "n/a", "na", "<noinput>", "no input", "null", "-"}
_SPACES = re.compile(r"[ \t]+")


def clean(text: str) -> str:
    """Whitespace normalised: runs of spaces collapsed, blank edges and surrounding quotes removed."""
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.strip().splitlines()).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def parse_instructions(text: str) -> list[str]:
    """New instructions in an answer to the "Task 1: ... Task k+1:" prompt.

    The text before the first ``Task N:`` marker counts as one instruction (the prompt ended
    with ``Task k+1:``, so a continuing model starts with the instruction itself). Each
    instruction is its segment up to the first blank line (what follows is commentary).
    """
    out = []
    for k, part in enumerate(_TASK.split(text)):
        part = clean(part.strip().split("\n\n")[0])
        if part and not (k == 0 and part.endswith(":")):  # "Here are more tasks:" is no task
            out.append(part)
    return out


def parse_yes_no(text: str | None) -> bool | None:
    """True for an answer starting (after a label) with yes, False for no, None otherwise."""
    if text is None:
        return None
    m = re.search(r"\b(yes|no)\b", text[:80], re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


def _field(text: str) -> str:
    """A cleaned field; "<none>", "N/A" and the like are empty."""
    text = clean(text)
    return "" if text.lower() in _NONE_INPUTS else text


def parse_instances(text: str) -> list[dict]:
    """``[{"input", "output"}]`` from "Example N / Input: ... / Output: ..." blocks (input-first).

    A block without ``Output:`` is skipped; one without ``Input:`` has input "" (a task that
    needs none); the output ends at the next ``Input:``/``Output:``/``Task:`` line. Without any
    ``Example`` marker the whole answer is one block.
    """
    blocks = [b for b in _EXAMPLE.split(text) if b.strip()]
    out = []
    for block in blocks:
        o = list(_OUTPUT.finditer(block))
        if not o:
            continue
        head, output = block[:o[0].start()], block[o[0].end():]
        i = list(_INPUT.finditer(head))
        inp = head[i[0].end():] if i else ""
        output = _NEXT_TASK.split(output)[0]  # a model that goes on to invent the next task
        output = _NEXT_FIELD.split(output)[0]  # a looping model writes "Output:" again
        out.append({"input": _field(inp), "output": _field(output)})  # "<none>" is no output
    return out


def parse_labeled_instances(text: str) -> list[dict]:
    """``[{"input", "output"}]`` from "Class label: ... / Input: ..." blocks (output-first): the
    label is the output. A block without ``Input:`` is skipped."""
    out = []
    for block in _LABEL.split(text)[1:]:
        i = list(_INPUT.finditer(block))
        if not i:
            continue
        label = clean(block[:i[0].start()])
        inp = _field(block[i[0].end():])
        out.append({"input": inp, "output": label})
    return out


def parse_equal(text: str | None) -> bool | None:
    """The equality judgement: True for "Equal", False for "Not Equal", None when it says neither."""
    if text is None:
        return None
    head = text.strip().lower()[:80]
    m = re.search(r"\b(not[ _-]?equal|unequal|different|equal|same)\b", head)
    if m is None:
        return None
    return m.group(1) in ("equal", "same")
