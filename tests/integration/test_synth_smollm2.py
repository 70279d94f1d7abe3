"""Self-instruct and Evol-Instruct end to end, offline, with SmolLM2-135M-Instruct as the teacher:
served by ``mmllm serve`` (ServerThread on loopback) and asked through the real openai client.

The outputs must be SFT rows that SFTDataModule trains on, with stats that add up. The yield of a
135M teacher is low (it copies its prompt's tasks, which ROUGE-L drops; it refuses, echoes and
loops); the test prints it. Measured: self-instruct kept 1 of 4 proposed instructions,
Evol-Instruct 2 of 8 evolutions (2 rounds of 4).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")

from mmllm.data.sft import SFTDataModule
from mmllm.losses import IGNORE_INDEX
from mmllm.serve import Engine, ServerThread, create_app
from mmllm.synth import EvolInstruct, SelfInstruct
from mmllm.teacher import OpenAITeacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(smollm2, tmp_path_factory):
    """Both generators run once against the served SmolLM2 (the session's one load of it)."""
    model, tok, _ = smollm2
    out = tmp_path_factory.mktemp("synth")
    app = create_app(Engine(model, tok, max_batch=8, max_seq_len=1024), model_name="smollm2", max_tokens=64)
    with ServerThread(app) as server, OpenAITeacher(
            model="smollm2", base_url=server.url, max_retries=0, progress=False, on_error="skip",
            sampling={"max_tokens": 48}, cache_path=out / "cache.sqlite") as teacher:
        si = SelfInstruct(num_instructions=6, requests_per_round=3, max_rounds=1, num_prompt_instructions=4,
                          num_shots=2, max_instances=2, propose_sampling={"temperature": 1.0, "top_p": 0.95},
                          seed=0).run(teacher, out / "self_instruct")
        evol = EvolInstruct(num_instructions=4, rounds=2, seed=0).run(teacher, out / "evol_instruct")
    for name, r in (("self-instruct", si), ("evol-instruct", evol)):
        print(f"{name} with SmolLM2: kept {r.stats['kept']}/{r.stats['generated']} (yield {r.stats['yield']}); "
              f"drops {r.stats.get('dropped', r.stats.get('eliminated'))}")
    return si, evol, out


def test_self_instruct_through_the_served_teacher(results):
    si = results[0]
    s = si.stats
    assert s["requests"]["propose_requests"] == 3 and s["requests"]["propose_failed"] == 0
    assert s["generated"] > 0 and s["generated"] == s["kept"] + sum(s["dropped"].values())
    assert s["dropped"].get("rouge_duplicate", 0) > 0  # a small model copies its prompt's tasks
    tasks = [json.loads(x) for x in si.paths["tasks"].read_text().splitlines()]
    assert len(tasks) == s["kept"] and s["rows"] == sum(len(t["instances"]) for t in tasks) == len(si.rows)
    assert json.loads(si.paths["stats"].read_text()) == s


def test_evol_instruct_through_the_served_teacher(results):
    evol = results[1]
    s = evol.stats
    assert [r["evolved"] for r in s["rounds"]] == [4, 4]  # a failed evolution's parent is retried
    for r in s["rounds"]:
        assert r["evolved"] == r["kept"] + sum(r["eliminated"].values())
        assert sum(r["operations"].values()) == r["evolved"]
    assert s["kept"] == sum(r["kept"] for r in s["rounds"]) == len(evol.rows)
    assert s["requests"]["evolve_requests"] == 8 and s["requests"]["evolve_failed"] == 0


def test_the_generated_rows_train_with_sftdatamodule(results):
    si, evol, out = results
    sources = [{"name": n, "path": str(r.paths["sft"])} for n, r in (("si", si), ("evol", evol)) if r.rows]
    if not sources:
        pytest.fail(f"SmolLM2 kept nothing: {si.stats['dropped']} / {evol.stats['eliminated']}")
    dm = SFTDataModule(sources=sources, cache_dir=str(out / "sft_cache"), tokenizer="smollm2", seq_len=512,
                       batch_size=4, packing=True)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    supervised = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert supervised > 0
    stats = [dm.stats[s["name"]] for s in sources]
    assert sum(st.rows for st in stats) == len(si.rows) + len(evol.rows) and not any(st.skipped for st in stats)
