"""SFTDataModule: conversations in, packed (or padded) instruction-tuning batches out.

Sources are JSONL (``.jsonl``/``.jsonl.gz``) or Parquet files of rows in one of three formats,
detected per row:

    messages  ``{"messages": [{"role": "user", "content": ...}, ...]}`` (OpenAI style)
    sharegpt  ``{"conversations": [{"from": "human"|"gpt"|"system"|"tool", "value": ...}]}``
    alpaca    ``{"instruction": ..., "input": ... (optional), "output": ...}``

and/or FLAN-style tasks built from benchmark train splits (:class:`mmllm.data.flan.FlanTask`).
Every row is rendered once with :func:`mmllm.data.chat.render_chat` (loss mask from the chat
template's spans) and checked with :func:`~mmllm.data.chat.check_rendered`; a malformed row (bad
JSON, unknown format, missing roles, empty assistant turn, nothing supervised) raises an error
naming ``file:line``, or is counted and skipped with ``on_bad_row="skip"``. The supervised-token
fraction of every source is reported (:attr:`SFTDataModule.stats`, logged as
``data/<source>/supervised_fraction``) and can be bounded per source
(``supervised_fraction: [lo, hi]``) so a wrong template or role mapping stops the run.

Rendering happens once, in ``prepare_data`` (rank 0), into ``<cache_dir>/rendered/<fingerprint>/``
(flat int32 arrays per source and the statistics); the fingerprint covers the source files (size,
mtime), the FLAN task settings, the tokenizer files and every rendering option, so a change
re-renders and every rank loads the same rows.

Sources are mixed examples-proportionally with an optional per-source cap (FLAN), examples longer
than ``seq_len`` truncated or dropped (counted), and rows packed best-fit decreasing with document
isolation (:mod:`mmllm.data.packing`). Batches: (B, T) int64 ``input_ids``, ``labels`` (-100 where
unsupervised), and when packing ``doc_ids`` and ``position_ids``: what
:class:`mmllm.modules.causal_lm.CausalLMModule` trains on (it passes ``doc_ids``; DecoderLM
derives the same positions from them).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from mmllm.data.chat import (
    ChatFormatError,
    ChatRenderer,
    MaskError,
    SupervisionStats,
    check_rendered,
)
from mmllm.data.conversations import BadRowError, files_of, read_rows, to_messages
from mmllm.data.flan import FlanTask, mix_rows
from mmllm.data.packing import PackingStats, collate_packed, collate_padded, fit_examples, pack

BAD_ROW_POLICIES = ("error", "skip")
# ----------------------------------------------------------------------------------- datasets
class _Rows(Dataset):
    """Map-style dataset over packed rows (lists of examples) or single examples."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class _Collate:
    """Picklable collate function (DataLoader workers)."""

    def __init__(self, *, packed: bool, pad_id: int):
        self.packed, self.pad_id = packed, pad_id

    def __call__(self, items):
        if self.packed:
            return collate_packed(items, pad_id=self.pad_id)
        return collate_padded(items, pad_id=self.pad_id)


# ------------------------------------------------------------------------------ the datamodule
class SFTDataModule(L.LightningDataModule):
    """Instruction-tuning batches from conversation files and FLAN-style tasks.

    Args:
        sources: dicts with ``name``, ``path`` (file, glob or list of JSONL/Parquet files) and
            optionally ``supervised_fraction: [lo, hi]`` (the run fails when the source's
            supervised-token share falls outside it) and ``system_prompt``.
        flan_tasks: FLAN-style tasks (:class:`FlanTask`), each one more source.
        cache_dir: where the tokenizer is saved (``<cache_dir>/tokenizer``).
        tokenizer: a tokenizer to load (path, HF dir or "smollm2"), used with its own chat
            template; None trains a byte-level BPE of ``vocab_size`` on the sources' text, with the
            kit's ChatML template.
        vocab_size: size of the trained tokenizer (the model's vocab_size follows it in conf).
        chat_template: a Jinja template overriding the tokenizer's.
        seq_len: tokens per row (an example longer than this is truncated or dropped).
        batch_size: rows per batch and rank.
        packing: pack several examples per row (else one example per row, padded).
        overlong: "truncate" or "drop" examples longer than ``seq_len`` (counted).
        on_bad_row: "error" stops at the first malformed row (with its file and line); "skip"
            counts and skips it.
        mixing_cap: FLAN examples-proportional cap: a source weighs ``min(rows, cap)``.
        num_examples: training examples per epoch drawn by the mixing rates (None: each source
            ``min(rows, cap)`` once).
        val_fraction: share of every source's rows held out for validation (seeded).
        train_on_all_assistant: supervise every assistant turn (False: only the last).
        num_workers, pin_memory: DataLoader settings.
        seed: seed of the mixing, validation split and shuffling.
    """

    def __init__(self, *, sources: Sequence[Mapping] | None = None,
                 flan_tasks: Sequence[FlanTask] | None = None, cache_dir: str,
                 tokenizer: str | None = None, vocab_size: int = 4096,
                 chat_template: str | None = None, seq_len: int, batch_size: int,
                 packing: bool = True, overlong: str = "truncate", on_bad_row: str = "error",
                 mixing_cap: int | None = None, num_examples: int | None = None,
                 val_fraction: float = 0.0, train_on_all_assistant: bool = True,
                 num_workers: int = 0, pin_memory: bool = False, seed: int = 1234) -> None:
        super().__init__()
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.sources = [dict(s) for s in sources or []]
        self.flan_tasks = list(flan_tasks or [])
        names = [s.get("name") for s in self.sources] + [t.name for t in self.flan_tasks]
        if not names:
            raise ValueError("SFTDataModule needs at least one source or flan task")
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"every source needs a unique name, got {names}")
        self.cache_dir, self.tokenizer_spec, self.vocab_size = Path(cache_dir), tokenizer, vocab_size
        self.chat_template, self.seq_len, self.batch_size = chat_template, seq_len, batch_size
        self.packing, self.overlong, self.on_bad_row = packing, overlong, on_bad_row
        self.mixing_cap, self.num_examples, self.val_fraction = mixing_cap, num_examples, val_fraction
        self.train_on_all_assistant = train_on_all_assistant
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.tokenizer_dir = str(self.cache_dir / "tokenizer")
        self.stats: dict[str, SupervisionStats] = {}
        self.packing_stats: dict[str, PackingStats] = {}
        self._tokenizer = None
        self._train: list | None = None
        self._val: list | None = None

    # ------------------------------------------------------------------------------ rows
    def source_rows(self) -> Iterator[tuple[str, str, object, str | None]]:
        """``(source, where, row, system_prompt)`` over every file source and FLAN task."""
        for src in self.sources:
            if "path" not in src:
                raise ValueError(f"source {src['name']!r} has no 'path'")
            for where, row in read_rows(src["path"]):
                yield src["name"], where, row, src.get("system_prompt")
        for task in self.flan_tasks:
            for i, row in enumerate(task.rows()):
                yield task.name, f"{task.name}:{i}", row, None

    def _texts(self) -> Iterator[str]:
        """Message contents of every usable row (tokenizer training text)."""
        for _, _, row, system in self.source_rows():
            try:
                yield from (str(m["content"]) for m in to_messages(row, system)
                            if isinstance(m, Mapping) and m.get("content"))
            except (ChatFormatError, TypeError, KeyError):
                continue

    # ------------------------------------------------------------------------- preparing
    def prepare_data(self) -> None:
        """Loads (or trains) the tokenizer once (``cache_dir/tokenizer``), then renders every
        source once into ``cache_dir/rendered/<fingerprint>`` (reused while the sources, the
        tokenizer and the rendering options are unchanged), so all ranks load the same rows."""
        self._prepare_tokenizer()
        out = self._rendered_dir()
        if not (out / "stats.json").is_file():
            _save_rendered(out, self.render_sources(), self.stats)

    def _prepare_tokenizer(self) -> None:
        stamp = self.cache_dir / "tokenizer.json.key"
        key = json.dumps({"tokenizer": self.tokenizer_spec, "vocab_size": self.vocab_size,
                          "sources": [s["name"] for s in self.sources]
                          + [t.name for t in self.flan_tasks]})
        from mmllm.data.tokenizer import prepare_tokenizer_dir

        prepare_tokenizer_dir(self.tokenizer_dir, stamp=stamp, key=key, spec=self.tokenizer_spec,
                              vocab_size=self.vocab_size, texts=self._texts)

    @property
    def tokenizer(self):
        """The tokenizer (available after ``prepare_data``)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    # ----------------------------------------------------------------------------- setup
    def _bad(self, stats: SupervisionStats, reason: str, where: str, error: Exception) -> None:
        if self.on_bad_row == "error":
            raise BadRowError(f"{where}: {error} (set data.on_bad_row=skip to count and skip "
                              "such rows)") from error
        stats.skip(reason, where, str(error))

    def render_sources(self) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """Every source's examples ``(input_ids, labels)``; fills :attr:`stats`."""
        render = ChatRenderer(self.tokenizer, chat_template=self.chat_template,
                              train_on_all_assistant=self.train_on_all_assistant)
        pools: dict[str, list] = {}
        self.stats = {}
        for name, where, row, system in self.source_rows():
            stats = self.stats.setdefault(name, SupervisionStats())
            pool = pools.setdefault(name, [])
            if isinstance(row, BadRowError):
                self._bad(stats, "bad_json", where, row)
                continue
            try:
                messages = to_messages(row, system)
                rendered = render(messages)
                check_rendered(rendered, messages)
            except ChatFormatError as e:
                self._bad(stats, "malformed", where, e)
                continue
            except MaskError as e:
                self._bad(stats, "no_supervised_tokens" if "no supervised" in str(e) else "bad_mask",
                          where, e)
                continue
            stats.add(rendered)
            pool.append((np.asarray(rendered.input_ids, dtype=np.int64),
                         np.asarray(rendered.labels(), dtype=np.int64)))
        for src in self.sources:
            stats = self.stats.setdefault(src["name"], SupervisionStats())
            pools.setdefault(src["name"], [])
            stats.check_fraction(src["name"], src.get("supervised_fraction"))
        return pools

    def _fingerprint(self) -> str:
        """Identity of the rendered rows: source files (size, mtime), FLAN task settings and
        data, the tokenizer files and every rendering option."""
        def files(path) -> list:
            return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files_of(path)]

        def task(t: FlanTask) -> dict:
            d = t.data
            local = d.local_path(t.split)
            return {k: getattr(t, k) for k in ("name", "kind", "split", "cot", "num_fewshot",
                                               "fewshot_format", "templates", "limit", "seed")} | {
                "convert": getattr(d.convert, "__qualname__", repr(d.convert)),
                "hub": [d.hub_path, d.hub_name], "local": files(local) if local else None,
                "inline": hashlib.sha1(json.dumps(d.inline.get(t.split), sort_keys=True,
                                                  default=str).encode()).hexdigest()}

        tok_files = sorted(Path(self.tokenizer_dir).glob("*.json"))
        key = {"tokenizer": [hashlib.sha1(f.read_bytes()).hexdigest() for f in tok_files],
               "chat_template": self.chat_template, "on_bad_row": self.on_bad_row,
               "train_on_all_assistant": self.train_on_all_assistant,
               "sources": [{**{k: v for k, v in src.items() if k != "path"},
                            "files": files(src["path"])} for src in self.sources],
               "flan": [task(t) for t in self.flan_tasks]}
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _rendered_dir(self) -> Path:
        return self.cache_dir / "rendered" / self._fingerprint()

    def setup(self, stage: str | None = None) -> None:
        """Loads the rendered rows (rendering them here when ``prepare_data`` did not), then
        splits, mixes and packs them (deterministic, so every rank gets the same rows)."""
        if self._train is not None:
            return
        cached = self._rendered_dir()
        if (cached / "stats.json").is_file():
            pools, self.stats = _load_rendered(cached)
            for src in self.sources:  # the bounds may have changed since the cache was written
                self.stats[src["name"]].check_fraction(src["name"], src.get("supervised_fraction"))
        else:
            pools = self.render_sources()
        train_pools, val = {}, []
        rng = random.Random(self.seed)
        for name, pool in pools.items():
            order = rng.sample(range(len(pool)), len(pool))
            n_val = round(self.val_fraction * len(pool))
            val += [pool[i] for i in order[:n_val]]
            train_pools[name] = [pool[i] for i in sorted(order[n_val:])]
        if not any(train_pools.values()):
            raise ValueError(f"no usable training rows: {self.summary()['sources']}")
        mixed = mix_rows({k: v for k, v in train_pools.items() if v}, cap=self.mixing_cap,
                         num_examples=self.num_examples, seed=self.seed)
        self._train = self._rows(mixed, "train")
        self._val = self._rows(val, "val") if val else []
        rank_zero_info(f"SFT data: {json.dumps(self.summary(), indent=1)}")
        self._log_stats()

    def _log_stats(self) -> None:
        """Per-source supervised fractions and skipped rows, per-split padding, to the loggers."""
        loggers = getattr(self.trainer, "loggers", None) if self.trainer is not None else None
        if not loggers:
            return
        metrics = {}
        for name, st in self.stats.items():
            metrics[f"data/{name}/supervised_fraction"] = st.fraction
            metrics[f"data/{name}/rows"] = float(st.rows)
            metrics[f"data/{name}/skipped_rows"] = float(sum(st.skipped.values()))
        for split, st in self.packing_stats.items():
            metrics[f"data/{split}/padding_fraction"] = st.padding_fraction
        for logger in loggers:
            logger.log_metrics(metrics, step=0)

    def _rows(self, examples: list, split: str) -> list:
        stats = self.packing_stats[split] = PackingStats()
        fitted = fit_examples(examples, self.seq_len, overlong=self.overlong, stats=stats)
        if not fitted:
            raise ValueError(f"no {split} example fits seq_len={self.seq_len}: {stats.as_dict()}")
        if not self.packing:
            stats.rows, stats.tokens = len(fitted), sum(len(x[0]) for x in fitted)
            stats.capacity = len(fitted) * self.seq_len
            return fitted
        return [[fitted[i] for i in row] for row in pack(fitted, self.seq_len, stats=stats)]

    def summary(self) -> dict:
        """Per-source supervision statistics and per-split packing statistics."""
        return {"sources": {k: v.as_dict() for k, v in self.stats.items()},
                "packing": {k: v.as_dict() for k, v in self.packing_stats.items()}}

    # ------------------------------------------------------------------------ dataloaders
    def _loader(self, items: list, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        return DataLoader(_Rows(items), batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=_Collate(packed=self.packing, pad_id=int(pad or 0)),
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self.setup("fit")
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self._train is None:
            self.setup("validate")
        return self._loader(self._val, shuffle=False) if self._val else []


# ------------------------------------------------------------------------------ rendered cache
def _save_rendered(out: Path, pools: dict[str, list], stats: dict[str, SupervisionStats]) -> None:
    """Writes every source's examples as flat int32 arrays + offsets, atomically."""
    # A private temporary name: with one prepare_data per node, nodes may race on a shared disk.
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for i, (name, pool) in enumerate(pools.items()):
        lengths = np.array([len(ids) for ids, _ in pool], dtype=np.int64)
        np.savez(tmp / f"source{i}.npz", input_ids=_flat(pool, 0), labels=_flat(pool, 1),
                 offsets=np.concatenate([[0], np.cumsum(lengths)]))
    meta = {name: {"file": f"source{i}.npz", **vars(stats[name])} for i, name in enumerate(pools)}
    (tmp / "stats.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, out)  # atomic: `out` is complete or absent
    except OSError:
        if not (out / "stats.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another node finished first: same content


def _flat(pool: list, k: int) -> np.ndarray:
    return np.concatenate([x[k] for x in pool]).astype(np.int32) if pool else np.zeros(0, np.int32)


def _load_rendered(out: Path) -> tuple[dict[str, list], dict[str, SupervisionStats]]:
    meta = json.loads((out / "stats.json").read_text())
    pools, stats = {}, {}
    for name, m in meta.items():
        arrays = np.load(out / m.pop("file"))
        ids, labels, off = (arrays[k] for k in ("input_ids", "labels", "offsets"))
        pools[name] = [(ids[a:b].astype(np.int64), labels[a:b].astype(np.int64))
                       for a, b in itertools.pairwise(off)]
        stats[name] = SupervisionStats(**m)
    return pools, stats
