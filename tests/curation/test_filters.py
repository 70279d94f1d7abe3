"""Gopher repetition/quality, RefinedWeb line filter, C4 rules, language ID, extraction:
each checked against hand-computed values, without Ray."""

from __future__ import annotations

import pandas as pd
import pytest
from curation_testdata import TEXTS, page
from nemo_curator.stages.text.download.html_extractors.justext import JusTextExtractor
from nemo_curator.stages.text.download.html_extractors.resiliparse import ResiliparseExtractor
from nemo_curator.stages.text.filters.heuristic.repetition import (
    RepeatedLinesByCharFilter,
    RepeatedLinesFilter,
    RepeatingDuplicateNGramsFilter,
)
from nemo_curator.tasks import DocumentBatch

from mmllm.curation.base import STATS_KEY
from mmllm.curation.extract import TextExtractionStage
from mmllm.curation.filters import (
    GopherQualityStage,
    GopherRepetitionStage,
    GopherSymbolToWordFilter,
    GopherTopNGramFilter,
)
from mmllm.curation.langid import LanguageIdStage, identify
from mmllm.curation.line_filters import C4FilterStage, RefinedWebLineFilterStage


def batch(texts, **cols) -> DocumentBatch:
    return DocumentBatch(dataset_name="t", data=pd.DataFrame({"text": texts, **cols}), _metadata={})


# ---------------------------------------------------------------- Gopher repetition
def test_top_ngram_char_fraction_hand_computed():
    text = "the cat the cat the cat sat"  # word chars: 7 words x 3 = 21
    assert GopherTopNGramFilter(2).score_document(text) == pytest.approx(18 / 21)
    # 3-grams: "the cat the" and "cat the cat" both occur twice; the first seen wins and its
    # occurrences (positions 0 and 2) cover words 0..4 = 15 characters.
    assert GopherTopNGramFilter(3).score_document(text) == pytest.approx(15 / 21)
    assert GopherTopNGramFilter(2).score_document("every word here is different") == 0.0
    # Unlike str.replace, no credit for the n-gram inside longer words ("bathe cat").
    # "the cat" at words 0 and 4 covers the, cat, the, cat = 12 of 20 characters.
    assert GopherTopNGramFilter(2).score_document("the cat bathe cat the cat") == \
        pytest.approx(12 / 20)


def test_nemo_duplicate_ngram_filter_matches_gopher():
    # Repeated occurrence "a b c" (second copy) = 5 characters incl. spaces, of 11; the
    # overlapping n-grams are counted once.
    assert RepeatingDuplicateNGramsFilter(n=2).score_document("a b c a b c") == pytest.approx(5 / 11)


def test_nemo_line_filters_keep_unique_fraction():
    lines = ["alpha beta gamma", "one two three", "four five six", "seven eight",
             "nine ten", "eleven twelve"] + ["alpha beta gamma"] * 4
    text = "\n".join(lines)  # 10 lines, 6 unique -> 40 % duplicated lines
    assert RepeatedLinesFilter().score_document(text) == pytest.approx(0.6)
    uniq = sum(map(len, set(lines)))
    assert RepeatedLinesByCharFilter().score_document(text) == pytest.approx(uniq / sum(map(len, lines)))
    assert GopherRepetitionStage().first_failure(text) == "repeated_lines"


def test_repetition_stage_reasons_in_order():
    stage = GopherRepetitionStage()
    assert stage.first_failure(TEXTS["bread"]) is None
    long = "x" * 100
    lines = [long] * 3 + [f"short {i:03d}" for i in range(7)]  # 20 % dup lines, 54 % dup chars
    assert stage.first_failure("\n".join(lines)) == "repeated_lines_char"
    # Paragraphs A, A, B (B has 5 lines): 1/7 duplicated lines but 1/3 duplicated paragraphs.
    para = "\n\n".join([TEXTS["coffee"]] * 2 + ["\n".join(TEXTS["birds"].split(". ")[:5])])
    assert stage.first_failure(para) == "repeated_paragraphs"
    assert stage.first_failure("   ") == "empty_text"
    # The cached views are cleared after each document, so the filters work alone again.
    assert all(f.ngrams is None and f.sentences is None for f in stage._filters)


def test_gopher_thresholds_are_configurable():
    loose = GopherRepetitionStage(max_dup_line_fraction=0.5)
    text = "\n".join(["a b"] * 4 + ["c d", "e f", "g h", "i j", "k l", "m n"])  # 30 % duplicated
    assert loose._filters[0].keep_document(loose._filters[0].score_document(text))
    with pytest.raises(ValueError, match="fraction"):
        GopherRepetitionStage(top_ngram_max_fractions={2: 1.5})


# ---------------------------------------------------------------- Gopher quality
def test_symbol_to_word_counts_hash_chars_and_glued_ellipses():
    f = GopherSymbolToWordFilter()
    assert f.score_document(" ".join(["alpha"] * 18 + ["###", "end"])) == pytest.approx(3 / 20)
    assert f.score_document("wait... what... no") == pytest.approx(2 / 3)
    assert f.score_document("one two three four five six seven eight nine ten…") == \
        pytest.approx(1 / 10)


def test_quality_stage_reasons():
    q = GopherQualityStage()
    words49 = " ".join(TEXTS["bread"].split()[:49])
    assert q.first_failure(words49) == "word_count"
    assert q.first_failure(" ".join(TEXTS["bread"].split()[:50])) is None
    assert q.first_failure(" ".join(["a", "an", "to", "of", "it"] * 12)) == "mean_word_length"
    assert q.first_failure(TEXTS["bread"] + " ####" * 10) == "symbol_to_word"
    bullets = "\n".join(f"• {s}" for s in TEXTS["bread"].split(". "))
    assert q.first_failure(bullets) == "bullet_ratio"
    ellipsis = "\n".join(s + "..." for s in TEXTS["bicycle"].split(". "))
    assert q.first_failure(ellipsis) == "ellipsis"
    digits = TEXTS["bread"] + " " + " ".join(str(1000 + i) for i in range(60))
    assert q.first_failure(digits) == "words_without_alphabets"
    no_stop = " ".join(w for w in TEXTS["library"].split()
                       if w.lower() not in {"the", "be", "to", "of", "and", "that", "have", "with"})
    assert q.first_failure(no_stop) == "common_english_words"


def test_chain_stage_records_reasons_and_examples():
    texts = [TEXTS["bread"], "too short", TEXTS["birds"]]
    out = GopherQualityStage().process(batch(texts, url=["u1", "u2", "u3"]))
    assert out.data["text"].tolist() == [TEXTS["bread"], TEXTS["birds"]]
    rec = out._metadata[STATS_KEY][-1]
    assert (rec["stage"], rec["docs_in"], rec["docs_out"]) == ("gopher_quality", 3, 2)
    assert rec["dropped"] == {"word_count": {"docs": 1, "chars": 9}}
    assert rec["examples"]["word_count"] == [{"url": "u2", "text": "too short"}]
    assert rec["chars_in"] == sum(map(len, texts))


# ---------------------------------------------------------------- RefinedWeb lines and C4
LINES = ["A normal first sentence that has quite a few words in it for sure.",  # 14 words
         "12 likes",  # counter: 2
         "Share",  # one word: 1
         "Sign in to comment",  # short + start pattern: "Sign in" cut, 2 of 4 removed
         "THIS IS ALL CAPS TEXT HERE",  # upper case: 6
         "2024-11-05",  # numeric: 1
         "Another ordinary sentence with enough words to be kept by the filter."]  # 12


def test_refinedweb_line_corrections_hand_computed():
    stage = RefinedWebLineFilterStage()
    new, removed, total = stage.correct("\n".join(LINES))
    assert (removed, total) == (12, 40)
    assert new == "\n".join([LINES[0], "to comment", LINES[-1]])
    out = stage.process(batch(["\n".join(LINES), TEXTS["bread"] + "\n12 likes"]))
    rec = out._metadata[STATS_KEY][0]
    assert rec["dropped"]["too_many_lines_removed"]["docs"] == 1  # 12/40 = 30 % > 5 %
    assert out.data["text"].tolist() == [TEXTS["bread"]]  # 2/135 words removed: kept, edited
    assert rec["docs_edited"] == 1
    loose = RefinedWebLineFilterStage(max_removed_fraction=0.5)
    assert len(loose.process(batch(["\n".join(LINES)])).data) == 1


def test_c4_rules():
    c4 = C4FilterStage()
    good = ["This line ends with a period and has words.", "Another good line is here too!",
            "Is this the third good line today?"]
    noisy = good + ["no punctuation here at all folks", "Enable JavaScript to view this site.",
                    "Read our privacy policy for details today.", "Too short."]
    out = c4.process(batch(["\n".join(noisy), "Lorem ipsum dolor sit amet.\n" + "\n".join(good),
                            "\n".join(good) + "\nvar x = {a: 1};", "\n".join(good[:2])]))
    assert out.data["text"].tolist() == ["\n".join(good)]
    reasons = {k: v["docs"] for k, v in out._metadata[STATS_KEY][0]["dropped"].items()}
    assert reasons == {"c4_lorem_ipsum": 1, "c4_curly_bracket": 1, "c4_too_few_sentences": 1}
    assert C4FilterStage(bad_words=["dolor"]).document_reason("x dolor y") == "c4_bad_words"


# ---------------------------------------------------------------- language ID
def test_langid_fasttext_lid176():
    from curation_testdata import NON_ENGLISH

    lang, score = identify(TEXTS["volcano"])
    assert lang == "en" and score > 0.9
    assert identify(NON_ENGLISH["de"])[0] == "de" and identify(NON_ENGLISH["ru"])[0] == "ru"
    texts = [TEXTS["volcano"], NON_ENGLISH["de"], NON_ENGLISH["fr"], "12 34 ?? !!"]
    out = LanguageIdStage(languages=["en", "de"]).process(batch(texts))
    assert out.data["language"].tolist() == ["en", "de"]
    assert (out.data["language_score"] > 0.65).all()
    rec = out._metadata[STATS_KEY][0]
    assert {k: v["docs"] for k, v in rec["dropped"].items()} == {
        "language_not_kept": 1, "low_language_score": 1}
    assert rec["extra"]["languages"]["fr"] == 1 and rec["extra"]["languages_kept"] == {"en": 1, "de": 1}
    with pytest.raises(FileNotFoundError):
        LanguageIdStage(model_path="/no/such/model.ftz")


# ---------------------------------------------------------------- extraction
@pytest.mark.parametrize("extractor", [None, JusTextExtractor(),
                                       ResiliparseExtractor(required_stopword_density=0.0)],
                         ids=["trafilatura", "justext", "resiliparse"])
def test_extraction_removes_boilerplate(extractor):
    html = page("Bread", [TEXTS["bread"], TEXTS["coffee"]])
    stage = TextExtractionStage() if extractor is None else TextExtractionStage(extractor=extractor)
    out = stage.process(batch([None, None], html=[html, "<html><body></body></html>"],
                              url=["a", "b"]))
    [text] = out.data["text"].tolist()
    assert "Baking bread at home" in text and "Grinding just before brewing" in text
    assert "We use cookies" not in text and "All rights reserved" not in text
    assert "html" not in out.data.columns
    assert out._metadata[STATS_KEY][0]["dropped"] == {"no_text_extracted": {"docs": 1,
                                                                             "chars": 26}}


def test_cleanup_removes_urls_and_extra_newlines():
    stage = TextExtractionStage()
    text = "See https://example.com/a?b=1 for more.\n\n\n\nNext www.example.org part.\n \n \nEnd"
    assert stage.clean(text) == "See  for more.\n\nNext  part.\n\nEnd"
    out = stage.process(batch([text], html=[None]))  # text inputs skip extraction
    assert out.data["text"][0] == stage.clean(text)
