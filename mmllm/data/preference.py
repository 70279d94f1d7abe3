"""PreferenceDataModule: ranked responses in, batches of one prompt's K responses out.

Sources are files of preference rows (chosen/rejected pairs, HH-RLHF transcripts, ranked lists,
StackExchange / Reddit preference-model pretraining data; see
:mod:`mmllm.data.preference_formats`). Each row becomes a prompt and K >= 2 ranked responses;
every response is rendered after the prompt with the chat template
(:class:`mmllm.data.chat.ChatRenderer`: the same tokens the policy was fine-tuned on), followed by
an end-of-context token whose final hidden state the reward head reads (Anthropic's EOC token;
default the tokenizer's eos). A malformed row raises an error naming ``file:line``, or is counted
and skipped (``on_bad_row="skip"``). Held-out rows are chosen by a hash of the prompt, so no
prompt is in both splits.

A batch holds ``batch_size`` prompts with all their responses, flat and right-padded:
``input_ids`` (N, T), ``attention_mask`` (N, T), ``lengths`` (N,), ``group`` (N,) (prompt of each
response within the batch), ``rank`` (N,) (0 = best, equal = tie) and, with ``labels=True``
(DPO), next-token ``labels`` (N, T) on the final response's tokens (-100 elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from mmllm.data.chat import ChatFormatError, ChatRenderer
from mmllm.data.conversations import BadRowError
from mmllm.data.preference_formats import (
    FORMATS,
    Ranked,
    parse_row,
    read_preference_rows,
    synthetic_preferences,
)
from mmllm.losses.lm import IGNORE_INDEX

BAD_ROW_POLICIES = ("error", "skip")
OVERLONG = ("truncate", "drop")


class PreferenceEncoder:
    """Token ids (and DPO labels) of a prompt's responses.

    Args:
        tokenizer: a transformers tokenizer.
        chat: render with the chat template (True) or as Anthropic's plain
            ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` text (False).
        chat_template: a template overriding the tokenizer's.
        end_token: appended after each response ("eos": the tokenizer's eos; a token string; or
            None: nothing, for DPO). It must be one token of the vocabulary.
        seq_len: longest sequence; longer ones keep their last ``seq_len`` tokens ("truncate":
            the prompt's start goes first) or drop the whole row ("drop").
    """

    def __init__(self, tokenizer, *, chat: bool = True, chat_template: str | None = None,
                 end_token: str | None = "eos", seq_len: int = 512, overlong: str = "truncate") -> None:
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        self.tokenizer, self.chat, self.seq_len, self.overlong = tokenizer, chat, seq_len, overlong
        self.renderer = ChatRenderer(tokenizer, chat_template=chat_template,
                                     train_on_all_assistant=False) if chat else None
        self.end_id = self._end_id(end_token)
        self.stats: Counter = Counter()

    def _end_id(self, end_token: str | None) -> int | None:
        if end_token is None:
            return None
        token = self.tokenizer.eos_token if end_token == "eos" else end_token
        tid = self.tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"end_token {end_token!r} ({token!r}) is not a token of the tokenizer: "
                             "add it as a special token (and grow the model's vocabulary) or use eos")
        return int(tid)

    def _plain(self, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
        tags = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
        text = "".join(f"\n\nHuman: {m['content']}" if m["role"] == "user" else
                       f"\n\n{tags.get(m['role'], m['role'])}: {m['content']}" for m in prompt)
        head = self.tokenizer(text + "\n\nAssistant:", add_special_tokens=False)["input_ids"]
        body = self.tokenizer(" " + response, add_special_tokens=False)["input_ids"]
        ids = head + body
        labels = [IGNORE_INDEX] * (len(head) - 1) + body + [IGNORE_INDEX]
        return ids, labels

    def encode(self, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one response after its prompt (end token included)."""
        if self.chat:
            rendered = self.renderer([*prompt, {"role": "assistant", "content": response}])
            ids, labels = list(rendered.input_ids), rendered.labels(IGNORE_INDEX)
        else:
            ids, labels = self._plain(prompt, response)
        if self.end_id is not None:
            ids, labels = ids + [self.end_id], labels + [IGNORE_INDEX]
        return ids, labels

    def __call__(self, ex: Ranked) -> list[tuple[list[int], list[int]]] | None:
        """The K encoded responses of ``ex``, or None when it is dropped (overlong)."""
        out = [self.encode(ex.prompt, r) for r in ex.responses]
        if any(len(ids) > self.seq_len for ids, _ in out):
            self.stats[f"overlong_{self.overlong}"] += 1
            if self.overlong == "drop":
                return None
            out = [(ids[-self.seq_len:], lab[-self.seq_len:]) for ids, lab in out]
            if len({tuple(ids) for ids, _ in out}) < len(out):
                self.stats["identical_after_truncation"] += 1
        return out


class _Items(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class PreferenceCollate:
    """Flattens prompts' responses into one right-padded batch (see the module docstring)."""

    def __init__(self, *, pad_id: int, labels: bool = False) -> None:
        self.pad_id, self.labels = pad_id, labels

    def __call__(self, items: Sequence[tuple[list, list[int]]]) -> dict[str, torch.Tensor]:
        seqs = [(ids, lab, g, r) for g, (encoded, ranks) in enumerate(items)
                for (ids, lab), r in zip(encoded, ranks)]
        T = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for n, (x, lab, _, _) in enumerate(seqs):
            ids[n, :len(x)] = torch.tensor(x)
            mask[n, :len(x)] = 1
            labels[n, :len(lab)] = torch.tensor(lab)
        batch = {"input_ids": ids, "attention_mask": mask, "lengths": mask.sum(-1),
                 "group": torch.tensor([s[2] for s in seqs]), "rank": torch.tensor([s[3] for s in seqs])}
        if self.labels:
            batch["labels"] = labels
        return batch


class PreferenceDataModule(L.LightningDataModule):
    """Preference data for reward models (K-wise ranking loss) and DPO.

    Args:
        sources: ``[{name, path, format (auto|pairs|hh|ranked|stackexchange|reddit),
            score_rule (stackexchange: anthropic|raw), max_responses (cap on K for PMP lists),
            synthetic ({num_prompts, k, seed}: write the learnable demo set of
            :func:`~mmllm.data.preference_formats.synthetic_preferences` to ``path`` first when
            it is missing)}]``; ``path`` a file, glob or list (JSONL, JSONL.gz, Parquet, .json lists).
        tokenizer: a model source whose tokenizer to use (the SFT checkpoint, ``smollm2``, an HF
            dir); None trains a ChatML byte-level BPE of ``vocab_size`` on the data.
        vocab_size: size of a trained tokenizer.
        cache_dir: where the tokenizer is kept (``<cache_dir>/tokenizer``, copied to runs).
        chat, chat_template, end_token, seq_len, overlong: see :class:`PreferenceEncoder`.
        batch_size: prompts per batch (each with all its responses).
        labels: also emit next-token labels on the responses (DPO).
        val_fraction: share of prompts held out (by a hash of the prompt).
        on_bad_row: "error" (stop at the first malformed row, naming ``file:line``) or "skip"
            (count it by source and reason: :attr:`skipped`).
        num_workers: DataLoader workers.
        seed: shuffling seed (the split does not depend on it).
    """

    def __init__(self, *, sources: Sequence[Mapping], tokenizer: str | None = None,
                 vocab_size: int = 2048, cache_dir: str = "data/preference",
                 chat: bool = True, chat_template: str | None = None, end_token: str | None = "eos",
                 seq_len: int = 512, overlong: str = "truncate", batch_size: int = 8,
                 labels: bool = False, val_fraction: float = 0.1, on_bad_row: str = "error",
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        if not sources:
            raise ValueError("PreferenceDataModule needs at least one source")
        self.sources = [dict(s) for s in sources]
        for s in self.sources:
            if "name" not in s or "path" not in s:
                raise ValueError(f"a preference source needs 'name' and 'path', got {s}")
            if s.setdefault("format", "auto") not in FORMATS:
                raise ValueError(f"source {s['name']}: unknown format {s['format']!r} ({FORMATS})")
        self.tokenizer_spec, self.vocab_size = tokenizer, vocab_size
        self.cache_dir = Path(cache_dir)
        self.tokenizer_dir = str(self.cache_dir / "tokenizer")
        self.chat, self.chat_template, self.end_token = chat, chat_template, end_token
        self.seq_len, self.overlong, self.batch_size, self.labels = seq_len, overlong, batch_size, labels
        self.val_fraction, self.on_bad_row = val_fraction, on_bad_row
        self.num_workers, self.seed = num_workers, seed
        self.skipped: dict[str, Counter] = {}
        self.examples: dict[str, list[Ranked]] = {}
        self._tokenizer = None
        self._train: list | None = None
        self._val: list = []
        self.encoder: PreferenceEncoder | None = None

    # --------------------------------------------------------------------------- reading
    def write_synthetic(self) -> None:
        """Writes the file of every ``synthetic`` source that does not exist yet (atomically)."""
        for src in self.sources:
            if src.get("synthetic") is not None and not Path(src["path"]).is_file():
                path = Path(src["path"])
                tmp = synthetic_preferences(path.with_name(f".{path.name}.{os.getpid()}.tmp"),
                                            **dict(src["synthetic"]))
                os.replace(tmp, path)

    def read_sources(self) -> dict[str, list[Ranked]]:
        """Every source's rows as :class:`Ranked` (malformed rows raise or are counted)."""
        self.write_synthetic()
        out = {}
        for src in self.sources:
            skipped, rows = Counter(), []
            self.skipped[src["name"]] = skipped  # reset: prepare_data may have read the files
            for where, row in read_preference_rows(src["path"]):
                try:
                    ex = parse_row(row, src["format"], score_rule=src.get("score_rule"),
                                   max_responses=src.get("max_responses"))
                except BadRowError as e:
                    self._bad(skipped, where, e)
                    continue
                ex.where = where
                rows.append(ex)
            out[src["name"]] = rows
        return out

    def _bad(self, skipped: Counter, where: str, error: Exception) -> None:
        if self.on_bad_row == "error":
            raise BadRowError(f"{where}: {error} (set data.on_bad_row=skip to count and skip such rows)")
        skipped[str(error).split(":")[0][:60]] += 1

    def is_val(self, ex: Ranked) -> bool:
        """Held out: a hash of the prompt below ``val_fraction`` (stable across runs and seeds)."""
        digest = hashlib.sha256(json.dumps(ex.prompt, sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.val_fraction

    # -------------------------------------------------------------------------- tokenizer
    def prepare_data(self) -> None:
        """Loads (or trains on the data) the tokenizer into ``<cache_dir>/tokenizer``."""
        stamp = self.cache_dir / "tokenizer.key"
        key = json.dumps({"tokenizer": self.tokenizer_spec, "vocab_size": self.vocab_size,
                          "sources": [s["name"] for s in self.sources]})
        from mmllm.data.tokenizer import prepare_tokenizer_dir

        prepare_tokenizer_dir(self.tokenizer_dir, stamp=stamp, key=key, spec=self.tokenizer_spec,
                              vocab_size=self.vocab_size,
                              texts=lambda: (t for rows in self.read_sources().values() for ex in rows
                                             for t in [*(m["content"] for m in ex.prompt), *ex.responses]))

    @property
    def tokenizer(self):
        """The tokenizer (after ``prepare_data``)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    # ------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Reads, splits and encodes every source (deterministic: every rank gets the same rows)."""
        if self._train is not None:
            return
        if not (Path(self.tokenizer_dir) / "tokenizer_config.json").is_file():
            self.prepare_data()
        self.encoder = PreferenceEncoder(self.tokenizer, chat=self.chat, chat_template=self.chat_template,
                                         end_token=self.end_token, seq_len=self.seq_len,
                                         overlong=self.overlong)
        self.examples = self.read_sources()
        train, val = [], []
        for name, rows in self.examples.items():
            for ex in rows:
                try:
                    encoded = self.encoder(ex)
                except ChatFormatError as e:
                    self._bad(self.skipped[name], ex.where, e)
                    continue
                if encoded is not None:
                    (val if self.is_val(ex) else train).append((encoded, ex.ranks))
        if not train:
            raise ValueError(f"no usable training rows: {self.summary()}")
        self._train, self._val = train, val
        rank_zero_info(f"preference data: {json.dumps(self.summary())}")

    def summary(self) -> dict:
        """Rows per split, responses per prompt, skipped rows and truncation counts."""
        sizes = Counter(len(e[1]) for e in (self._train or []) + self._val)
        return {"train_prompts": len(self._train or []), "val_prompts": len(self._val),
                "responses_per_prompt": dict(sorted(sizes.items())),
                "skipped": {k: dict(v) for k, v in self.skipped.items() if v},
                "encoding": dict(self.encoder.stats) if self.encoder else {}}

    def val_responses(self) -> list[tuple[list[dict], str]]:
        """``(prompt, response)`` of every held-out response (reward normalisation)."""
        return [(ex.prompt, r) for rows in self.examples.values() for ex in rows if self.is_val(ex)
                for r in ex.responses]

    # -------------------------------------------------------------------------- loaders
    def _loader(self, items: list, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        return DataLoader(_Items(items), batch_size=self.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
                          collate_fn=PreferenceCollate(pad_id=int(pad or 0), labels=self.labels),
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self.setup("fit")
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self._train is None:
            self.setup("validate")
        return self._loader(self._val, shuffle=False) if self._val else []
