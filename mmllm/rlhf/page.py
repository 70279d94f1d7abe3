"""The labelling page: one self-contained HTML document (inline CSS and script, no CDN).

Rendered on the server for the comparison it shows, with every piece of model output passed
through :func:`html.escape` (responses are untrusted: a ``<script>`` in a response is shown as
text, never run). Each answer is a form POST; the server stores it durably and only then
redirects to the next comparison, so the page works without JavaScript too. The script only
adds keyboard shortcuts: 1 = A, 2 = B, 3 = tie, s = skip, u = undo the last answer.
"""

from __future__ import annotations

from html import escape

from mmllm.rlhf.labels import Comparison

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em;color:#222}
header{display:flex;justify-content:space-between;align-items:baseline}
.prompt{background:#f3f3f3;border-radius:6px;padding:.8em;white-space:pre-wrap}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin:1em 0}
.resp{border:1px solid #ccc;border-radius:6px;padding:.8em;white-space:pre-wrap;
 overflow-wrap:anywhere;min-height:6em}
.resp h3{margin:0 0 .5em 0}
.buttons{display:flex;gap:.5em;flex-wrap:wrap}
button{font-size:1em;padding:.5em 1em;border-radius:6px;border:1px solid #888;background:#fff;
 cursor:pointer}
button:hover{background:#eef}
kbd{border:1px solid #aaa;border-radius:3px;padding:0 .3em;font-size:.85em}
.notice{color:#666}
"""

# Keyboard shortcuts submit the same forms as the buttons; a second key press while the first
# POST is in flight is ignored (the server would ignore a repeated answer anyway).
_SCRIPT = """
(function(){
  var keys={"1":"a","2":"b","3":"tie","s":"skip"};
  var sent=false;
  document.addEventListener("keydown",function(e){
    if(sent||e.ctrlKey||e.metaKey||e.altKey||e.repeat)return;
    var k=e.key.toLowerCase(), button=null;
    if(k in keys){button=document.querySelector("#answer button[value='"+keys[k]+"']");}
    else if(k==="u"){button=document.querySelector("#undo button");}
    if(button){sent=true;e.preventDefault();button.form.requestSubmit(button);}
  });
})();
"""


def _shell(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}"
            f"<script>{_SCRIPT}</script></body></html>")


def _header(round: int, answered: int, total: int, labeller: str) -> str:
    return (f"<header><h2>Round {round}: which response is better?</h2>"
            f"<span id='progress' data-answered='{answered}' data-total='{total}'>"
            f"{answered} of {total} answered &middot; labeller {escape(labeller)}</span></header>")


def _undo_form() -> str:
    return ("<form id='undo' method='post' action='undo'>"
            "<button type='submit'>Undo last <kbd>u</kbd></button></form>")


def render_comparison(c: Comparison, *, answered: int, total: int, labeller: str) -> str:
    """The page showing comparison ``c`` (prompt, A and B side by side, the answer buttons)."""
    buttons = "".join(f"<button type='submit' name='label' value='{v}'>{t} <kbd>{k}</kbd></button>"
                      for v, t, k in (("a", "A is better", "1"), ("b", "B is better", "2"),
                                      ("tie", "Tie", "3"), ("skip", "Skip", "s")))
    body = (_header(c.round, answered, total, labeller)
            + f"<div class='prompt' id='prompt'>{escape(c.prompt)}</div>"
            + "<div class='pair'>"
            + f"<div class='resp'><h3>A</h3><div id='response-a'>{escape(c.response_a)}</div></div>"
            + f"<div class='resp'><h3>B</h3><div id='response-b'>{escape(c.response_b)}</div></div>"
            + "</div>"
            + "<form id='answer' method='post' action='label'>"
            + f"<input type='hidden' name='id' value='{escape(c.id)}'>"
            + f"<div class='buttons'>{buttons}</div></form>"
            + _undo_form()
            + "<p class='notice'>Each answer is saved before the next pair appears.</p>")
    return _shell(f"Label round {c.round} ({answered}/{total})", body)


def render_done(*, round: int, answered: int, total: int, labeller: str) -> str:
    """The page shown when every comparison of the round is answered."""
    body = (_header(round, answered, total, labeller)
            + "<p id='done'>All comparisons of this round are answered. Thank you!</p>"
            + _undo_form())
    return _shell(f"Round {round} done", body)
