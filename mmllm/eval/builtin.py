"""A small built-in multiple-choice task made of real facts (world capitals), usable offline.

It needs no download, so the pipeline, the callback and the agreement checks always have a real
task to run: ``"What is the capital of France?"`` with four capitals as choices, in ARC's
published format (question, choices{text, label}, answerKey) so that both our ``formats.arc``
converter and an lm-eval ``arc``-style YAML read it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mmllm.eval import formats
from mmllm.eval.data import TaskData
from mmllm.eval.tasks import MultipleChoiceTask, PerplexityTask

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo",
    "Denmark": "Copenhagen", "Finland": "Helsinki", "Russia": "Moscow", "Ukraine": "Kyiv",
    "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "South Africa": "Pretoria", "Japan": "Tokyo",
    "China": "Beijing", "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Australia": "Canberra",
    "New Zealand": "Wellington", "Canada": "Ottawa", "United States": "Washington, D.C.",
    "Mexico": "Mexico City", "Cuba": "Havana", "Brazil": "Brasília", "Argentina": "Buenos Aires",
    "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogotá", "Venezuela": "Caracas",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Israel": "Jerusalem",
    "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Mongolia": "Ulaanbaatar", "Iceland": "Reykjavik",
}


def capitals_records(*, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """One ARC-format record per country: the capital among ``n_choices`` shuffled capitals."""
    rng = random.Random(seed)
    capitals = sorted(set(CAPITALS.values()))
    records = []
    for i, (country, capital) in enumerate(CAPITALS.items()):
        options = rng.sample([c for c in capitals if c != capital], n_choices - 1) + [capital]
        rng.shuffle(options)
        labels = list("ABCDEFGH"[:n_choices])
        records.append({"id": f"capitals-{i}", "question": f"What is the capital of {country}?",
                        "choices": {"text": options, "label": labels},
                        "answerKey": labels[options.index(capital)]})
    return records


def write_capitals(out_dir: str | Path, *, n_train: int = 10) -> Path:
    """Writes ``train.jsonl`` (first ``n_train``) and ``test.jsonl`` (the rest) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = capitals_records()
    for name, part in (("train", recs[:n_train]), ("test", recs[n_train:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return out


def capitals_task(*, num_fewshot: int = 0, n_train: int = 10, limit: int | None = None) -> MultipleChoiceTask:
    """The capitals task with lm-eval's ARC prompt ("Question: ...\\nAnswer: <choice>")."""
    recs = capitals_records()
    data = TaskData(convert=formats.arc, eval_split="test", train_split="train",
                    records={"train": recs[:n_train], "test": recs[n_train:]})
    return MultipleChoiceTask(name="capitals", data=data, template="Question: [question]\nAnswer: [Z]",
                              num_fewshot=num_fewshot, limit=limit)


def capitals_text_task() -> PerplexityTask:
    """Perplexity of the capitals as plain sentences (held-out text any model can be scored on)."""
    docs = [{"text": f"The capital of {k} is {v}."} for k, v in CAPITALS.items()]
    data = TaskData(convert=formats.text, eval_split="test", records={"test": docs})
    return PerplexityTask(name="capitals_text", data=data)
