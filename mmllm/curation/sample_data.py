"""A small, realistic demo crawl: real Wikipedia articles rendered as web pages, plus planted junk.

The 206 English Wikipedia pages that ship inside gensim's wheel are parsed with gensim's
``extract_pages`` + ``filter_wiki`` and rendered as HTML with typical boilerplate (navigation,
cookie banner, share buttons, footer). Planted on top: spam URLs, a blocklisted domain, a curated
source (wikipedia.org), non-English pages, near- and exact duplicates, a re-crawled URL, pages
sharing a long passage, a repetitive page, non-HTML / empty / giant / undecodable / 404 /
truncated responses and one corrupt gzip member. :func:`build_demo_warc` writes it with warcio.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Any

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

DEMO_BLOCKED_DOMAIN = "adult-videos-demo.example"
SITES = ("www.historyhub-demo.com", "news.sciencepress-demo.org", "blog.readerscorner-demo.net",
         "www.encyclo-demo.info", "learn.openfacts-demo.com")
SPAM_URLS = ("https://free-casino-bonus-demo.com/casino-slots-jackpot/{slug}",
             "https://cheap-viagra-pills-demo.net/buy-viagra-casino/{slug}",
             "https://xxx-porn-demo.biz/free-xxx-sex-cams/{slug}")
SHARED_PASSAGE = (
    "The editors of this collection would like to remind readers that every article is reviewed "
    "by at least two independent volunteers before publication, that corrections are welcome at "
    "any time through the contact form, and that the views expressed by individual contributors do "
    "not necessarily reflect those of the foundation, its partners or the institutions that kindly "
    "support the archive with grants, books and the time of their staff members."
)
NON_ENGLISH = {
    "de": ("Die Geschichte der Stadt reicht bis in die Römerzeit zurück. Im Mittelalter entwickelte "
           "sie sich zu einem wichtigen Handelszentrum, in dem Kaufleute aus ganz Europa ihre Waren "
           "anboten. Die gotische Kirche im Zentrum wurde im vierzehnten Jahrhundert errichtet und "
           "gilt heute als eines der schönsten Bauwerke der Region. Nach dem Krieg wurde die "
           "Altstadt sorgfältig wieder aufgebaut, und heute besuchen jedes Jahr viele Touristen die "
           "engen Gassen, die Museen und die zahlreichen Cafés am Marktplatz. Die Universität, die "
           "im neunzehnten Jahrhundert gegründet wurde, zieht Studierende aus aller Welt an."),
    "fr": ("La ville est située au bord d'un fleuve qui a longtemps servi de route commerciale. Au "
           "Moyen Âge, les marchands y vendaient du sel, du vin et des tissus venus de toute "
           "l'Europe. La cathédrale, construite au treizième siècle, domine encore aujourd'hui le "
           "centre historique. Après la révolution industrielle, de nombreuses usines se sont "
           "installées dans les faubourgs, ce qui a profondément transformé la vie des habitants. "
           "Aujourd'hui, la ville est connue pour son université, ses musées et ses marchés, qui "
           "attirent chaque année des milliers de visiteurs venus du monde entier."),
    "es": ("El río atraviesa la ciudad de norte a sur y divide el casco antiguo de los barrios "
           "modernos. Durante siglos, el puerto fue uno de los más importantes del país, y por él "
           "pasaban barcos cargados de especias, lana y metales preciosos. La catedral, cuya "
           "construcción duró más de doscientos años, combina elementos góticos y renacentistas. "
           "Hoy en día, la ciudad es famosa por su gastronomía, sus fiestas populares y su "
           "universidad, una de las más antiguas de Europa, que recibe estudiantes de todo el mundo."),
    "ru": ("Город был основан на берегу большой реки более восьмисот лет назад. В средние века он "
           "стал важным торговым центром, куда купцы привозили мёд, меха, соль и ткани. Каменный "
           "собор в центре города был построен в шестнадцатом веке и до сих пор считается главной "
           "достопримечательностью региона. В девятнадцатом веке здесь открылись первые фабрики и "
           "железная дорога, а население быстро выросло. Сегодня в городе работают университет, "
           "несколько театров и музеев, которые каждый год посещают тысячи туристов."),
}
_SHARED_PASSAGE_ARTICLES = (50, 51, 52)
_STOP_SECTIONS = re.compile(r"^=+\s*(see also|references|external links|further reading|notes|"
                            r"bibliography|sources)\s*=+\s*$", re.IGNORECASE)


def write_warc(path: str | Path, pages: Sequence[dict[str, Any]], *,
               corrupt: Sequence[int] = ()) -> Path:
    """Write pages as gzipped WARC response records (one gzip member each) with warcio.

    Args:
        path: Output ``.warc.gz`` path.
        pages: Dicts with ``url``, ``body`` (str or bytes) and optional ``content_type``
            (default ``text/html; charset=utf-8``), ``status`` (200) and ``truncated`` (False).
        corrupt: Indexes of pages whose gzip member is overwritten with garbage afterwards.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf, spans = io.BytesIO(), []
    writer = WARCWriter(buf, gzip=True)
    writer.write_record(writer.create_warcinfo_record(path.name, {"software": "mmllm demo"}))
    for page in pages:
        body = page["body"].encode("utf-8") if isinstance(page["body"], str) else page["body"]
        status = int(page.get("status", 200))
        http = StatusAndHeaders(f"{status} {'OK' if status == 200 else 'Not Found'}",
                                [("Content-Type", page.get("content_type",
                                                           "text/html; charset=utf-8")),
                                 ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
        warc_headers = {"WARC-Truncated": "length"} if page.get("truncated") else None
        rec = writer.create_warc_record(page["url"], "response", payload=io.BytesIO(body),
                                        http_headers=http, warc_headers_dict=warc_headers)
        start = buf.tell()
        writer.write_record(rec)
        spans.append((start, buf.tell()))
    data = bytearray(buf.getvalue())
    for i in corrupt:
        start, end = spans[i]
        mid = start + 12  # past the gzip header: garble the deflate stream itself
        data[mid:end - 8] = bytes((b * 7 + 13) % 256 for b in data[mid:end - 8])
    path.write_bytes(bytes(data))
    return path


def wikipedia_articles(*, min_words: int = 150, max_words: int = 900) -> list[tuple[str, list]]:
    """The gensim-shipped Wikipedia articles as ``(title, blocks)`` with ``blocks`` of
    ``("h2" | "p" | "li", text)``, skipping redirects, stubs and reference sections.

    Args:
        min_words: Articles with fewer prose words are skipped.
        max_words: Articles are cut after this many words.

    Returns:
        A list of articles in file order.
    """
    return list(_articles(min_words, max_words))


@lru_cache(maxsize=2)
def _articles(min_words: int, max_words: int) -> tuple:
    # Parsing the dump takes seconds; demos and tests ask for it repeatedly.
    from mmllm.data.corpora import wikipedia_pages

    articles = []
    for _, title, text in wikipedia_pages():
        blocks = _wiki_blocks(text, max_words)
        if sum(len(t.split()) for k, t in blocks if k == "p") >= min_words:
            articles.append((title, tuple(blocks)))
    return tuple(articles)


def _wiki_blocks(text: str, max_words: int) -> list[tuple[str, str]]:
    blocks, words = [], 0
    for raw in text.replace("'''", "").replace("''", "").split("\n"):
        line = raw.strip()
        if _STOP_SECTIONS.match(line) or words >= max_words:
            break
        if re.fullmatch(r"=+[^=]+=+", line):
            blocks.append(("h2", line.strip("= ")))
        elif line.startswith("*") and len(line.split()) >= 3:
            blocks.append(("li", line.lstrip("* ")))
        elif len(line.split()) >= 8:
            blocks.append(("p", line))
            words += len(line.split())
    while blocks and blocks[-1][0] == "h2":
        blocks.pop()
    return blocks


def render_page(title: str, blocks: Sequence[tuple[str, str]], site: str, *,
                lang: str = "en") -> str:
    """Render an article as a web page with navigation, cookie banner, share buttons and footer."""
    body = []
    for kind, text in blocks:
        tag = {"h2": "h2", "li": "li", "p": "p"}[kind]
        body.append(f"<{tag}>{escape(text)}</{tag}>")
    return f"""<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8"><title>{escape(title)} | {site}</title></head>
<body>
<header><nav><a href="/">Home</a> | <a href="/topics">Topics</a> | <a href="/about">About us</a>
 | <a href="/login">Sign in</a> | <a href="/cart">0 items in cart</a></nav></header>
<div class="cookie-banner"><p>This website uses cookies to improve your experience.
 <button>Accept all</button> <button>Manage settings</button></p></div>
<main><article><h1>{escape(title)}</h1>
{chr(10).join(body)}
<p>12 likes</p>
<p>Share this article</p>
</article>
<div class="share"><a href="#">Share</a> <a href="#">Tweet</a> <span>12 likes</span>
 <span>3 comments</span></div></main>
<aside><h3>Popular</h3><ul><li><a href="/a">Top 10 facts</a></li><li><a href="/b">Quiz</a></li></ul></aside>
<footer><p>&copy; 2024 {site}. All rights reserved.</p>
<a href="/privacy">Privacy policy</a> | <a href="/terms">Terms of use</a></footer>
</body></html>"""


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _perturb(blocks: list[tuple[str, str]], rng: random.Random, rate: float) -> list:
    """A near-duplicate: drop about ``rate`` of the words of each paragraph."""
    out = []
    for kind, text in blocks:
        words = text.split()
        if kind == "p":
            words = [w for w in words if rng.random() >= rate] or words
        out.append((kind, " ".join(words)))
    return out


def demo_pages(*, seed: int = 0) -> list[dict[str, Any]]:
    """All demo pages (dicts for :func:`write_warc`); see the module docstring for the mix."""
    rng = random.Random(seed)
    arts = wikipedia_articles()
    # Articles 50-52 appear only in the shared-passage pages (else they would be near-duplicates).
    pages = [{"url": f"https://{SITES[i % len(SITES)]}/articles/{_slug(t)}",
              "body": render_page(t, b, SITES[i % len(SITES)])} for i, (t, b) in enumerate(arts)
             if i not in _SHARED_PASSAGE_ARTICLES]
    pages += _planted_pages(arts, rng)
    return pages


def _planted_pages(arts: list, rng: random.Random) -> list[dict[str, Any]]:
    site = "www.mirror-demo.org"
    planted = [{"url": u.format(slug=_slug(arts[i][0])), "body": render_page(*arts[i], "spam")}
               for i, u in enumerate(SPAM_URLS)]
    planted += [{"url": f"https://{DEMO_BLOCKED_DOMAIN}/video/{k}",
                 "body": render_page(*arts[10 + k], DEMO_BLOCKED_DOMAIN)} for k in range(2)]
    planted.append({"url": "https://en.wikipedia.org/wiki/" + _slug(arts[20][0]),
                    "body": render_page(*arts[20], "en.wikipedia.org")})
    planted += [{"url": f"https://www.weltreise-demo.de/{lang}/stadt",
                 "body": render_page("Stadt", [("p", s) for s in text.split(". ")], "welt",
                                     lang=lang)} for lang, text in NON_ENGLISH.items()]
    for k in range(6):  # near duplicates: the same article re-published with small edits
        t, b = arts[30 + k]
        planted.append({"url": f"https://{site}/copy/{_slug(t)}",
                        "body": render_page(t, _perturb(b, rng, 0.01), site)})
    for k in range(2):  # exact duplicates of an article on another site
        t, b = arts[40 + k]
        planted.append({"url": f"https://syndicated-demo.net/{_slug(t)}", "body": render_page(t, b, site)})
    planted.append({"url": f"https://{SITES[0]}/articles/{_slug(arts[0][0])}",  # re-crawled URL
                    "body": render_page(*arts[0], SITES[0])})
    for k in _SHARED_PASSAGE_ARTICLES:  # pages sharing one long passage
        t, b = arts[k]
        planted.append({"url": f"https://{SITES[1]}/essays/{_slug(t)}-{k}",
                        "body": render_page(t, [*b[:3], ("p", SHARED_PASSAGE), *b[3:]], SITES[1])})
    spam_line = "Best deals on cheap watches, click the link below to order now!"
    planted.append({"url": "https://deals-demo.shop/offers",
                    "body": render_page("Deals", [("p", spam_line)] * 40, "deals-demo.shop")})
    return planted + _bad_responses(arts)


def _bad_responses(arts: list) -> list[dict[str, Any]]:
    base = "https://www.assets-demo.com"
    giant = render_page("Giant", [("p", "word " * 200)] * 2600, "assets")
    return [
        {"url": f"{base}/logo.png", "body": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8,
         "content_type": "image/png"},
        {"url": f"{base}/report.pdf", "body": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"0" * 900,
         "content_type": "application/pdf"},
        {"url": f"{base}/empty", "body": b"   \n"},
        {"url": f"{base}/giant", "body": giant},
        {"url": f"{base}/garbled", "body": bytes((i * 37 + 11) % 256 for i in range(4000)),
         "content_type": "text/html"},
        {"url": f"{base}/missing", "body": "<html><body>Not found</body></html>", "status": 404},
        {"url": f"{base}/cut", "body": render_page(*arts[60], "assets"), "truncated": True},
        {"url": f"{base}/corrupt", "body": render_page(*arts[61], "assets")},
    ]


def build_demo_warc(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the demo crawl ``demo.warc.gz`` and its blocklist (UT1 layout) into ``out_dir``.

    Args:
        out_dir: Directory to write into (created).
        seed: Seed of the near-duplicate edits.

    Returns:
        Path of the WARC file. The blocklist is at ``out_dir/demo_blocklist`` (pass it with
        :func:`demo_overrides`).
    """
    out_dir = Path(out_dir)
    pages = demo_pages(seed=seed)
    block = out_dir / "demo_blocklist" / "adult"
    block.mkdir(parents=True, exist_ok=True)
    (block / "domains").write_text(f"# UT1-style list\n{DEMO_BLOCKED_DOMAIN}\nanother-bad-demo.example\n")
    return write_warc(out_dir / "demo.warc.gz", pages, corrupt=[len(pages) - 1])


def demo_overrides(out_dir: str | Path) -> list[str]:
    """Hydra overrides that point the URL filter at the demo blocklist written by
    :func:`build_demo_warc` (pass to ``run_curation(..., overrides=...)`` or the CLI)."""
    return [f"stages.url_filter.blocklist_paths=[{Path(out_dir).resolve() / 'demo_blocklist'}]"]
