"""Prompt templates: [X]/[Z] slots, cloze vs prefix, k-shot layout, verbalisers."""

from __future__ import annotations

import pytest

from mmllm.eval.templates import Example, Template, Verbalizer, fewshot_context, sample_demos


def test_prefix_and_cloze_templates_split_at_the_answer_slot():
    prefix = Template("Question: [X]\nAnswer: [Z]")
    cloze = Template("[X] Overall, it was a [Z] movie.")
    fields = {"X": "I loved every minute."}
    assert not prefix.is_cloze and cloze.is_cloze
    assert prefix.context(fields) == "Question: I loved every minute.\nAnswer: "
    assert prefix.suffix(fields) == ""
    assert cloze.context(fields) == "I loved every minute. Overall, it was a "
    assert cloze.suffix(fields) == " movie."
    assert cloze.render(fields, "great") == "I loved every minute. Overall, it was a great movie."


def test_slots_are_filled_once_and_unknown_brackets_stay():
    t = Template("[passage]\nQ: [question] [BEGIN] [Z]")
    # A field whose text looks like a slot is not substituted again.
    out = t.context({"passage": "see [question] and [X]", "question": "why?"})
    assert out == "see [question] and [X]\nQ: why? [BEGIN] "


@pytest.mark.parametrize("bad", ["no answer slot", "[Z] twice [Z]"])
def test_template_needs_exactly_one_answer_slot(bad):
    with pytest.raises(ValueError, match=r"\[Z\]"):
        Template(bad)


def test_kshot_prompt_is_demos_then_query_with_lm_eval_delimiters():
    t = Template("Review: [X]\nSentiment: [Z]")
    v = Verbalizer({"positive": "great", "negative": "terrible"})
    demos = [Example(fields={"X": "Loved it"}, choices=["neg", "pos"], labels=["negative", "positive"], gold=1),
             Example(fields={"X": "Boring"}, choices=["neg", "pos"], labels=["negative", "positive"], gold=0)]
    query = Example(fields={"X": "Fine film"}, choices=["neg", "pos"], labels=["negative", "positive"], gold=1)
    ctx = fewshot_context(t, query, demos, lambda d: v.words(d)[d.gold], description="Sentiment.\n\n")
    assert ctx == ("Sentiment.\n\nReview: Loved it\nSentiment: great\n\n"
                   "Review: Boring\nSentiment: terrible\n\nReview: Fine film\nSentiment: ")


def test_verbalizer_maps_labels_to_words_and_back():
    v = Verbalizer({"positive": "great", "negative": "terrible"})
    ex = Example(fields={"X": "x"}, choices=["a", "b"], labels=["negative", "positive"], gold=0)
    assert v.words(ex) == ["terrible", "great"]
    assert v.label_of(" Great!") == "positive" and v.label_of("meh") is None
    assert Verbalizer().words(ex) == ["a", "b"] and Verbalizer().words(ex, use_labels=True) == ["negative", "positive"]
    with pytest.raises(KeyError, match="no word for labels"):
        Verbalizer({"positive": "great"}).words(ex)
    with pytest.raises(ValueError, match="distinct"):
        Verbalizer({"a": "same", "b": "Same"})


def test_demos_are_seeded_exclude_the_query_and_first_n_keeps_order():
    pool = [Example(fields={"X": str(i)}, choices=["a"], gold=0) for i in range(10)]
    a = sample_demos(pool, 3, seed=1, exclude=pool[0])
    assert a == sample_demos(pool, 3, seed=1, exclude=pool[0]) and pool[0] not in a
    assert sample_demos(pool, 3, seed=0, exclude=pool[0], sampler="first") == pool[1:4]
    with pytest.raises(ValueError, match="pool has 9"):
        sample_demos(pool, 10, seed=0, exclude=pool[0])


def test_example_validates_gold_and_labels():
    with pytest.raises(ValueError, match="out of range"):
        Example(fields={}, choices=["a", "b"], gold=2)
    with pytest.raises(ValueError, match="labels"):
        Example(fields={}, choices=["a", "b"], labels=["x"], gold=0)
