"""``mmllm inspect-batch <overrides>``: print training batches with the supervised tokens marked.

The loss mask is the part of SFT that goes wrong silently; this shows it. Every row is decoded
document by document (packed rows hold several), supervised tokens wrapped in ``[[...]]`` (or
highlighted in green on a terminal), followed by the data module's statistics::

    mmllm inspect-batch data=sft_flan debug=tiny
    mmllm inspect-batch data=sft data.sources='[{name: chat, path: chat.jsonl}]' +inspect.batches=2

Token t counts as supervised when ``labels[t-1]`` is not -100 (labels are aligned with the
inputs: ``labels[t-1]`` is the target of position t-1, i.e. token t). A label that disagrees with
the next input token is flagged ``!!`` (the data would train on a token it never shows).
"""

from __future__ import annotations

import json
import sys
from itertools import islice

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmllm.config import CONF_DIR
from mmllm.losses.lm import IGNORE_INDEX

_GREEN, _RESET = "\033[42;30m", "\033[0m"


def _mark(text: str, supervised: bool, color: bool) -> str:
    if not supervised:
        return text
    return f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"


def _real_length(ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None,
                 pad_id: int | None) -> int:
    """Tokens before the trailing padding: the last document of a packed row when it is all
    pad ids predicting nothing, else (padded rows) the trailing run of such tokens."""
    if pad_id is None:
        return len(ids)
    is_pad = (ids == pad_id) & (labels == IGNORE_INDEX)
    if doc_ids is not None:
        last = int((doc_ids != doc_ids[-1]).nonzero().max()) + 1 if (doc_ids != doc_ids[-1]).any() else 0
        return last if last > 0 and bool(is_pad[last:].all()) else len(ids)
    n = len(ids)
    while n > 0 and bool(is_pad[n - 1]):
        n -= 1
    return n


def format_row(ids: torch.Tensor, labels: torch.Tensor, tokenizer, *,
               doc_ids: torch.Tensor | None = None, color: bool = False) -> str:
    """One row: documents one per paragraph, supervised tokens marked (see module docstring)."""
    n = _real_length(ids, labels, doc_ids, tokenizer.pad_token_id)
    supervised = [False] + [int(lab) != IGNORE_INDEX for lab in labels[:n - 1]]
    mismatch = [False] + [int(labels[t]) not in (IGNORE_INDEX, int(ids[t + 1])) for t in range(n - 1)]
    docs = doc_ids[:n].tolist() if doc_ids is not None else [0] * n
    out: list[str] = []
    start = 0
    for t in range(1, n + 1):  # group runs of equal (document, supervised) state
        if t == n or docs[t] != docs[start] or supervised[t] != supervised[start]:
            text = tokenizer.decode(ids[start:t].tolist(), skip_special_tokens=False)
            if start > 0 and docs[start] != docs[start - 1]:
                out.append(f"\n--- document {docs[start]} (starts at token {start}) ---\n")
            out.append(_mark(text, supervised[start], color))
            if any(mismatch[start:t]):
                out.append("!!")
            start = t
    n_sup = sum(supervised)
    head = (f"{n} tokens, {len(set(docs))} document(s), {n_sup} supervised "
            f"({n_sup / max(n, 1):.1%}), {len(ids) - n} padding")
    return head + "\n" + "".join(out)


def format_batch(batch: dict[str, torch.Tensor], tokenizer, *, max_rows: int | None = None,
                 color: bool | None = None) -> str:
    """A batch ``{input_ids, labels, doc_ids?}`` as text with the supervised tokens marked.

    Args:
        batch: (B, T) tensors as the data modules produce them.
        tokenizer: the tokenizer that made them.
        max_rows: show at most this many rows.
        color: highlight with ANSI colours instead of ``[[...]]`` (default: when stdout is a tty).

    Returns:
        The text, one block per row.
    """
    color = sys.stdout.isatty() if color is None else color
    ids, labels = batch["input_ids"], batch["labels"]
    doc_ids = batch.get("doc_ids")
    rows = range(ids.shape[0] if max_rows is None else min(max_rows, ids.shape[0]))
    blocks = [f"=== row {b}: " + format_row(ids[b], labels[b], tokenizer, color=color,
                                             doc_ids=None if doc_ids is None else doc_ids[b])
              for b in rows]
    return "\n\n".join(blocks)


def inspect_batches(cfg: DictConfig, *, batches: int = 1, max_rows: int | None = None,
                    color: bool | None = None) -> str:
    """Instantiates ``cfg.data``, prepares it and formats its first training batches."""
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    texts = [f"##### batch {i}\n" + format_batch(batch, dm.tokenizer, max_rows=max_rows, color=color)
             for i, batch in enumerate(islice(iter(dm.train_dataloader()), batches))]
    if hasattr(dm, "summary"):
        texts.append("##### data statistics\n" + json.dumps(dm.summary(), indent=1, default=str))
    return "\n\n".join(texts)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    opts = cfg.get("inspect") or {}
    print(inspect_batches(cfg, batches=int(opts.get("batches", 1)), max_rows=opts.get("rows")))


def main() -> None:
    """``mmllm inspect-batch``: the train config's data, no run directory or log file written."""
    sys.argv = [sys.argv[0], "hydra.run.dir=.", "hydra.output_subdir=null",
                "hydra/job_logging=stdout", *sys.argv[1:]]
    _hydra_main()


if __name__ == "__main__":
    main()
