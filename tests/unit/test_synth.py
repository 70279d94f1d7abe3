"""mmllm.synth with a scripted teacher: filters, parsing, elimination rules, stats that add up, CLI, stage."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from mmllm.data.chat import validate_messages
from mmllm.synth import (
    EvolInstruct,
    RougePool,
    SelfInstruct,
    instruction_reason,
    load_seed_tasks,
    response_reason,
)
from mmllm.synth.evol_instruct import evolution_reason, evolved_text
from mmllm.synth.parsing import (
    parse_equal,
    parse_instances,
    parse_instructions,
    parse_labeled_instances,
    parse_yes_no,
)
from mmllm.teacher import Teacher


class ScriptedTeacher(Teacher):
    """Answers with ``script(prompt)`` (the user turn; a function, or the name of one in this
    module, for Hydra); None answers count as failures."""

    def __init__(self, script, **kw):
        super().__init__(model="scripted", progress=False, on_error="skip", max_concurrency=1, **kw)
        self.script, self.prompts = script, []

    def _complete(self, messages, sampling):
        prompt = messages[-1]["content"]
        self.prompts.append(prompt)
        script = globals()[self.script] if isinstance(self.script, str) else self.script
        answer = script(prompt)
        if answer is None:
            raise RuntimeError("scripted failure")
        return answer


def _rows_ok(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        validate_messages(row["messages"])
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    return rows


# ---- filters ---------------------------------------------------------------------------
def test_rouge_pool_matches_rouge_score_and_its_bounds_skip_only_hopeless_pairs():
    from rouge_score import rouge_scorer  # lazily: see mmllm/synth/filters.py

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    vocab = ["write", "a", "short", "poem", "about", "the", "sea", "list", "three", "ideas", "for", "dinner",
             "explain", "why", "sky", "blue"]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(3, 12))) for _ in range(60)]
    pool = RougePool(threshold=0.5, texts=texts[:40])
    for q in texts[40:]:
        exact = max(scorer.score(t, q)["rougeL"].fmeasure for t in texts[:40])
        best, _ = pool.most_similar(q)
        assert pool.is_duplicate(q) == (exact >= 0.5)
        if exact >= 0.5:
            assert best == pytest.approx(exact)
    assert RougePool(texts=["a b c d"]).most_similar("a c d e")[0] == pytest.approx(0.75)  # LCS 3 of 4
    assert RougePool(texts=["a b c d"]).most_similar("!!!") == (0.0, None)


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("Do it.", "too_short"), ("word " * 151, "too_long"),
    ("Describe the image below in detail.", "blacklisted"),
    ("Open the attached file and count the lines.", "blacklisted"),
    ("Write a program that sorts a list of numbers.", "program_task"),
    ("- Give three tips for sleeping better.", "starts_with_punctuation"),
    ("Écris un poème sur la mer.", "non_english"),
    ("Give three tips for sleeping better at night.", None),
    ("Explain how a profile works in a dating app.", None),  # "file" inside a word is fine
])
def test_instruction_heuristics(text, reason):
    assert instruction_reason(text) == reason


@pytest.mark.parametrize("response,reason", [
    (None, "teacher_failed"), ("", "degenerate_response"), ("Yes.", "degenerate_response"),
    ("It is what it is, and so it was.", "degenerate_response"),  # only stop words
    ("... !!! ???", "degenerate_response"),
    ("Sorry, I cannot help with that request.", "refused_response"),
    ("Sorry for the wait: " + " ".join(f"step {i} explains a detail;" for i in range(20)), None),  # long: not a refusal
    ("Output: none\nOutput: none\nOutput: none\nOutput: none", "repetitive_response"),
    ("The cat sat on the mat and " * 4, "repetitive_response"),
    ("Paris is the capital of France.", None),
])
def test_response_elimination_rules(response, reason):
    assert response_reason(response) == reason


# ---- parsing ---------------------------------------------------------------------------
def test_parsing_tolerates_formats_and_returns_nothing_for_junk():
    text = " Plan a week of vegetarian dinners.\nTask 10: Rewrite the poem as prose.\n\nI hope this helps\n**Task 11.** Name two rivers in Asia."
    assert parse_instructions(text) == ["Plan a week of vegetarian dinners.", "Rewrite the poem as prose.",
                                        "Name two rivers in Asia."]
    assert parse_instructions("Here are some more tasks:\n1. Sort the words.\n2) Add the numbers.") == [
        "Sort the words.", "Add the numbers."]
    assert parse_instances("Example 1\nInput: 3, 1, 2\nOutput: 1, 2, 3\n\nExample 2\nInput: <none>\nOutput: "
                           "Hello.\nTask: invent another") == [{"input": "3, 1, 2", "output": "1, 2, 3"},
                                                               {"input": "", "output": "Hello."}]
    assert parse_instances("Input: only an input, no output") == []
    assert parse_instances("Input: a poem\nOutput: Roses are red.\n\nOutput: Roses are red.\nOutput: <none>") == [
        {"input": "a poem", "output": "Roses are red."}]  # a looping model's repeats are cut
    assert parse_instances("Input: x\nOutput: <none>") == [{"input": "x", "output": ""}]  # dropped: empty
    assert parse_labeled_instances("Class label: spam\nInput: Win a prize now\nClass label: ham\nInput: See you"
                                   ) == [{"input": "Win a prize now", "output": "spam"},
                                         {"input": "See you", "output": "ham"}]
    assert parse_labeled_instances("spam ham eggs") == []
    assert [parse_yes_no(a) for a in (" Yes", "No.", "Classification: yes", "maybe", None)] == [
        True, False, True, None, None]
    assert [parse_equal(a) for a in ("Equal", "Not Equal.", "not equal", "They differ", None)] == [
        True, False, False, None, None]


def test_evolution_text_and_pre_answer_elimination():
    assert evolved_text("#Rewritten Prompt#:\n  \"List five rivers longer than 3000 km.\"") == \
        "List five rivers longer than 3000 km."
    assert evolution_reason("Name a river.", "Rewrite the given prompt to name a river.") == "copied_prompt_words"
    assert evolution_reason("Name a river.", "Name a #Rewritten Prompt# river.") == "copied_prompt_words"
    assert evolution_reason("Name a river.", "name a  river.") == "no_information_gain"
    assert evolution_reason("Name a river.", "") == "empty_evolution"
    assert evolution_reason("Name a river.", "what is it then?") == "degenerate_evolution"
    assert evolution_reason("Name a river.", None) == "teacher_failed"
    assert evolution_reason("Name a river.", "Name a river in Africa longer than the Rhine.") is None


def test_seed_tasks_ship_and_bad_rows_are_named(tmp_path):
    seeds = load_seed_tasks()
    assert len(seeds) >= 20 and 0 < sum(t.is_classification for t in seeds) < len(seeds)
    bad = tmp_path / "seeds.jsonl"
    bad.write_text(json.dumps(seeds[0].as_json()) + "\n" + json.dumps({"instruction": "x", "instances": []}) + "\n")
    with pytest.raises(ValueError, match=r"seeds.jsonl:2"):
        load_seed_tasks(bad)


# ---- self-instruct ---------------------------------------------------------------------
NEW = ["Plan a week of vegetarian dinners for a family of four.",
       "Explain how vaccines train the immune system.",
       "Label the tone of the message as formal or informal."]


def self_instruct_script(prompt: str) -> str | None:
    if prompt.startswith("Come up with"):  # proposals: 3 good, 1 near-duplicate of a seed, junk
        return ("\n".join([NEW[0], f"Task 10: {NEW[1]}", f"Task 11: {NEW[2]}",
                           "Task 12: Rewrite the sentence in the passive voice, please.",
                           "Task 13: Draw a map of your town.", "Task 14: ok"]))
    if prompt.startswith("Is the task"):
        return "Yes" if "Label the tone" in prompt.rsplit("Task:", 1)[1] else "No"
    task = prompt.rsplit("Task:", 1)[1]
    if NEW[0] in task:  # two good examples, one duplicate, one without output
        return (" <none>\nOutput: Monday: lentil soup. Tuesday: bean chili.\nExample 2\nInput: vegan\n"
                "Output: Monday: tofu curry. Tuesday: falafel wraps.\nExample 3\nInput: vegan\nOutput: Monday: "
                "tofu curry. Tuesday: falafel wraps.\nExample 4\nInput: no output here")
    if NEW[1] in task:
        return "I don't know what you mean"  # malformed: no instance parses
    return " formal\nInput: Dear Sir, I write to confirm our meeting.\nClass label: informal\nInput: hey, see ya!"


def test_self_instruct_keeps_filters_and_counts_every_candidate(tmp_path):
    teacher = ScriptedTeacher(self_instruct_script)
    gen = SelfInstruct(num_instructions=3, requests_per_round=1, max_rounds=1, seed=1)
    result = gen.run(teacher, tmp_path / "si")
    s = result.stats
    assert s["generated"] == 6 and s["kept"] == 2 and s["rounds"] == 1
    assert s["dropped"] == {"rouge_duplicate": 1, "blacklisted": 1, "too_short": 1, "malformed_instances": 1}
    assert s["generated"] == s["kept"] + sum(s["dropped"].values())
    assert s["instances_dropped"] == {"duplicate_instance": 1}
    assert s["classification_kept"] == 1 and s["rows"] == 4 and s["yield"] == pytest.approx(2 / 6, abs=1e-4)
    rows = _rows_ok(result.paths["sft"])
    assert rows[1]["messages"] == [{"role": "user", "content": NEW[0] + "\n\nvegan"},
                                   {"role": "assistant", "content": "Monday: tofu curry. Tuesday: falafel wraps."}]
    assert rows[2]["messages"][1]["content"] == "formal"  # output-first: the label is the answer
    tasks = [json.loads(x) for x in result.paths["tasks"].read_text().splitlines()]
    assert [t["instruction"] for t in tasks] == [NEW[0], NEW[2]] and tasks[1]["is_classification"]
    assert json.loads(result.paths["stats"].read_text()) == s
    # kept tasks join the pool: round 2's repeats of them are near-duplicates, NEW[1] is retried
    more = SelfInstruct(num_instructions=4, requests_per_round=1, max_rounds=2, seed=1).run(
        ScriptedTeacher(self_instruct_script), tmp_path / "si2").stats
    assert more["rounds"] == 2 and more["kept"] == 2 and more["generated"] == 12
    assert more["dropped"]["rouge_duplicate"] == 1 + 3 and more["dropped"]["malformed_instances"] == 2
    # proposals beyond the target are counted, not sent on
    capped = SelfInstruct(num_instructions=1, requests_per_round=1, max_rounds=1).run(
        ScriptedTeacher(self_instruct_script), tmp_path / "si3").stats
    assert capped["dropped"]["over_target"] == 2 and capped["requests"]["classify_requests"] == 1


def test_self_instruct_survives_a_teacher_that_fails_or_writes_junk(tmp_path):
    junk = SelfInstruct(num_instructions=3, requests_per_round=2, max_rounds=2).run(
        ScriptedTeacher(lambda p: "\n\n" if p.startswith("Come") else None), tmp_path / "junk")
    assert junk.stats["generated"] == 0 and junk.stats["kept"] == 0 and junk.rows == []
    assert junk.stats["requests"]["propose_malformed"] == 4
    assert (tmp_path / "junk" / "sft.jsonl").read_text() == ""
    failing = SelfInstruct(num_instructions=3, requests_per_round=1, max_rounds=1).run(
        ScriptedTeacher(lambda p: self_instruct_script(p) if p.startswith("Come") else None), tmp_path / "f")
    assert failing.stats["dropped"]["teacher_failed"] == 3 and failing.stats["kept"] == 0
    assert failing.stats["requests"]["classify_failed"] == 3


# ---- Evol-Instruct ---------------------------------------------------------------------
def evol_script(prompt: str) -> str:
    if prompt.startswith("Here are two"):  # the equality judge
        return "Equal" if "tides" in prompt else ("Hmm" if "Jupiter" in prompt else "Not Equal")
    if prompt.startswith(("You rewrite", "You create")):
        given = prompt.rsplit("Prompt#:\n", 2)[1].split("\n\n#")[0]
        return {"Name a planet.": "#Rewritten Prompt#: Name a planet with rings and explain how they formed.",
                "Describe the moon.": "Describe the moon and its effect on tides.",
                "Say hello.": "Rewrite the given prompt: say hello.",
                "Count to three.": "Count to three.",
                "Greet a friend.": "Greet a friend in Japanese and explain the politeness level.",
                "Name a gas giant.": "Name a gas giant other than Jupiter.",
                "Spell cat.": "Spell the word cat backwards, letter by letter."}.get(
            given, f"{given} Then justify the answer with two reasons.")
    if "backwards" in prompt:
        return "Spell the word cat backwards, letter by letter."  # an echo
    if "Japanese" in prompt:
        return "Sorry, I can't do that."
    if "rings" in prompt:
        return "Saturn: its rings formed from shattered moons and comets."
    return "A careful, complete answer with reasons."


def test_evol_instruct_eliminates_failed_evolutions_and_retries_their_parents(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Name a planet."}, {"prompt": "Describe the moon."},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hi"}]},
        {"instruction": "Count to three."}, {"instruction": "Greet a friend."}, {"prompt": "Name a gas giant."},
        {"instruction": "Spell cat."}]))
    teacher = ScriptedTeacher(evol_script)
    result = EvolInstruct(instructions=str(seeds), rounds=2, seed=0).run(teacher, tmp_path / "ei")
    r1, r2 = result.stats["rounds"]
    assert r1["evolved"] == 7 and r1["kept"] == 1
    assert r1["eliminated"] == {"copied_prompt_words": 1, "no_information_gain": 2, "refused_response": 1,
                                "malformed_judgement": 1, "response_copies_instruction": 1}
    # round 2: the kept evolution evolves on; the failed parents are evolved again (same outcome)
    assert r2["evolved"] == 7 and r2["kept"] == 1 and sum(r2["eliminated"].values()) == 6
    assert result.stats["generated"] == 14 and result.stats["kept"] == 2 == result.stats["rows"]
    assert sum(s["operations"][op] for s in (r1, r2) for op in s["operations"]) == 14
    rows = _rows_ok(result.paths["sft"])
    assert rows[0]["messages"][0]["content"] == "Name a planet with rings and explain how they formed."
    assert rows[0]["messages"][1]["content"].startswith("Saturn")
    evo = [json.loads(x) for x in result.paths["evolutions"].read_text().splitlines()]
    assert evo[1]["parent"] == evo[0]["instruction"] and evo[1]["round"] == 2
    # rouge equality: no judge requests; the tides evolution now passes, Jupiter's too
    teacher = ScriptedTeacher(evol_script)
    rouge = EvolInstruct(instructions=str(seeds), rounds=1, equality_check="rouge").run(teacher, tmp_path / "r")
    assert not any(p.startswith("Here are two") for p in teacher.prompts)
    assert rouge.stats["kept"] == 3 and rouge.stats["eliminated"] == {
        "copied_prompt_words": 1, "no_information_gain": 1, "refused_response": 1,
        "response_copies_instruction": 1}
    assert rouge.stats["generated"] == rouge.stats["kept"] + sum(rouge.stats["eliminated"].values())


def test_generators_reject_bad_options():
    with pytest.raises(ValueError, match="unknown operations"):
        EvolInstruct(operations=["shout"])
    with pytest.raises(ValueError, match="equality_check"):
        EvolInstruct(equality_check="vibes")
    with pytest.raises(ValueError, match="num_machine_instructions"):
        SelfInstruct(num_prompt_instructions=2, num_machine_instructions=3)
    assert Counter(len(EvolInstruct().instructions) for _ in range(1)) == Counter({len(load_seed_tasks()): 1})


# ---- CLI and pipeline stage ----------------------------------------------------------------
def test_cli_runs_the_configured_mode_with_the_configured_teacher(tmp_path, capsys):
    from omegaconf import OmegaConf

    from mmllm.config import compose_config
    from mmllm.synth.cli import run

    cfg = compose_config("synth", ["mode=evol_instruct", "evol_instruct.rounds=1", "evol_instruct.num_instructions=3",
                                   "evol_instruct.equality_check=rouge", f"output_dir={tmp_path / 'out'}",
                                   "teacher.cache_path=null"], output_dir=tmp_path)
    assert cfg.teacher._target_ == "mmllm.teacher.OpenAITeacher" and cfg.teacher.on_error == "skip"
    assert cfg.self_instruct.rouge_threshold == 0.7
    cfg.teacher = OmegaConf.create({"_target_": f"{__name__}.ScriptedTeacher", "script": "evol_script"})
    result = run(cfg)
    assert result.stats["generated"] == 3 and (tmp_path / "out" / "sft.jsonl").exists()
    assert "synth evol_instruct: kept" in capsys.readouterr().out


TEXT = ("Write a short poem about the sea. Task 1: List three ideas for dinner. Example 1 Input: none "
        "Output: pasta. Classify the review as positive or negative. Yes. No. ") * 20


@pytest.fixture(scope="module")
def pretrain_ctx(tmp_path_factory):
    """A StageContext whose finished ``pretrain`` input is a random tiny kit checkpoint."""
    import torch
    from omegaconf import OmegaConf

    from mmllm.data.tokenizer import train_bpe_tokenizer
    from mmllm.models.decoder_lm import DecoderLM
    from mmllm.stages import Marker, StageContext

    run = tmp_path_factory.mktemp("run")
    tok = train_bpe_tokenizer([TEXT], vocab_size=300, show_progress=False)
    tok.save_pretrained(run / "tokenizer")
    config = {"vocab_size": len(tok), "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64,
              "max_seq_len": 1024}
    torch.manual_seed(0)
    ckpt = run / "checkpoints" / "final.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in DecoderLM(**config).state_dict().items()},
                "mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": config,
                          "tokenizer": str(run / "tokenizer")}}, ckpt)
    marker = Marker(stage="pretrain", target="x", fingerprint="f", run_id="r", started_at="", finished_at="",
                    seconds=0.0, outputs={"checkpoint": str(ckpt)}, record={}, config_updates={}, config={})
    return lambda: StageContext(name="self_instruct", run_dir=run, cfg=OmegaConf.create({"seed": 3}),
                                markers={"pretrain": marker})


def test_stage_serves_the_pretrained_model_and_finishes_on_junk(pretrain_ctx):
    from mmllm.stages.synth import SelfInstructStage

    stage = SelfInstructStage(num_instructions=4, requests_per_round=2, max_rounds=1, max_tokens=16,
                              max_seq_len=1024)  # this tiny tokenizer needs ~600 tokens per prompt
    assert stage.inputs == ("pretrain",)
    ctx = pretrain_ctx()
    stage.run(ctx)
    rec, stats = ctx.record["self_instruct"], json.loads(stage.outputs(ctx)["stats"].read_text())
    assert rec["teacher"] == "pretrain (mmllm serve)" and rec["kept"] == stats["kept"] <= 4
    assert stats["requests"]["propose_requests"] == 2 and stats["requests"]["propose_failed"] == 0  # served
    assert stats["teacher"]["requests"] >= 2
    assert stats["generated"] == stats["kept"] + sum(stats["dropped"].values())
    assert len(_rows_ok(stage.outputs(ctx)["sft"])) == stats["rows"]


def test_stage_takes_any_teacher(pretrain_ctx):
    from mmllm.stages.synth import SelfInstructStage

    stage = SelfInstructStage(teacher=ScriptedTeacher(self_instruct_script), num_instructions=3, max_rounds=1,
                              requests_per_round=1)
    assert stage.inputs == ()
    ctx = pretrain_ctx()
    stage.run(ctx)
    assert ctx.record["self_instruct"]["kept"] == 2 and ctx.record["self_instruct"]["rows"] == 4
    assert len(_rows_ok(stage.outputs(ctx)["sft"])) == 4
