"""``mmllm serve`` with images: OpenAI image_url parts -> a (tiny fake) VLM, limits and refusals."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from PIL import Image
from torch import nn

from mmllm.data.chat import ChatRenderer
from mmllm.data.special_tokens import SPECIAL_TOKENS
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.generation import DecodeSession
from mmllm.models.decoder_lm import DecoderLM
from mmllm.serve import Engine, ServerThread, create_app
from mmllm.serve.images import (
    IMG_END,
    IMG_FEATURE,
    IMG_START,
    ImageLimits,
    encode_prompt,
    image_span_ids,
    is_vlm,
    load_image_url,
)
from mmllm.serve.protocol import APIError

TEXT = ("What is in this picture? A red square on a white page. Describe the image. "
        "Hello there, how can I help you today? The cat sat on the mat.") * 30
M = 3  # image positions per image


class FakeVLM(nn.Module):
    """The VLM interface of mmllm.serve.images: 8x8 pixels -> M features through a linear map."""

    def __init__(self, decoder: DecoderLM, image_token_id: int) -> None:
        super().__init__()
        self.decoder, self.image_token_id, self.num_image_tokens = decoder, image_token_id, M
        dim = decoder.embed_tokens.weight.shape[1]
        self.proj = nn.Linear(3 * 8 * 8, M * dim)
        self.calls: list[tuple[int, int]] = []  # (image positions in the prompt, images)

    @property
    def embed_tokens(self):
        return self.decoder.embed_tokens

    def preprocess_images(self, images) -> torch.Tensor:
        return torch.stack([torch.from_numpy(
            __import__("numpy").asarray(im.convert("RGB").resize((8, 8)), dtype="float32") / 255).permute(2, 0, 1)
            for im in images])

    def embed(self, input_ids, *, images=None):
        x = self.decoder.embed_tokens(input_ids)
        slots = input_ids == self.image_token_id
        self.calls.append((int(slots.sum()), 0 if images is None else images.shape[0]))
        feats = self.proj(images.flatten(1)).reshape(-1, x.shape[-1])
        return x.masked_scatter(slots.unsqueeze(-1), feats.to(x.dtype))


@pytest.fixture(scope="module")
def tok():
    tok = train_bpe_tokenizer([TEXT], vocab_size=420, show_progress=False,
                              special_tokens=SPECIAL_TOKENS.tokens() + [IMG_START, IMG_FEATURE, IMG_END])
    return tok


@pytest.fixture(scope="module")
def vlm(tok):
    torch.manual_seed(0)
    decoder = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                        max_seq_len=256)
    return FakeVLM(decoder, tok.convert_tokens_to_ids(IMG_FEATURE)).eval()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (40, 30), "red").save(d / "red.png")
    return d


@pytest.fixture(scope="module")
def server(vlm, tok, image_dir):
    engine = Engine(vlm, tok, max_batch=2, max_seq_len=256)
    limits = ImageLimits(max_images=2, max_bytes=4000, allow_local_files=True, local_root=str(image_dir))
    with ServerThread(create_app(engine, model_name="vlm", max_body_bytes=1 << 20, max_tokens=16,
                                 image_limits=limits)) as s:
        yield s


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(url: str, parts: list, role: str = "user", **extra) -> httpx.Response:
    body = {"model": "vlm", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": role, "content": parts}], **extra}
    return httpx.post(f"{url}/chat/completions", json=body, timeout=60)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_image_request_equals_direct_vlm_generation(server, vlm, tok):
    image = Image.new("RGB", (20, 20), (200, 30, 30))
    vlm.calls.clear()
    r = ask(server.url, [image_part(data_url(image)), {"type": "text", "text": "What is in this picture?"}])
    assert r.status_code == 200, r.text
    assert vlm.calls == [(M, 1)]  # the engine prefilled the prompt with the image's features
    # Reference: the same prompt (image span in place of <image>) decoded from embeddings directly.
    messages = [{"role": "user", "content": "<image>\nWhat is in this picture?"}]
    ids = encode_prompt(ChatRenderer(tok), messages, 1, image_span_ids(tok, M))
    assert ids.count(tok.convert_tokens_to_ids(IMG_FEATURE)) == M
    with torch.no_grad():
        emb = vlm.embed(torch.tensor([ids]), images=vlm.preprocess_images([image]))[0]
    session = DecodeSession(vlm.decoder, max_rows=1, max_len=256, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    (row,) = session.add_rows(inputs_embeds=[emb], max_new_tokens=8)
    while session.step():
        pass
    want = tok.decode(session.rows[row].tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert r.json()["choices"][0]["message"]["content"] == want
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_local_files_only_under_the_allowed_root(server, image_dir, tmp_path):
    assert ask(server.url, [image_part(f"file://{image_dir / 'red.png'}"),
                            {"type": "text", "text": "Describe the image."}]).status_code == 200
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    for url in (str(tmp_path / "outside.png"), f"{image_dir}/../{tmp_path.name}/outside.png"):
        r = ask(server.url, [image_part(url)])
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_not_allowed"


@pytest.mark.parametrize("parts,role,code", [
    ([image_part("data:image/png;base64,@@not-base64@@")], "user", "invalid_image"),
    ([image_part("data:image/png;base64," + base64.b64encode(b"plain text").decode())], "user", "invalid_image"),
    ([image_part("data:text/plain;base64,aGVsbG8=")], "user", "invalid_image"),
    ([image_part("https://example.com/cat.png")], "user", "url_not_allowed"),
    ([image_part("data:image/png;base64," + "A" * 8000)], "user", "image_too_large"),
    ([image_part(data_url(Image.new("RGB", (2, 2))))] * 3, "user", "too_many_images"),
    ([image_part(data_url(Image.new("RGB", (2, 2))))], "system", "invalid_image"),
    ([{"type": "text", "text": "<image> pretend"}, image_part(data_url(Image.new("RGB", (2, 2))))], "user",
     "invalid_image"),
])
def test_bad_images_are_400_in_openai_format(server, parts, role, code):
    r = ask(server.url, parts, role=role)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["type"] == "invalid_request_error"


def test_a_text_model_refuses_images(tok):
    torch.manual_seed(0)
    lm = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                   max_seq_len=64)
    assert not is_vlm(lm)
    with ServerThread(create_app(Engine(lm, tok, max_batch=1, max_seq_len=64), model_name="lm",
                                 max_tokens=4)) as s:
        r = ask(s.url, [image_part(data_url(Image.new("RGB", (2, 2)))), {"type": "text", "text": "hi"}])
        assert r.status_code == 400 and "does not take images" in r.json()["error"]["message"]
        ok = ask(s.url, [{"type": "text", "text": "Hello there"}], max_tokens=4)
        assert ok.status_code == 200


def test_load_image_url_defaults_refuse_local_files(image_dir):
    with pytest.raises(APIError, match="not allowed") as e:
        load_image_url(str(image_dir / "red.png"), ImageLimits())
    assert e.value.status == 400
    image = load_image_url(data_url(Image.new("RGB", (5, 7), "blue"), "JPEG"), ImageLimits())
    assert image.size == (5, 7) and image.mode == "RGB"


def test_openai_client_streams_an_image_request(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    content = [{"type": "text", "text": "Describe the image."},
               {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (9, 9), "green"))}}]
    whole = client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": content}],
                                           temperature=0, max_tokens=8)
    chunks = client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": content}],
                                            temperature=0, max_tokens=8, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_a_real_vision_language_model_served_with_an_image(tok):
    """The kit's VisionLanguageModel (tiny open_clip ViT + MLP connector + DecoderLM) behind
    `mmllm serve`: an image request equals the model's own generate() on the same prompt."""
    from mmllm.models.vlm import build_vlm
    from mmllm.nn.connectors import MLPConnector
    from mmllm.nn.vision import TINY_VIT, VisionEncoder

    torch.manual_seed(0)
    encoder = VisionEncoder(model_cfg=TINY_VIT)
    lm = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                   max_seq_len=256)
    feats = encoder(encoder.preprocess_images([Image.new("RGB", (8, 8))]))
    connector = MLPConnector(in_dim=feats.shape[-1], out_dim=32)
    vlm = build_vlm(connector=connector, image_token_id=tok.convert_tokens_to_ids(IMG_FEATURE),
                    vocab_size=len(tok), lm=lm, vision=encoder).eval()
    image = Image.new("RGB", (24, 24), (30, 200, 30))
    engine = Engine(vlm, tok, max_batch=2, max_seq_len=256)
    with ServerThread(create_app(engine, model_name="vlm", max_body_bytes=1 << 20, max_tokens=16)) as s:
        r = ask(s.url, [image_part(data_url(image)), {"type": "text", "text": "Describe it."}])
    assert r.status_code == 200, r.text
    messages = [{"role": "user", "content": "<image>\nDescribe it."}]
    ids = encode_prompt(ChatRenderer(tok), messages, 1, image_span_ids(tok, vlm.num_image_tokens))
    with torch.no_grad():
        new = vlm.generate([ids], [encoder.preprocess_images([image])], max_new_tokens=8,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0]
    want = tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert r.json()["choices"][0]["message"]["content"] == want
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
