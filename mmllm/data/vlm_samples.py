"""Real image-text pairs that ship with scikit-image: captions, augmentations, instructions.

scikit-image bundles a few photographs and test images (``skimage.data``) with docstrings that
describe them. :func:`skimage_pairs` turns each image present offline into caption records
(the caption is the docstring's description, cleaned of references, licences and usage notes),
plus deterministic augmentations (a horizontal flip and a centre crop) for more pairs.
:func:`skimage_instructions` gives hand-written LLaVA-style conversations about the same images.
Both follow the record contract of :mod:`mmllm.data.vlm_data`.
"""

from __future__ import annotations

import logging
import re

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Images worth captioning (``skimage.data`` names). Those whose content is text or a logo are
# never mirrored: a flipped page is not "a scanned page" any more.
SKIMAGE_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "coins", "moon",
                  "page", "text", "clock", "hubble_deep_field", "immunohistochemistry", "logo",
                  "retina", "colorwheel", "cell", "microaneurysms", "grass", "gravel", "brick")
NO_FLIP = frozenset({"page", "text", "logo"})

# Sentences of a docstring that are about the file, not the picture.
_NOT_CONTENT = re.compile(r"download|copyright|licen[cs]|courtesy|public domain|useful|used for|"
                          r"can be used|may be used|illustrat|demonstrat|good test|versionchanged|"
                          r"photographer|returns|rescaled|cropped|converted|released|retrieved|an example",
                          re.IGNORECASE)
_SECTION = re.compile(r"^(Returns|Notes|References|Parameters|Examples)\s*$")


def docstring_caption(doc: str, *, max_sentences: int = 2) -> str:
    """A caption from a ``skimage.data`` docstring: its summary line and the descriptive sentences
    of the next paragraph, without markup, links, licences and usage notes.

    Args:
        doc: the docstring.
        max_sentences: most sentences kept (the summary counts as one).

    Returns:
        The caption ("" if the docstring describes nothing).
    """
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", doc.strip()):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if not lines or _SECTION.match(lines[0]):
            break  # numpydoc sections: the description is over
        paragraphs.append(" ".join(lines))
    text = " ".join(paragraphs[:2])
    text = re.sub(r"`+([^`<]*?)\s*<[^>]*>`*_*", r"\1", text)  # `label <url>`__ -> label
    text = re.sub(r"https?://\S+|``|`", "", text)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    keep = [s for s in sentences if not _NOT_CONTENT.search(s)][:max_sentences]
    caption = " ".join(keep).replace('"', "")
    caption = re.sub(r"\s+", " ", caption).strip()
    if caption and caption[-1] not in ".!?":
        caption += "."
    return caption


def to_rgb(array: np.ndarray) -> Image.Image:
    """An RGB PIL image from a bool / gray / float / RGB(A) array (alpha composited on white)."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo or 1.0) * 255).round().astype(np.uint8)
    image = Image.fromarray(a)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def center_crop(image: Image.Image, fraction: float = 0.75) -> Image.Image:
    """The centred crop keeping ``fraction`` of each side."""
    w, h = image.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def _load(name: str) -> tuple[Image.Image, str] | None:
    """(image, docstring) of ``skimage.data.<name>``, or None when it is not available offline
    (some images are fetched by pooch on first use)."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None:
        return None
    try:
        array = loader()
    except Exception as e:  # noqa: BLE001 - not bundled (needs a download) or a broken install
        log.info("skimage.data.%s is not available offline (%s); skipped", name, type(e).__name__)
        return None
    return to_rgb(array), loader.__doc__ or ""


def skimage_pairs(*, names: tuple[str, ...] = SKIMAGE_IMAGES, augment: bool = True,
                  crop_fraction: float = 0.75) -> list[dict]:
    """Caption records of scikit-image's bundled images (deterministic, offline).

    Args:
        names: ``skimage.data`` images to use (those missing offline are skipped).
        augment: also a horizontally flipped copy (except text images) and a centre crop of
            each, with the same caption.
        crop_fraction: side fraction kept by the crop.

    Returns:
        Records ``{"images": [PIL RGB image], "caption": str, "id": "skimage/<name>[/flip|/crop]"}``.
    """
    records = []
    for name in names:
        loaded = _load(name)
        if loaded is None:
            continue
        image, doc = loaded
        caption = docstring_caption(doc)
        if not caption:
            continue
        records.append({"images": [image], "caption": caption, "id": f"skimage/{name}"})
        if augment:
            if name not in NO_FLIP:
                records.append({"images": [ImageOps.mirror(image)], "caption": caption,
                                "id": f"skimage/{name}/flip"})
            records.append({"images": [center_crop(image, crop_fraction)], "caption": caption,
                            "id": f"skimage/{name}/crop"})
    return records


# Hand-written conversations (LLaVA's three kinds: conversation, detailed description, complex
# reasoning), checked against the images themselves.
_INSTRUCTIONS: dict[str, list[tuple[str, str]]] = {
    "astronaut": [
        ("What is the person in the image wearing?",
         ("She is wearing an orange spacesuit with mission patches on the chest. Her helmet, "
          "which has a dark visor, is beside her.")),
        ("What is in the background?",
         ("An American flag on the left and a model of the space shuttle on its launch rocket "
          "on the right.")),
    ],
    "coffee": [
        ("Describe the image in detail.",
         ("A small cup of espresso with a golden crema sits on a red saucer, with a spoon resting "
          "on the saucer beside the cup. The cup is red outside and white inside, and everything "
          "stands on a wooden table seen from above at an angle.")),
    ],
    "chelsea": [
        ("What animal is this, and what color are its eyes?",
         "It is a tabby cat, shown in a close-up of its face. Its eyes are green-yellow."),
        ("Does the animal look relaxed or alarmed? Why?",
         ("It looks calm and attentive: it is looking straight ahead with its ears up, and "
          "nothing in the picture suggests it is startled.")),
    ],
    "rocket": [
        ("What is happening in this image?",
         ("A rocket stands on its launch pad at dusk, lit by floodlights and flanked by tall "
          "lightning towers. It is a SpaceX Falcon 9 before the launch of the DSCOVR satellite.")),
        ("Why would the pad be surrounded by tall towers?",
         ("They are lightning protection towers: they are taller than the rocket so that a "
          "lightning strike hits them instead of the vehicle and its fuel.")),
    ],
    "coins": [
        ("How many coins are in the image, and how are they arranged?",
         "There are 24 coins laid out in a grid of four rows of six on a dark background."),
    ],
    "camera": [
        ("What is the man doing?",
         ("He is looking through a camera mounted on a tripod, standing on a lawn. The photograph "
          "is in black and white, with buildings in the distance.")),
    ],
    "horse": [
        ("Describe the image.",
         ("A black silhouette of a standing horse, seen from the side and facing right, on a "
          "plain white background.")),
    ],
    "clock": [
        ("Why is it hard to read the time in this picture?",
         ("The clock is motion blurred: the camera moved horizontally while the picture was taken, "
          "so the hands and numbers are smeared.")),
    ],
    "hubble_deep_field": [
        ("What are the small colored spots in this image?",
         ("Almost all of them are distant galaxies. This is the Hubble eXtreme Deep Field, the "
          "Hubble telescope's farthest view of the universe.")),
    ],
    "retina": [
        ("What does this image show?",
         ("A photograph of the back of a human eye, the retina: red-orange tissue with blood "
          "vessels branching out from the bright optic disc on the left.")),
    ],
}


def skimage_instructions() -> list[dict]:
    """Hand-written LLaVA-style conversations about scikit-image's bundled images.

    Returns:
        Records ``{"images": [image], "messages": [...], "id": "skimage-instruct/<name>"}``; the
        first user turn starts with the ``<image>`` placeholder (images missing offline skipped).
    """
    records = []
    for name, turns in _INSTRUCTIONS.items():
        loaded = _load(name)
        if loaded is None:
            continue
        messages = []
        for i, (question, answer) in enumerate(turns):
            content = f"<image>\n{question}" if i == 0 else question
            messages += [{"role": "user", "content": content},
                         {"role": "assistant", "content": answer}]
        records.append({"images": [loaded[0]], "messages": messages,
                        "id": f"skimage-instruct/{name}"})
    return records
