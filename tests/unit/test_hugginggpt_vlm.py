"""HuggingGPT with the kit's VLM as an expert: a vlm_stage2-style checkpoint behind vlm_describer."""

from __future__ import annotations

import json

import pytest
import torch

IMG_TOKENS = ("<Img>", "<ImageFeature>", "</Img>")


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """A tiny random VLM saved as the pipeline saves it: stages/vlm_stage2/vlm.pt + vlm_stage1/tokenizer."""
    from mmllm.data.special_tokens import SPECIAL_TOKENS
    from mmllm.data.tokenizer import train_bpe_tokenizer
    from mmllm.models import DecoderLM
    from mmllm.models.vlm import build_vlm
    from mmllm.nn.connectors import MLPConnector
    from mmllm.nn.vision import TINY_VIT, VisionEncoder

    stages = tmp_path_factory.mktemp("run") / "stages"
    tok = train_bpe_tokenizer(["A cup of coffee on a saucer, seen from above. Describe the image."] * 20,
                              vocab_size=300, show_progress=False,
                              special_tokens=SPECIAL_TOKENS.tokens() + list(IMG_TOKENS))
    tok.save_pretrained(stages / "vlm_stage1" / "tokenizer")
    torch.manual_seed(0)
    encoder = VisionEncoder(model_cfg=TINY_VIT)
    lm = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=256)
    connector = MLPConnector(in_dim=encoder.width, out_dim=32)
    vlm = build_vlm(connector=connector, image_token_id=tok.convert_tokens_to_ids("<ImageFeature>"),
                    vocab_size=len(tok), lm=lm, vision=encoder).eval()
    (stages / "vlm_stage2").mkdir()
    torch.save({"model_config": vlm.config, "state_dict": vlm.state_dict()}, stages / "vlm_stage2" / "vlm.pt")
    return stages, vlm, tok


@pytest.fixture(scope="module")
def coffee(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    return path


def test_describer_equals_the_vlms_own_generation(stage2, coffee, tmp_path):
    import shutil

    from PIL import Image

    from mmllm.data.chat import ChatRenderer
    from mmllm.serve.images import encode_prompt, image_span_ids
    from mmllm.tools.experts import load_vlm, vlm_describer

    stages, vlm, tok = stage2
    describe = vlm_describer(stages / "vlm_stage2", max_new_tokens=6, device="cpu")  # tokenizer found by layout
    loaded, _ = load_vlm(stages / "vlm_stage2" / "vlm.pt")
    for k, v in vlm.state_dict().items():  # every weight, the encoder's included, came back
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = encode_prompt(ChatRenderer(tok), [{"role": "user", "content": "<image>\nWhat is this?"}], 1,
                        image_span_ids(tok, vlm.num_image_tokens))
    pixels = vlm.vision.preprocess_images([Image.open(coffee)])
    new = vlm.generate([ids], [pixels], max_new_tokens=6, eos_token_id=[tok.eos_token_id,
                       tok.convert_tokens_to_ids("<|im_end|>")], pad_token_id=tok.pad_token_id)[0]
    assert describe(str(coffee), "What is this?") == tok.decode(new, skip_special_tokens=True).strip()
    with pytest.raises(Exception, match="does not fetch"):
        describe("https://example.com/cat.png", "What is this?")
    with pytest.raises(FileNotFoundError, match="no VLM checkpoint"):
        vlm_describer(coffee.parent)
    shutil.copy(stages / "vlm_stage2" / "vlm.pt", tmp_path / "vlm.pt")
    with pytest.raises(FileNotFoundError, match="vlm_stage1"):  # no tokenizer beside it: say where it looked
        load_vlm(tmp_path / "vlm.pt")


def test_hugginggpt_picks_the_vlm_for_an_image_task_and_runs_a_dependent_calculation(stage2, coffee):
    from mmllm.tools.builtin import default_registry
    from mmllm.tools.experts import vlm_describer
    from mmllm.tools.hugginggpt import HuggingGPT, default_experts

    stages, _, _ = stage2
    describe = vlm_describer(stages / "vlm_stage2", max_new_tokens=6, device="cpu")
    caption = describe(str(coffee), "Describe the image.")
    assert caption  # a random model still writes something
    plan = [{"id": 0, "task": "image-to-text", "args": {"image": str(coffee), "text": "Describe the image."},
             "dep": [-1]},
            {"id": 1, "task": "visual-question-answering", "args": {"image": str(coffee), "text": "How many cups?"},
             "dep": [-1]},
            {"id": 2, "task": "calculation", "args": {"expression": "3 * 14"}, "dep": [0, 1]}]
    seen = []

    def llm(messages):  # planner, selector and responder, scripted
        seen.append(messages[-1]["content"])
        if len(seen) == 1:
            return json.dumps(plan)
        report = json.loads(messages[-1]["content"].split("results:\n", 1)[1].rsplit("\nAnswer", 1)[0])
        return f"The picture: {report[0]['output']} (by {report[0]['model']}); 3 * 14 = {report[2]['output']}."

    with default_registry() as reg:
        hg = HuggingGPT(llm=llm, experts=default_experts(reg, vlm=describe))
        out = hg.run("Describe coffee.png, then tell me 3 * 14.")
    res = out["results"]
    assert res[0].ok and res[0].model == "mmllm-vlm" and res[0].output == caption  # the VLM's own words
    assert res[1].ok and res[1].model == "mmllm-vlm-vqa" and res[1].output == describe(str(coffee), "How many cups?")
    assert res[2].ok and res[2].output == "42" and res[2].start >= max(res[0].end, res[1].end)  # after the VLM
    assert out["answer"] == f"The picture: {caption} (by mmllm-vlm); 3 * 14 = 42."
    assert f'"output": {json.dumps(caption, ensure_ascii=False)}' in seen[-1]  # the responder saw the VLM's output
