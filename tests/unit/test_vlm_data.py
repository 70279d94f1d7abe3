"""VLM data: bundled skimage pairs, webdataset / COCO / LLaVA readers, bad samples, sharding, resume."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from mmllm.data.vlm_data import (
    CocoCaptionsSource,
    LlavaInstructSource,
    ReadStats,
    RecordsSource,
    WebDatasetSource,
    expand_urls,
    skimage_instructions,
    skimage_pairs,
    write_webdataset,
)
from mmllm.data.vlm_datamodule import RecordStream, VisionTextDataModule
from mmllm.data.vlm_samples import docstring_caption

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "coins", "horse", "page")


@pytest.fixture(scope="module")
def pairs():
    return skimage_pairs(names=NAMES)


@pytest.fixture(scope="module")
def shards(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds")
    return out, write_webdataset(pairs, str(out / "pairs-%04d.tar"), max_count=3)


def _ids(batches):
    return [r["id"] for b in batches for r in b]


def test_docstring_caption_keeps_description_drops_licence_and_links():
    doc = """Launch photo of a rocket.

    This is the rocket on its pad at dusk. This image was downloaded from
    `SpaceX <https://example.com/x>`__. It is useful for demos.

    Returns
    -------
    rocket : ndarray
    """
    assert docstring_caption(doc) == "Launch photo of a rocket. This is the rocket on its pad at dusk."


def test_skimage_pairs_are_real_clean_and_deterministic(pairs):
    ids = [r["id"] for r in pairs]
    assert len(ids) == len(set(ids)) and "skimage/astronaut" in ids
    assert "skimage/page/flip" not in ids and "skimage/page/crop" in ids  # text is never mirrored
    by_id = {r["id"]: r for r in pairs}
    assert "Eileen Collins" in by_id["skimage/astronaut"]["caption"]
    for r in pairs:
        assert r["images"][0].mode == "RGB" and r["caption"].endswith(".")
        assert not any(w in r["caption"].lower() for w in ("http", "download", "copyright", "returns"))
    flip = np.asarray(by_id["skimage/coffee/flip"]["images"][0])
    assert np.array_equal(flip, np.asarray(ImageOps.mirror(by_id["skimage/coffee"]["images"][0])))
    crop = by_id["skimage/coffee/crop"]["images"][0]
    assert crop.size == (450, 300)  # 0.75 of 600x400
    again = skimage_pairs(names=("coffee",))
    assert np.array_equal(np.asarray(again[0]["images"][0]), np.asarray(by_id["skimage/coffee"]["images"][0]))


def test_skimage_instructions_follow_the_llava_convention():
    records = skimage_instructions()
    assert len(records) >= 8
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert sum(m["content"].count("<image>") for m in r["messages"]) == len(r["images"]) == 1
        assert r["messages"][0]["content"].startswith("<image>\n")


def test_webdataset_roundtrip_brace_and_glob(pairs, shards):
    out, paths = shards
    assert len(paths) == -(-len(pairs) // 3)
    assert expand_urls(str(out / "pairs-*.tar")) == paths
    src = WebDatasetSource(urls=str(out / f"pairs-{{0000..{len(paths) - 1:04d}}}.tar"))
    stats = ReadStats()
    got = [r for u in src.units() for r in src.read_unit(u, stats=stats)]
    assert [r["id"] for r in got] == [r["id"] for r in pairs]
    assert [r["caption"] for r in got] == [r["caption"] for r in pairs]
    assert got[0]["images"][0].size == pairs[0]["images"][0].size
    assert stats.counts["records"] == len(pairs) and stats.skipped == 0


def _tar(path, members: dict[str, bytes], *, cut_in: str | None = None):
    """A tar of ``members``; ``cut_in``: the file ends in the middle of that member's data."""
    buf, cut, offset = io.BytesIO(), None, 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if name == cut_in:
                cut = offset + 512 + 40  # its 512-byte header, then 40 bytes of its data
            offset += 512 + -(-len(data) // 512) * 512
    path.write_bytes(buf.getvalue()[:cut])


def _jpeg(size=(32, 24), color="red", noise: bool = False) -> bytes:
    buf = io.BytesIO()
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="JPEG")
    else:
        Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_samples_are_counted_and_skipped_with_their_path(tmp_path):
    good = _jpeg()
    _tar(tmp_path / "a.tar", {
        "ok.jpg": good, "ok.txt": b"a red square",
        "corrupt.jpg": b"not an image at all", "corrupt.txt": b"x",
        "trunc.jpg": good[: len(good) // 2], "trunc.txt": b"half",
        "nocap.jpg": good, "nocap.txt": b"\xff\xfe\xfa",
        "noimage.txt": b"a caption without its image",
        "empty.png": good, "empty.txt": b"   ",
        "ok2.png": good, "ok2.json": json.dumps({"caption": "json caption", "id": "x2"}).encode(),
    })
    big = _jpeg(noise=True)  # tar is read in 10 KiB records: the cut must come after b1's
    _tar(tmp_path / "b.tar", {"b1.jpg": big, "b1.txt": b"first", "b2.jpg": big,
                              "b2.txt": b"second"}, cut_in="b2.jpg")
    src = WebDatasetSource(urls=[str(tmp_path / "a.tar"), str(tmp_path / "b.tar"),
                                 str(tmp_path / "missing.tar")])
    stats = ReadStats()
    got = [r for u in src.units() for r in src.read_unit(u, stats=stats) if r is not None]
    assert [r["caption"] for r in got] == ["a red square", "json caption", "first"]
    assert got[1]["id"] == "x2"
    c = stats.counts
    assert (c["bad_image"], c["bad_caption"], c["missing_image"], c["empty_caption"]) == (2, 1, 1, 1)
    assert c["truncated_shard"] == 1 and c["missing_shard"] == 1
    where = {w for _, w, _ in stats.examples}
    assert f"{tmp_path / 'a.tar'}:corrupt.jpg" in where and f"{tmp_path / 'a.tar'}:trunc.jpg" in where
    assert "records" in stats.summary() and "corrupt.jpg" in stats.summary()


def test_coco_captions_per_annotation_and_grouped(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10), "blue").save(tmp_path / "img" / "1.jpg")
    (tmp_path / "img" / "2.jpg").write_bytes(b"broken")
    doc = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                      {"id": 3, "file_name": "3.jpg"}],
           "annotations": [{"image_id": 1, "caption": " A blue box. "}, {"image_id": 1, "caption": "Blue."},
                           {"image_id": 2, "caption": "broken"}, {"image_id": 3, "caption": "gone"}]}
    (tmp_path / "caps.json").write_text(json.dumps(doc))
    stats = ReadStats()
    src = CocoCaptionsSource(annotations=str(tmp_path / "caps.json"), image_dir=str(tmp_path / "img"),
                             block_size=3)
    got = [r for u in src.units() for r in src.read_unit(u, stats=stats) if r is not None]
    assert [r["caption"] for r in got] == ["A blue box.", "Blue."] and got[0]["id"] == "coco/1"
    assert stats.counts["bad_image"] == 1 and stats.counts["missing_image"] == 1
    grouped = CocoCaptionsSource(annotations=str(tmp_path / "caps.json"), image_dir=str(tmp_path / "img"),
                                 group_captions=True)
    recs = [r for u in grouped.units() for r in grouped.read_unit(u, stats=ReadStats()) if r]
    assert recs[0]["captions"] == ["A blue box.", "Blue."]


def test_llava_instructions_to_messages(tmp_path):
    Image.new("RGB", (16, 16), "green").save(tmp_path / "g.png")
    data = [
        {"id": "a", "image": "g.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Green."}]},
        {"id": "b", "image": "g.png", "conversations": [  # no placeholder: LLaVA prepends it
            {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Green."}]},
        {"id": "c", "image": "g.png", "conversations": [
            {"from": "human", "value": "<image><image> two?"}, {"from": "gpt", "value": "No."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "e", "image": "none.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(data))
    stats = ReadStats()
    src = LlavaInstructSource(path=str(tmp_path / "llava.json"), image_dir=str(tmp_path), block_size=2)
    got = {r["id"]: r for u in src.units() for r in src.read_unit(u, stats=stats) if r}
    assert sorted(got) == ["a", "b", "d"]
    assert got["a"]["messages"] == [{"role": "user", "content": "<image>\nWhat color?"},
                                    {"role": "assistant", "content": "Green."}]
    assert got["b"]["messages"][0]["content"] == "<image>\nColor?" and got["d"]["images"] == []
    assert stats.counts["placeholder_mismatch"] == 1 and stats.counts["missing_image"] == 1


def test_readers_of_ranks_and_workers_are_disjoint_and_cover_everything(pairs):
    src = RecordsSource(records=pairs, block_size=2)
    seen = []
    for rank in range(2):
        stream = RecordStream(src, batch_size=3, rank=rank, world_size=2, seed=7)
        seen.append(_ids(b for b, _ in stream))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r["id"] for r in pairs)
    with pytest.raises(ValueError, match="units"):
        list(RecordStream(RecordsSource(records=pairs[:2], block_size=2), batch_size=1, world_size=2))


def test_multiworker_resume_matches_an_uninterrupted_run(shards):
    _, paths = shards

    def dm(**kw):
        return VisionTextDataModule(train=WebDatasetSource(urls=paths), batch_size=2, num_workers=2,
                                    seed=3, **kw)
    full = _ids(list(dm().train_dataloader()))
    assert sorted(full) == sorted(_ids([skimage_pairs(names=NAMES, augment=True)]))
    first = dm()
    it = iter(first.train_dataloader())
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    resumed = dm()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint's round trip
    tail = list(resumed.train_dataloader())
    assert _ids(head) + _ids(tail) == full


def test_endless_epochs_have_fixed_length_and_continue_the_stream(pairs):
    src = RecordsSource(records=pairs, block_size=4)
    dm = VisionTextDataModule(train=src, batch_size=4, batches_per_epoch=3, seed=1)
    ep1, ep2 = _ids(list(dm.train_dataloader())), _ids(list(dm.train_dataloader()))
    assert len(ep1) == len(ep2) == 12 and ep1 != ep2
    whole = _ids(list(VisionTextDataModule(train=src, batch_size=4, batches_per_epoch=6,
                                           seed=1).train_dataloader()))
    assert ep1 + ep2 == whole


@pytest.mark.parametrize("name", ["vlm_webdataset", "vlm_coco", "vlm_llava", "vlm_skimage"])
def test_hydra_configs_compose_and_skimage_instantiates(name, tmp_path):
    from hydra.utils import instantiate

    from mmllm.config import compose_config

    cfg = compose_config("train", [f"data={name}"], data_dir=tmp_path)
    assert cfg.data._target_ == "mmllm.data.vlm_datamodule.VisionTextDataModule"
    if name == "vlm_skimage":
        dm = instantiate(cfg.data, train={"records": {"names": ["coffee", "coins"]}})
        batch = next(iter(dm.train_dataloader()))
        assert len(batch) == 4 and {r["id"].split("/")[1] for r in batch} <= {"coffee", "coins"}


def test_lightning_resume_mid_epoch_runs_exactly_the_unseen_batches(pairs, tmp_path):
    import lightning as L
    import torch

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.ids: list[str] = []

        def training_step(self, batch, batch_idx):
            self.ids += [r["id"] for r in batch]
            return (self.w - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps, ckpt_path=None):
        module = Recorder()
        dm = VisionTextDataModule(train=RecordsSource(records=pairs, block_size=2), batch_size=2,
                                  batches_per_epoch=4, seed=5)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return trainer, module

    _, full = fit(6)
    trainer, head = fit(3)  # stops mid-epoch (3 of 4 batches)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, tail = fit(6, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert len(full.ids) == 12 and head.ids + tail.ids == full.ids


def test_iter_records_converts_a_source_to_shards(pairs, tmp_path):
    from mmllm.data.vlm_data import iter_records

    stats = ReadStats()
    paths = write_webdataset(iter_records(RecordsSource(records=pairs[:5]), stats), str(tmp_path / "%03d.tar"))
    back = list(iter_records(WebDatasetSource(urls=paths)))
    assert [r["id"] for r in back] == [r["id"] for r in pairs[:5]] and stats.counts["records"] == 5
