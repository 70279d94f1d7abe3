"""Prompts for RL fine-tuning (PPO): token ids of generation prompts, and a fixed probe set.

Rows of JSONL/Parquet files (or an inline list) are either ``{"prompt": "..."}`` (plain text, or a
user turn of the chat template with ``chat=true``) or ``{"messages": [...]}`` (OpenAI messages
without the final assistant turn), rendered with :meth:`mmllm.data.chat.ChatRenderer.prompt`,
so a prompt is tokenised exactly as the SFT data the policy was trained on. A seeded share of the
prompts is held out as the probe set: the PPO module scores the policy's greedy answers to them
every few steps (a reward-hacking monitor on prompts the policy never trains on).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from mmllm.data.conversations import BadRowError, read_rows

log = logging.getLogger(__name__)

OVERLONG = ("truncate", "drop")
BAD_ROW_POLICIES = ("error", "skip")


def load_policy_tokenizer(source: str | Path):
    """The tokenizer of a model source (``mmllm.checkpoint.load_model`` sources): an HF dir,
    "smollm2", a .gguf, a kit run directory, or a kit ``.ckpt`` file (its recorded tokenizer)."""
    from mmllm.checkpoint import checkpoint_tokenizer_dir, load_tokenizer_from, resolve_ckpt

    path = Path(str(source))
    if str(source) == "smollm2" or path.suffix == ".gguf" or (path / "config.json").is_file() \
            or (path / "tokenizer" / "tokenizer_config.json").is_file() \
            or (path / "tokenizer_config.json").is_file():
        return load_tokenizer_from(source)
    from transformers import AutoTokenizer

    file = resolve_ckpt(path)
    beside = file.parent.parent / "tokenizer"  # the kit's run layout: <run>/checkpoints/x.ckpt
    if (beside / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(beside))
    from mmllm.checkpoint import _read_checkpoint

    tok_dir = checkpoint_tokenizer_dir(file, _read_checkpoint(file).get("mmllm", {}))
    if tok_dir is None:
        raise ValueError(f"{source} records no tokenizer: pass data.tokenizer=<tokenizer dir>")
    return AutoTokenizer.from_pretrained(str(tok_dir))


class _Prompts(Dataset):
    def __init__(self, items: list[list[int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[int]:
        return self.items[i]


def _collate(items: list[list[int]]) -> dict[str, list[list[int]]]:
    # Ragged prompts stay lists: the decode session takes them as they are.
    return {"prompt_ids": [list(p) for p in items]}


class PromptDataModule(L.LightningDataModule):
    """Batches of generation prompts (token ids) for PPO, and a held-out probe set.

    Args:
        path: JSONL/Parquet file, glob or list of them (rows: ``prompt`` or ``messages``; a
            ``messages`` row's trailing assistant reply is dropped, so SFT files work too).
        prompts: inline prompt strings (instead of, or besides, ``path``).
        tokenizer: the policy's tokenizer (any source of :func:`load_policy_tokenizer`).
        chat: render ``prompt`` strings as a user turn of the chat template (``messages`` rows
            always use the template).
        chat_template: a Jinja template overriding the tokenizer's.
        add_bos: prepend the tokenizer's BOS to plain prompts (``chat=false``), if it has one.
        seq_len: longest prompt in tokens; longer ones are truncated on the left (their end holds
            the generation header) or dropped, per ``overlong`` (counted).
        vocab_size: the policy's vocabulary; a token id outside it is an error (wrong tokenizer).
        batch_size: prompts per rollout and rank.
        probe_size: prompts held out as the fixed probe set (taken before the training prompts).
        on_bad_row: "error" or "skip" (counted) for malformed rows.
        seed: seed of the probe split and the shuffling.
        num_workers: DataLoader workers.
    """

    def __init__(self, *, path: str | Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                 tokenizer: str | None = None, chat: bool = False, chat_template: str | None = None,
                 add_bos: bool = True, seq_len: int = 256, vocab_size: int | None = None,
                 batch_size: int = 8, probe_size: int = 8, overlong: str = "truncate",
                 on_bad_row: str = "error", seed: int = 1234, num_workers: int = 0) -> None:
        super().__init__()
        if path is None and not prompts:
            raise ValueError("PromptDataModule needs a path or a list of prompts")
        if overlong not in OVERLONG or on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG} and on_bad_row one of "
                             f"{BAD_ROW_POLICIES}, got {overlong!r}, {on_bad_row!r}")
        if seq_len < 1 or batch_size < 1 or probe_size < 0:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1, "
                             f"probe_size ({probe_size}) >= 0")
        self.path, self.inline = path, list(prompts or [])
        self.tokenizer_spec, self.chat, self.chat_template = tokenizer, chat, chat_template
        self.add_bos, self.seq_len, self.vocab_size = add_bos, seq_len, vocab_size
        self.batch_size, self.probe_size, self.overlong = batch_size, probe_size, overlong
        self.on_bad_row, self.seed, self.num_workers = on_bad_row, seed, num_workers
        self.counts: Counter = Counter()
        self._tokenizer = None
        self._train: list[list[int]] | None = None
        self._probe: list[list[int]] = []

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_spec is None:
                raise ValueError("PromptDataModule needs data.tokenizer (the policy's tokenizer)")
            self._tokenizer = load_policy_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def tokenizer_dir(self) -> str | None:
        """A tokenizer directory the checkpoint callback copies into the run (when there is one)."""
        spec = Path(str(self.tokenizer_spec)) if self.tokenizer_spec else None
        return str(spec) if spec is not None and (spec / "tokenizer_config.json").is_file() else None

    # ------------------------------------------------------------------------------ rows
    def _rows(self):
        for i, text in enumerate(self.inline):
            yield f"prompts[{i}]", {"prompt": text}
        if self.path is not None:
            yield from read_rows(self.path)

    def _encode(self, row, renderer) -> list[int]:
        if isinstance(row, BadRowError):
            raise row
        if not isinstance(row, Mapping) or not ("prompt" in row or "messages" in row):
            raise BadRowError("a prompt row needs a 'prompt' string or a 'messages' list")
        if "messages" in row:
            return renderer.prompt(_prompt_turns(row["messages"]))
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise BadRowError("'prompt' must be a non-empty string")
        if self.chat:
            return renderer.prompt([{"role": "user", "content": row["prompt"]}])
        ids = self.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if self.add_bos and bos is not None else ids

    def encode_all(self) -> list[list[int]]:
        """Token ids of every usable prompt, in file order (bad / overlong rows counted)."""
        from mmllm.data.chat import ChatFormatError, ChatRenderer

        renderer = None
        out = []
        for where, row in self._rows():
            try:
                if renderer is None and (self.chat or (isinstance(row, Mapping) and "messages" in row)):
                    renderer = ChatRenderer(self.tokenizer, chat_template=self.chat_template)
                ids = self._encode(row, renderer)
            except (BadRowError, ChatFormatError, TypeError, KeyError) as exc:
                if self.on_bad_row == "error":
                    raise ValueError(f"{where}: {exc} (data.on_bad_row=skip counts and skips such rows)") from exc
                self.counts["bad_row"] += 1
                continue
            if not ids:
                self.counts["empty"] += 1
                continue
            if len(ids) > self.seq_len:
                self.counts[f"overlong_{self.overlong}"] += 1
                if self.overlong == "drop":
                    continue
                ids = ids[-self.seq_len:]
            if self.vocab_size is not None and max(ids) >= self.vocab_size:
                raise ValueError(f"{where}: token id {max(ids)} >= vocab_size {self.vocab_size}: "
                                 "the prompts' tokenizer is not the policy's")
            out.append(ids)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        prompts = self.encode_all()
        order = list(range(len(prompts)))
        random.Random(self.seed).shuffle(order)
        n_probe = min(self.probe_size, max(0, len(prompts) - self.batch_size))
        self._probe = [prompts[i] for i in order[:n_probe]]
        self._train = [prompts[i] for i in order[n_probe:]]
        if len(self._train) < self.batch_size:
            raise ValueError(f"{len(self._train)} training prompts (after {n_probe} probe prompts "
                             f"and {dict(self.counts)} skipped) < batch_size {self.batch_size}")
        self.counts["train"], self.counts["probe"] = len(self._train), n_probe
        log.info("prompts: %s", dict(self.counts))

    @property
    def probe_prompts(self) -> list[list[int]]:
        """The fixed probe set (token ids), the same on every rank and every call."""
        if self._train is None:
            self.setup()
        return self._probe

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self.setup()
        # drop_last: every rank runs the same number of full rollouts (collectives stay in step).
        return DataLoader(_Prompts(self._train), batch_size=self.batch_size, shuffle=True,
                          drop_last=True, collate_fn=_collate, num_workers=self.num_workers)


def _prompt_turns(messages) -> list:
    """The conversation a response is generated for: an SFT row's trailing assistant reply (its
    answer) is dropped, so SFT / self-instruct files serve as prompt files."""
    if not isinstance(messages, list) or not messages:
        raise BadRowError("'messages' must be a non-empty list")
    turns = list(messages)
    while turns and isinstance(turns[-1], Mapping) and turns[-1].get("role") == "assistant":
        turns.pop()
    if not turns:
        raise BadRowError("'messages' has no turn before the assistant's reply")
    return turns
