"""A progress bar over a decode session's loop: the share of the rows' token budget that is spent.

    rows = session.add_rows(prompts, max_new_tokens=64)
    decode(session, rows, progress="captions")        # steps until the rows end, with a bar

The bar's total is the token budget of the rows (``max_new_tokens`` each, or the room left in
the cache when a row has no cap). Each step adds the tokens sampled; a row that ends early (eos,
stop string, ``finish``) adds its unused budget at once. So the bar moves steadily while the rows
run and reaches 100 % when the last one ends, whatever the mix of long and short answers. The
postfix counts the rows done. A disabled bar costs nothing per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Self

from tqdm.auto import tqdm

from mmllm.generation.session import DecodeSession

Progress = bool | str | None  # False/None: no bar; True: a bar named "generating"; a str: its name


class DecodeProgress:
    """A tqdm bar over the token budget of some rows of a session.

    Args:
        session: the decode session.
        rows: the row ids followed (the rows added for this batch).
        progress: False/None for no bar, True for a bar named ``desc``, a string to name it.
        desc: the bar's name when ``progress`` is True.
    """

    def __init__(self, session: DecodeSession, rows: Sequence[int], progress: Progress = False, *,
                 desc: str = "generating") -> None:
        self.session, self.enabled = session, bool(progress)
        self._budget: dict[int, int] = {}
        self._start: dict[int, int] = {}
        for r in rows:
            row = session.rows[r]
            cap = row.max_new_tokens if row.max_new_tokens is not None else session.max_len - row.length
            self._budget[r], self._start[r] = max(0, int(cap)), row.n_sampled
        self.bar = None
        if self.enabled:
            self.bar = tqdm(total=sum(self._budget.values()), desc=progress if isinstance(progress, str) else desc,
                            unit="tok", leave=False, dynamic_ncols=True)

    @property
    def spent(self) -> int:
        """Tokens of the budget spent: sampled so far, plus the whole budget of every ended row."""
        total = 0
        for r, budget in self._budget.items():
            row = self.session.rows.get(r)
            if row is None or row.finished:
                total += budget
            else:
                total += min(budget, row.n_sampled - self._start[r])
        return total

    @property
    def total(self) -> int:
        return sum(self._budget.values())

    def update(self) -> None:
        """Moves the bar to the rows' current state (call after each step)."""
        if self.bar is None:
            return
        done = sum(1 for r in self._budget if r not in self.session.rows or self.session.rows[r].finished)
        self.bar.set_postfix_str(f"rows done {done}/{len(self._budget)}", refresh=False)
        self.bar.update(self.spent - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.update()
            self.bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode(session: DecodeSession, rows: Sequence[int], *, progress: Progress = False,
           desc: str = "generating", on_step: Callable[[dict[int, int]], None] | None = None) -> None:
    """Steps ``session`` until no row runs, with a :class:`DecodeProgress` bar over ``rows``.

    Args:
        on_step: called with each step's ``{row id: new token}`` (e.g. to finish rows early).
    """
    with DecodeProgress(session, rows, progress, desc=desc) as bar:
        while new := session.step():
            if on_step is not None:
                on_step(new)
            bar.update()
