"""Gorilla: the API catalog, AST sub-tree matching, self-instruct data through a fake teacher."""

import json

import pytest

from mmllm.teacher import Teacher
from mmllm.tools import gorilla
from mmllm.tools.ast_match import classify, evaluate_answers, extract_code
from mmllm.tools.catalog import APIRetriever, CatalogError, load_catalog, write_catalog


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_shipped_catalog_is_valid_and_real(catalog):
    assert len(catalog) >= 30
    assert len({d.api_call for d in catalog}) == len(catalog)
    rn = next(d for d in catalog if d.api_name == "torchvision.models.resnet18")
    assert rn.api_call == "torchvision.models.resnet18(weights='IMAGENET1K_V1')"
    assert rn.performance["acc@1"] == 69.758  # torchvision's published weight metadata
    assert set(json.loads(rn.doc_text())) == set(gorilla.APIDoc.__dataclass_fields__)


def test_catalog_errors_name_the_line(tmp_path, catalog):
    path = write_catalog(catalog[:2], tmp_path / "c.jsonl")
    assert [d.api_call for d in load_catalog(path)] == [d.api_call for d in catalog[:2]]
    bad = dict(catalog[0].to_dict(), api_call="resnet18(")
    path.write_text(catalog[0].doc_text() + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(CatalogError, match=r"c.jsonl:2: api_call does not parse"):
        load_catalog(path)
    path.write_text(catalog[0].doc_text() + "\n" + catalog[0].doc_text() + "\n")
    with pytest.raises(CatalogError, match="repeats line 1"):
        load_catalog(path)


REF = "torchvision.models.resnet50(weights='IMAGENET1K_V2')"
OTHER = "torchvision.models.resnet18(weights='IMAGENET1K_V1')"
HF_REF = "pipeline('sentiment-analysis', model='distilbert-base-uncased-finetuned-sst-2-english')"
CATALOG_CALLS = [REF, OTHER, HF_REF, "f(x=1, y=[1, 2.5], z={'a': True})"]

MATCH_CASES = [
    # (answer, reference, outcome): the paper's definition, case by case
    (REF, REF, "correct"),
    ("torchvision.models.resnet50(weights='IMAGENET1K_V2', progress=False)", REF, "correct"),  # extra optional arg
    ('torchvision.models.resnet50(weights=" IMAGENET1K_V2 ")', REF, "correct"),  # quotes, whitespace
    ("torchvision.models.resnet50(weights='imagenet1k_v2')", REF, "hallucination"),  # case-sensitive
    ("m = torchvision.models.resnet50(weights='IMAGENET1K_V2').eval()", REF, "correct"),  # a sub-tree
    (("<<<domain>>>: Image Classification\n<<<api_call>>>: torchvision.models.resnet50(weights='IMAGENET1K_V2')\n"
      "<<<api_provider>>>: PyTorch"), REF, "correct"),
    ("Use this:\n```python\nimport torchvision\nmodel = torchvision.models.resnet50(weights='IMAGENET1K_V2')\n```",
     REF, "correct"),
    ("Sure! model = torchvision.models.resnet50(weights='IMAGENET1K_V2') should work.", REF, "parse_failure"),  # code inline in prose
    ("The call is\nmodel = torchvision.models.resnet50(weights='IMAGENET1K_V2')\nenjoy", REF, "correct"),
    ("f(z={'a': True}, y=(1, 2.5), x=1.0)", "f(x=1, y=[1, 2.5], z={'a': True})", "correct"),  # 1 == 1.0, order-free
    ("f(x=True, y=[1, 2.5], z={'a': True})", "f(x=1, y=[1, 2.5], z={'a': True})", "hallucination"),  # True != 1
    ("f(x=1, y=[2.5, 1], z={'a': True})", "f(x=1, y=[1, 2.5], z={'a': True})", "hallucination"),  # list order
    ("f(x=1, z={'a': True})", "f(x=1, y=[1, 2.5], z={'a': True})", "hallucination"),  # missing arg
    ("torchvision.models.resnet50()", REF, "hallucination"),  # reference arg missing
    ("torchvision.models.resnet50(weights='IMAGENET1K_V1')", REF, "hallucination"),  # wrong value: not in catalog
    ("models.resnet50(weights='IMAGENET1K_V2')", REF, "hallucination"),  # name path must be equal
    (OTHER, REF, "wrong_api"),
    ("torchvision.models.resnet18(weights='IMAGENET1K_V1', progress=True)", REF, "wrong_api"),
    (HF_REF.replace("'sentiment-analysis', ", "task='sentiment-analysis', "), HF_REF, "hallucination"),  # positional
    ("pipeline('sentiment-analysis', model='distilbert-base-uncased-finetuned-sst-2-english', device=0)",
     HF_REF, "correct"),
    ("torchvision.models.resnet50(weights='IMAGENET1K_V2'", REF, "parse_failure"),
    ("<<<api_call>>>: torchvision.models.resnet50(weights=", REF, "parse_failure"),
    ("I don't know which model to use.", REF, "abstention"),
    ("", REF, "abstention"),
    ("42", REF, "abstention"),
    (None, REF, "abstention"),
]


@pytest.mark.parametrize("answer,reference,outcome", MATCH_CASES)
def test_ast_subtree_matching(answer, reference, outcome):
    assert classify(answer, reference, CATALOG_CALLS) == outcome


def test_match_report_counts():
    answers = [REF, OTHER, "x(", "", "nope.nothing(1)"]
    report = evaluate_answers(answers, [REF] * 5, CATALOG_CALLS)
    assert report.outcomes == ["correct", "wrong_api", "parse_failure", "abstention", "hallucination"]
    d = report.as_dict()
    assert d["accuracy"] == 0.2 and d["hallucination_rate"] == 0.2 and d["total"] == 5
    assert "accuracy 20.00 %" in report.summary()
    assert extract_code("a\n```py\nf(1)\n```\nb") == "f(1)"


class ScriptedTeacher(Teacher):
    """Answers self-instruct prompts from a script keyed by the API named in the prompt."""

    def __init__(self, script):
        super().__init__(model="scripted", progress=False)
        self.script, self.prompts = script, []

    def _complete(self, messages, sampling):
        self.prompts.append(messages)
        user = messages[-1]["content"]
        for api, answer in self.script.items():
            if f"calls {api} like" in user:
                return answer
        raise RuntimeError("unscripted prompt")


def test_generate_pairs_with_a_fake_teacher(catalog):
    docs = [d for d in catalog if d.api_name in ("torchvision.models.resnet18", "facebook/bart-large-cnn",
                                                 "torchvision.models.vgg16")]
    rn, bart, vgg = sorted(docs, key=lambda d: ["torchvision.models.resnet18", "facebook/bart-large-cnn",
                                                "torchvision.models.vgg16"].index(d.api_name))
    script = {
        rn.api_name: "Here you go:\n```json\n[" + ",\n".join([
            json.dumps({"instruction": "Classify the animal in my photo.", "api_call": rn.api_call}),
            json.dumps({"instruction": "Tag holiday pictures by object.",
                        "api_call": "torchvision.models.resnet18(weights=None)"}),
            json.dumps({"instruction": "Label images", "api_call": "torchvision.models.resnet34()"}),  # other API
            json.dumps({"instruction": "Label images", "api_call": "resnet18("}),  # does not parse
            json.dumps({"instruction": "classify the animal in my photo.", "api_call": rn.api_call}),  # duplicate
        ]) + "]\n```",
        bart.api_name: "1. Summarise this news story in three sentences.\n2. Give me a short digest of the article.",
        vgg.api_name: "I cannot help with that.",
    }
    teacher = ScriptedTeacher(script)
    stats = gorilla.GenerationStats()
    pairs = gorilla.generate_pairs(teacher, [rn, bart, vgg], per_api=5, n_shots=2, stats=stats,
                                   seed_examples=[{"instruction": "Detect cars", "api_call": catalog[21].api_call}])
    assert [p["instruction"] for p in pairs] == ["Classify the animal in my photo.", "Tag holiday pictures by object.",
                                                 "Summarise this news story in three sentences.",
                                                 "Give me a short digest of the article."]
    assert pairs[1]["api_call"] == "torchvision.models.resnet18(weights=None)"
    assert pairs[2]["api_call"] == bart.api_call  # a list of instructions: the documented call
    assert stats == {"pairs": 4, "bad_api_call": 2, "duplicate": 1, "unparsed": 1}
    prompt = next(p[-1]["content"] for p in teacher.prompts if f"calls {rn.api_name} like" in p[-1]["content"])
    shots, doc_part = prompt.split("Here is the documentation of one API:")
    assert "Detect cars" in shots and rn.api_call not in shots  # no few-shot example of the API itself
    assert rn.doc_text() in doc_part.splitlines()


def test_chats_with_and_without_the_doc(tmp_path, catalog):
    pairs = [{"instruction": "Summarise this news story.", "api_call": d.api_call, "api_name": d.api_name,
              "doc_index": i} for i, d in enumerate(catalog) if d.api_name == "facebook/bart-large-cnn"]
    bare = gorilla.to_chats(pairs, catalog)
    oracle = gorilla.to_chats(pairs, catalog, retrieval="oracle")
    bm25 = gorilla.to_chats(pairs, catalog, retrieval="bm25")
    assert bare[0]["messages"][0]["content"] == "Summarise this news story."
    doc = catalog[pairs[0]["doc_index"]]
    assert oracle[0]["messages"][0]["content"].endswith(gorilla.DOC_PREFIX + doc.doc_text())
    assert "bart-large-cnn" in bm25[0]["messages"][0]["content"]  # BM25 finds the summariser
    answer = bare[0]["messages"][1]["content"]
    assert f"<<<api_call>>>: {doc.api_call}\n" in answer
    # The reference answers score 100 % on their own prompts; an answer without the doc is an abstention.
    report = gorilla.evaluate([r["messages"][1]["content"] for r in oracle], pairs, catalog)
    assert report.accuracy == 1.0
    path = gorilla.write_jsonl(bare + oracle, tmp_path / "gorilla.jsonl")
    from mmllm.data.sft import SFTDataModule
    dm = SFTDataModule(sources=[{"name": "gorilla", "path": str(path)}], cache_dir=str(tmp_path / "cache"),
                       seq_len=2048, batch_size=2, vocab_size=320)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"] != -100).sum() > 0


def test_retriever_finds_the_api(catalog):
    retriever = APIRetriever(catalog)
    assert retriever.retrieve("detect people and their body keypoints pose")[0].api_name.endswith("keypointrcnn_resnet50_fpn")
    assert retriever.retrieve("transcribe speech audio to text")[0].api_name == "openai/whisper-small"
    assert retriever.retrieve("qwertyuiop") == []


class ListTeacher(Teacher):
    """Answers every self-instruct prompt with two numbered instructions naming the API's task."""

    def __init__(self, **kw):
        super().__init__(model="list", progress=False)

    def _complete(self, messages, sampling):
        api = messages[-1]["content"].rsplit("calls ", 1)[1].split(" like")[0]
        return f"1. First task for {api}\n2. Second task for {api}"


def test_generate_cli_writes_pairs_and_three_chat_files(tmp_path, monkeypatch, catalog):
    import hydra

    seen = {}

    def fake_instantiate(cfg, **kw):
        seen.update(cfg)
        return ListTeacher()

    monkeypatch.setattr(hydra.utils, "instantiate", fake_instantiate)
    assert gorilla.main(["generate", "--teacher", "openai", "--set", "model=my-model", "--per-api", "2",
                         "--out", str(tmp_path)]) == 0
    assert seen["_target_"] == "mmllm.teacher.OpenAITeacher" and seen["model"] == "my-model"
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 * len(catalog)
    for mode in ("no_doc", "oracle", "bm25"):
        rows = [json.loads(line) for line in (tmp_path / f"sft_{mode}.jsonl").read_text().splitlines()]
        assert len(rows) == len(pairs) and (gorilla.DOC_PREFIX in rows[0]["messages"][0]["content"]) == (mode != "no_doc")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"answer": p["api_call"]}) + "\n" for p in pairs))
    assert gorilla.main(["evaluate", "--pairs", str(tmp_path / "pairs.jsonl"), "--answers", str(answers)]) == 0
