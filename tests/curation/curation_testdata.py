"""Curation test data: hand-written pages with one planted defect each.

Every English text below was written for these tests. The WARC mixes good pages (with navigation,
cookie banner and share buttons around the article) and pages planted to be dropped for one
known reason, so the funnel can be checked document by document.
"""

from __future__ import annotations

import random

from html import escape

from mmllm.curation.sample_data import NON_ENGLISH, SHARED_PASSAGE

TEXTS = {
    "bread": (
        "Baking bread at home is mostly a matter of patience. The dough needs time to rise, and "
        "the yeast needs a warm place where it can turn sugar into gas. Most recipes ask for "
        "flour, water, salt and yeast, and nothing else. A wet dough gives an open crumb with "
        "large holes, while a stiff dough gives a tight crumb that is easy to slice. Bakers "
        "often fold the dough several times during the first rise instead of kneading it, "
        "because folding builds strength without tearing the gluten. The loaf is ready for the "
        "oven when a gentle press with a finger leaves a mark that springs back slowly. A hot "
        "oven and a little steam in the first minutes give the crust its colour and shine."),
    "bicycle": (
        "A bicycle that is looked after will last for decades. The chain is the part that needs "
        "the most care: it should be cleaned and oiled every few weeks, and replaced when it has "
        "stretched, because a worn chain quickly wears out the gears as well. Tyre pressure is "
        "the second thing to check, since soft tyres make riding slow and tiring and are more "
        "likely to get a puncture. Brakes should stop the wheel firmly without the lever touching "
        "the handlebar. Cables that feel rough can be replaced in an afternoon with a few simple "
        "tools. Many towns have workshops where volunteers show riders how to do these repairs "
        "themselves, which saves money and makes every ride more pleasant."),
    "tidepool": (
        "Tide pools are small worlds that appear twice a day when the sea goes out. In the rocks "
        "near the shore, water is trapped in hollows, and the animals living there have to cope "
        "with heat, fresh rain and hungry birds until the tide comes back. Sea anemones close "
        "into soft balls to keep from drying out. Crabs hide under weed and stones, and small "
        "fish wait in the deepest corners. Visitors are asked to look without taking anything "
        "home, and to put every stone back the way they found it, because the underside of a "
        "rock is a home for many creatures. The best time to visit is an hour before low tide, "
        "when there is time to explore before the water returns."),
    "library": (
        "The town library opened more than a century ago in two rooms above the post office. At "
        "first it lent only a few hundred books, most of them given by families who had moved "
        "away. Over the years it grew into a building of its own, with a reading room, a corner "
        "for children and a small collection of old maps that is still used by people who study "
        "the history of the region. Today the library also lends tools, seeds and musical "
        "instruments, and its staff run classes for people who want to learn to use computers. "
        "On rainy afternoons the reading room is full, and the librarians say that the questions "
        "they are asked have changed much less than the way people look for answers."),
    "coffee": (
        "Roasting coffee changes green seeds into the brown beans that are ground and brewed. "
        "During roasting the beans lose water, turn yellow and then brown, and finally crack with "
        "a sound like popcorn. A light roast keeps more of the flavour that comes from the farm "
        "and the variety of the plant, while a dark roast tastes more of the roasting itself. "
        "Small roasters often buy directly from farmers and print the name of the farm on every "
        "bag. Freshly roasted beans need a few days to rest before they are at their best, and "
        "they should be kept in a closed bag away from light and heat. Grinding just before "
        "brewing makes a larger difference than most people expect."),
    "birds": (
        "Watching birds needs little more than time and a pair of binoculars. Early morning is "
        "the best moment, because many birds are busy looking for food and singing to mark their "
        "territory. Beginners often learn a few common songs first and then notice how many "
        "different voices they had never heard before. A notebook helps to remember where and "
        "when each bird was seen, and over the years these notes show how the seasons change. "
        "Many local groups count birds on the same day every winter and send the results to "
        "scientists, who use them to follow the health of the populations. Feeding birds in the "
        "garden is a good start, as long as the feeders are kept clean."),
    "volcano": (
        "A volcano forms where molten rock from deep inside the earth finds a way to the "
        "surface. Some volcanoes erupt quietly, with rivers of lava that move slowly enough for "
        "people to walk away from them. Others explode with great force because the rock is "
        "thick and full of gas, and they throw ash high into the sky. Scientists watch active "
        "volcanoes with instruments that measure small earthquakes, changes in the shape of the "
        "ground and the gases coming out of the vents. These signs often change in the weeks "
        "before an eruption, which gives time to warn the people living nearby. The soil around "
        "old volcanoes is rich, and farmers have lived on their slopes for thousands of years."),
}
CONTEXT_PASSAGE = SHARED_PASSAGE
REPEATED = "Buy cheap watches today, best price online, limited offer for everyone!"
SOCIAL = ["Share", "Tweet", "3 comments", "Sign in", "128 likes", "Follow us", "Subscribe",
          "Pin it", "Email", "45 shares", "Login", "Reply"]


def page(title: str, paragraphs: list[str], *, lang: str = "en", extra: list[str] = ()) -> str:
    """A web page with navigation, cookie banner, share buttons and footer around the article."""
    body = "\n".join(f"<p>{escape(p)}</p>" for p in [*paragraphs, *extra])
    return f"""<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8">
<title>{escape(title)}</title></head><body>
<header><nav><a href="/">Home</a> | <a href="/blog">Blog</a> | <a href="/login">Sign in</a></nav></header>
<div class="cookie">We use cookies to improve your experience. <button>Accept</button></div>
<main><article><h1>{escape(title)}</h1>
{body}
</article><div class="share"><a>Share</a> <a>Tweet</a> <span>12 likes</span></div></main>
<footer>&copy; 2024 Example Media. All rights reserved. <a href="/privacy">Privacy policy</a></footer>
</body></html>"""


def authored_pages() -> list[dict]:
    """The authored pages, in WARC order; ``expect`` names the stage/reason that drops them."""
    t = TEXTS
    near = t["bread"].replace("mostly a matter of", "largely a question of").replace(
        "a little steam", "some steam")
    pages = [
        {"url": "https://www.homebaking.example/bread", "body": page("Bread", [t["bread"]]),
         "expect": None},
        {"url": "https://cycling.example/care", "body": page("Care", [t["bicycle"]]),
         "expect": None},
        {"url": "https://coast.example/tide-pools", "body": page("Pools", [t["tidepool"]]),
         "expect": None},
        {"url": "https://town.example/library", "body": page("Library", [t["library"]]),
         "expect": None},
        {"url": "https://roasters.example/coffee",
         "body": page("Coffee", [t["coffee"], CONTEXT_PASSAGE]), "expect": None},
        {"url": "https://birders.example/start",
         "body": page("Birds", [t["birds"], CONTEXT_PASSAGE]), "expect": "substring_edit"},
        {"url": "https://mirror.example/bread-copy", "body": page("Bread", [near]),
         "expect": ("minhash_dedup", "near_duplicate")},
        {"url": "https://syndicate.example/bike", "body": page("Care", [t["bicycle"]]),
         "expect": ("exact_dedup", "exact_duplicate")},
        {"url": "https://www.homebaking.example/bread/", "body": page("Bread", [t["bread"]]),
         "expect": ("url_dedup", "duplicate_url")},
        {"url": "https://free-casino-bonus.example/casino-slots/win",
         "body": page("Win", [t["volcano"]]), "expect": ("url_filter", "url_score")},
        {"url": "https://videos.blocked-site.example/watch", "body": page("Watch", [t["volcano"]]),
         "expect": ("url_filter", "blocklisted_domain")},
        {"url": "https://en.wikipedia.org/wiki/Volcano", "body": page("Volcano", [t["volcano"]]),
         "expect": ("url_filter", "curated_source")},
        {"url": "https://reise.example/de", "body": page("Stadt", [NON_ENGLISH["de"]], lang="de"),
         "expect": ("langid", "language_not_kept")},
        {"url": "https://voyage.example/fr", "body": page("Ville", [NON_ENGLISH["fr"]], lang="fr"),
         "expect": ("langid", "language_not_kept")},
        {"url": "https://shop.example/offers", "body": page("Offers", [REPEATED] * 12),
         "expect": ("gopher_repetition", "repeated_lines")},
        {"url": "https://short.example/note",
         "body": page("Note", [("The meeting is moved to Tuesday at ten in the small room, "
                                "and the agenda stays the same as last week for all of us.")]),
         "expect": ("gopher_quality", "word_count")},
        {"url": "https://social.example/post",
         "body": page("Volcanoes", [t["volcano"]], extra=SOCIAL),
         "expect": ("refinedweb_lines", "too_many_lines_removed")},
        {"url": "https://cdn.example/logo.png", "body": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
         "content_type": "image/png", "expect": ("read", "non_html")},
        {"url": "https://cdn.example/garbled", "content_type": "text/html",
         "body": bytes((i * 37 + 11) % 256 for i in range(3000)),
         "expect": ("read", "undecodable")},
        {"url": "https://cdn.example/empty", "body": b"  \n ", "expect": ("read", "empty")},
        {"url": "https://cdn.example/giant", "body": page("Giant", ["word " * 60000]),
         "expect": ("read", "too_large")},
        {"url": "https://cdn.example/missing", "body": "<html>gone</html>", "status": 404,
         "expect": ("read", "http_status")},
        {"url": "https://cdn.example/broken", "body": page("Broken", [t["birds"]]),
         "expect": ("read", "corrupt_record")},
        {"url": "https://cdn.example/cut", "body": page("Cut", [t["coffee"]]), "truncated": True,
         "expect": ("read", "truncated")},
        {"url": "https://last.example/volcano", "body": page("Volcanoes", [t["volcano"]]),
         "expect": None},
    ]
    return pages


CORRUPT_INDEX = 22  # "broken": in the middle, so the records after it must still be read
MAX_PAYLOAD = 200_000  # the giant page is ~300 kB


def near_duplicate(text: str, rng: random.Random, edit_rate: float) -> str:
    """Delete or replace about ``edit_rate`` of the words and add a boilerplate line."""
    words = []
    for w in text.split():
        r = rng.random()
        if r < edit_rate / 2:
            continue
        words.append("edited" if r < edit_rate else w)
    return " ".join(words) + "\nShare this article with your friends"
