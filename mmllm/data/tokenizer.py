"""Tokenizers: train a byte-level BPE, load any common format, extend a vocabulary.

Everything returns a ``transformers.PreTrainedTokenizerFast`` (``TokenizersBackend`` in
transformers 5) with bos/eos/pad/unk set, so ``save_pretrained`` / ``AutoTokenizer`` round-trip it.

Vocabulary extension follows Chinese-LLaMA: train a BPE on target-language text with the base
tokenizer's own normalizer and pre-tokenizer, then append the tokens the base lacks (ids after
the base vocabulary) and their merges (after the base merges). Base ids never change, so a
pretrained model only needs new embedding rows (``DecoderLM.resize_token_embeddings``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmllm.data.chat import CHATML_TEMPLATE
from mmllm.data.special_tokens import SPECIAL_TOKENS, add_special_tokens

# Token strings other tokenizers use for the four roles, tried in order when a role is unset.
_ROLE_CANDIDATES = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "<|im_start|>"),
    "eos": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"),
    "unk": ("<unk>", "<|endoftext|>"),
    "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SP_SPACE = "\u2581"  # "▁": SentencePiece's visible space


# ----------------------------------------------------------------------------------- training
def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2,
                        special_tokens: list[str] | None = None,
                        show_progress: bool = True) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (GPT-2 style: every byte is a token, nothing unknown).

    Args:
        texts: training documents (any iterable; consumed once).
        vocab_size: final vocabulary size, special tokens and the 256 byte symbols included.
        min_frequency: a pair must occur this often to be merged.
        special_tokens: tokens reserved at ids 0..n-1 (default: every kit token, see
            :mod:`mmllm.data.special_tokens`). bos/eos/pad/unk are always included, first.
        show_progress: show the trainer's progress bar.

    Returns:
        The trained tokenizer, bos/eos/pad/unk set and the other special tokens registered as
        extra special tokens, with the kit's ChatML ``chat_template``
        (:data:`mmllm.data.chat.CHATML_TEMPLATE`). It adds no bos/eos on encode (packing
        appends eos itself).
    """
    base = SPECIAL_TOKENS.tokens(["base"])
    requested = SPECIAL_TOKENS.tokens() if special_tokens is None else list(special_tokens)
    specials = base + [t for t in requested if t not in base]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(alphabet)} byte "
                         f"symbols plus {len(specials)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    out = _wrap(tok, bos=SPECIAL_TOKENS.bos, eos=SPECIAL_TOKENS.eos, pad=SPECIAL_TOKENS.pad,
                unk=SPECIAL_TOKENS.unk, extra=specials[len(base):])
    out.chat_template = CHATML_TEMPLATE  # saved with it: SFT and generation render ChatML
    return out


def prepare_tokenizer_dir(tokenizer_dir: str | os.PathLike, *, stamp: str | os.PathLike, key: str,
                          spec: str | None, texts, vocab_size: int) -> None:
    """Saves a data module's tokenizer into ``tokenizer_dir`` once, stamped with ``key``.

    The tokenizer is loaded from ``spec`` (any model source of
    :func:`mmllm.checkpoint.load_tokenizer_from`) or, when ``spec`` is None, BPE-trained on
    ``texts()`` (a callable, so the texts are only read when training is needed). A directory made
    for another key (other sources, size or spec) is an error rather than silently reused.
    """
    stamp = Path(stamp)
    if (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        if stamp.is_file() and stamp.read_text() != key:
            raise ValueError(f"{tokenizer_dir} was made for {stamp.read_text()}, not {key}: "
                             "use another data.cache_dir or delete it")
        return
    if spec:
        from mmllm.checkpoint import load_tokenizer_from

        tok = load_tokenizer_from(spec)
    else:
        tok = train_bpe_tokenizer(texts(), vocab_size=vocab_size, show_progress=False)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(tokenizer_dir)
    stamp.write_text(key)


def _wrap(tok: Tokenizer, *, bos: str | None, eos: str | None, pad: str | None, unk: str | None,
          extra: list[str], **kwargs) -> PreTrainedTokenizerFast:
    """Wraps a ``tokenizers.Tokenizer`` into a transformers tokenizer with the given roles."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=pad, unk_token=unk, extra_special_tokens=extra,
                                   **kwargs)


# ------------------------------------------------------------------------------------ loading
def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Loads a tokenizer from a file, a directory or the hub.

    Args:
        path: a ``tokenizer.json`` file; a SentencePiece ``.model`` file (converted to a fast
            tokenizer that encodes like ``SentencePieceProcessor.encode``); a ``.gguf`` file
            (its embedded tokenizer); a directory written by ``save_pretrained``; or a hub id
            such as ``HuggingFaceTB/SmolLM2-135M`` (used only when no such local path exists and
            the hub is not offline: a local path never touches the network).

    Returns:
        The tokenizer, with unset bos/eos/pad/unk filled from its own vocabulary (eos standing
        in for pad/unk/bos when nothing fits; the kit's base tokens are added only when the
        tokenizer has no eos at all).

    Raises:
        FileNotFoundError: ``path`` does not exist locally and is not reachable on the hub.
        ValueError: the file or directory is not a tokenizer format this function knows.
    """
    p = Path(path).expanduser()
    if p.is_file():
        tok = _load_file(p)
    elif p.is_dir():
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if not any((p / n).is_file() for n in names):
            raise ValueError(f"{p} is a directory without any of {names}: "
                             "not a tokenizer directory")
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    elif _HUB_ID.match(str(path)) and not p.suffix:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise FileNotFoundError(f"tokenizer {path!r}: no such local path, and the hub is "
                                    "offline (HF_HUB_OFFLINE is set)")
        tok = AutoTokenizer.from_pretrained(str(path))
    else:
        raise FileNotFoundError(f"tokenizer {path!r}: no such file or directory")
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"{path} loads as {type(tok).__name__}, not a fast (tokenizers) tokenizer")
    return _fill_roles(tok)


def _load_file(p: Path) -> PreTrainedTokenizerFast:
    if p.suffix == ".json":
        try:
            backend = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{p} is not a tokenizers tokenizer.json: {e}") from e
        tok = _wrap(backend, bos=None, eos=None, pad=None, unk=None, extra=[])
        tok.name_or_path = str(p)
        return tok
    if p.suffix == ".model":
        return _load_sentencepiece(p)
    if p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    raise ValueError(f"unknown tokenizer format {p.suffix!r} ({p}): expected tokenizer.json, "
                     "a SentencePiece .model, a .gguf file or a tokenizer directory")


def _load_sentencepiece(p: Path) -> PreTrainedTokenizerFast:
    """Converts a SentencePiece model (BPE or unigram) with transformers' generic converter."""
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    try:
        extractor = SentencePieceExtractor(str(p))
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{p} is not a SentencePiece model: {e}") from e
    kwargs = extractor.extract(None)
    backend = SpmConverter.build_tokenizer_from_spm_proto(extractor.proto, kwargs["vocab"])
    if backend is None:
        raise ValueError(f"{p}: unsupported SentencePiece model type")
    spec = extractor.proto.trainer_spec

    def piece(idx: int, name: str) -> str | None:
        return name if idx >= 0 else None

    roles = dict(bos=piece(spec.bos_id, spec.bos_piece), eos=piece(spec.eos_id, spec.eos_piece),
                 pad=piece(spec.pad_id, spec.pad_piece), unk=piece(spec.unk_id, spec.unk_piece))
    extra = [str(t) for t in kwargs.get("additional_special_tokens", [])
             if str(t) not in roles.values()]
    tok = _wrap(backend, extra=extra, **roles)
    tok.name_or_path = str(p)
    return tok


def _fill_roles(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Sets unset bos/eos/pad/unk from the vocabulary (no new ids unless there is no eos)."""
    vocab = tok.get_vocab()
    for role in ("eos", "bos", "unk", "pad"):
        if getattr(tok, f"{role}_token") is None:
            found = next((t for t in _ROLE_CANDIDATES[role] if t in vocab), None)
            if found is None and role != "eos" and tok.eos_token is not None:
                found = tok.eos_token  # GPT-2's convention: one token plays every role
            if found is not None:
                setattr(tok, f"{role}_token", found)
    if tok.eos_token is None:
        add_special_tokens(tok, groups=("base",))
    return tok


# ---------------------------------------------------------------------------------- extension
def extend_vocabulary(base: PreTrainedTokenizerFast | str | os.PathLike, texts: Iterable[str], *,
                      num_new_tokens: int, min_frequency: int = 2,
                      show_progress: bool = False) -> PreTrainedTokenizerFast:
    """Adds target-language tokens to a BPE tokenizer, keeping every base id (Chinese-LLaMA).

    A BPE is trained on ``texts`` with the base's normalizer and pre-tokenizer (for
    SentencePiece-style bases, pieces are also split at "▁" while training, as SentencePiece's
    ``split_by_whitespace`` does). Walking its vocabulary in training order, each token the base
    lacks is appended: single characters as is (they replace byte-fallback sequences), merged
    tokens together with their merge, whose parts are then base or already-appended tokens.

    Args:
        base: a byte-level BPE (GPT-2, SmolLM2) or a SentencePiece-style BPE with Metaspace and
            byte fallback (LLaMA), as a tokenizer or a path for :func:`load_tokenizer`.
        texts: target-language training text (consumed once).
        num_new_tokens: at most this many tokens are added (fewer when the text has fewer
            pairs occurring ``min_frequency`` times).
        min_frequency: minimum pair frequency while training.
        show_progress: show the trainer's progress bar.

    Returns:
        A new tokenizer: ids ``0..len(base)-1`` as in ``base``, new tokens after them, base merges
        first, so text the new merges do not touch encodes exactly as before.
    """
    if isinstance(base, (str, os.PathLike)):
        base = load_tokenizer(base)
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}")
    spec = json.loads(base.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"extend_vocabulary needs a BPE tokenizer, got {model.get('type')}")
    known = set(model["vocab"]) | {t["content"] for t in spec.get("added_tokens", [])}
    # Training to |base| + n tokens guarantees n tokens the base lacks whenever the text has them.
    trained = _train_like(spec, texts, vocab_size=len(model["vocab"]) + num_new_tokens,
                          min_frequency=min_frequency, show_progress=show_progress)
    tokens, merges = _novel_tokens(trained, known, num_new_tokens)

    next_id = max([*model["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    model["vocab"].update({t: next_id + i for i, t in enumerate(tokens)})
    legacy_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"] += [f"{a} {b}" if legacy_merges else [a, b] for a, b in merges]
    extended = Tokenizer.from_str(json.dumps(spec))
    extra = base.extra_special_tokens or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)  # named or plain
    out = _wrap(extended, bos=base.bos_token, eos=base.eos_token, pad=base.pad_token,
                unk=base.unk_token, extra=[str(t) for t in extra],
                model_max_length=base.model_max_length, padding_side=base.padding_side)
    out.chat_template = base.chat_template
    return out


def _train_like(spec: dict, texts: Iterable[str], *, vocab_size: int, min_frequency: int,
                show_progress: bool) -> dict:
    """Trains a BPE on ``texts`` with the normalizer/pre-tokenizer of ``spec``; returns its
    model (tokenizer.json's "model" dict)."""
    base = spec["model"]
    spec = copy.deepcopy(spec)
    spec["model"] = {"type": "BPE", "vocab": {}, "merges": [], "dropout": None, "unk_token": None,
                     "continuing_subword_prefix": base.get("continuing_subword_prefix"),
                     "end_of_word_suffix": base.get("end_of_word_suffix"),
                     "fuse_unk": False, "byte_fallback": False}
    spec["added_tokens"], spec["post_processor"] = [], None
    tok = Tokenizer.from_str(json.dumps(spec))
    pre = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
    if _SP_SPACE in pre:
        # SentencePiece-style: converted files encode whole lines (Metaspace split=False), but
        # pieces must not span words, as SentencePiece's own trainer splits at whitespace.
        split = pre_tokenizers.Split(Regex(_SP_SPACE), behavior="merged_with_next")
        steps = [tok.pre_tokenizer, split] if tok.pre_tokenizer is not None else [split]
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    byte_level = '"ByteLevel"' in pre
    affixes = {k: base[k] for k in ("continuing_subword_prefix", "end_of_word_suffix")
               if base.get(k)}
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [], **affixes)
    tok.train_from_iterator(texts, trainer)
    return json.loads(tok.to_str())["model"]


def _novel_tokens(trained: dict, known: set[str],
                  limit: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The first ``limit`` trained tokens missing from ``known`` and the merges producing them.

    Tokens are taken in the trained id order (alphabet, then merges in rank order), so the parts
    of every appended merge are base tokens or tokens appended before it.
    """
    prefix = trained.get("continuing_subword_prefix") or ""
    produced: dict[str, tuple[str, str]] = {}
    for m in trained["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        right = b[len(prefix):] if prefix and b.startswith(prefix) else b
        produced.setdefault(a + right, (a, b))
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    available = set(known)
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if len(tokens) >= limit:
            break
        if token in available:
            continue
        pair = produced.get(token)
        if pair is not None:
            if pair[0] not in available or pair[1] not in available:
                continue
            merges.append(pair)
        tokens.append(token)
        available.add(token)
    return tokens, merges
