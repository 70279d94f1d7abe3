"""``mmllm synth mode=self_instruct|evol_instruct teacher=openai|local ...`` (mmllm/conf/synth.yaml).

Examples::

    mmllm synth mode=self_instruct teacher=openai teacher.model=gpt-4o-mini self_instruct.num_instructions=500
    mmllm synth mode=evol_instruct teacher=local teacher.checkpoint=smollm2 evol_instruct.rounds=2
    mmllm synth teacher=openai teacher.base_url=http://127.0.0.1:8000/v1 teacher.model=smollm2
"""

from __future__ import annotations

import json
import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmllm.config import CONF_DIR

log = logging.getLogger(__name__)
MODES = ("self_instruct", "evol_instruct")


def run(cfg: DictConfig):
    """Builds the generator of ``cfg.mode`` and the teacher, generates, writes ``cfg.output_dir``."""
    if cfg.mode not in MODES:
        from mmllm.errors import ConfigError

        raise ConfigError(f"mode={cfg.mode!r}: not a synth mode",
                          fix=f"mmllm synth mode={MODES[0]} (or mode={MODES[1]})")
    generator = instantiate(cfg[cfg.mode])
    with instantiate(cfg.teacher) as teacher:
        result = generator.run(teacher, cfg.output_dir)
    s = result.stats
    dropped = s.get("dropped", s.get("eliminated", {}))
    print(f"synth {cfg.mode}: kept {s['kept']} of {s['generated']} generated (yield {s['yield']:.1%}), "
          f"{s['rows']} SFT rows -> {result.paths['sft']}")
    print(f"dropped: {json.dumps(dropped)}\nstats: {result.paths['stats']}")
    return result


@hydra.main(config_path=CONF_DIR, config_name="synth", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
