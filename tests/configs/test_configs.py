"""Every YAML under conf/ is composed and instantiated; bad keys fail with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

import mmllm.config  # noqa: F401  (registers resolvers)
from mmllm.config import CONF_DIR, compose_config, to_container
from mmllm.train import _instantiate_all, build_strategy

CONF = Path(CONF_DIR)
PRIMARY = {"train", "pipeline", "generate", "export", "curate", "eval", "serve", "synth", "chat", "plan",
           "rlhf_round"}
# Config groups of train.yaml (the others belong to the curate/eval entry configs).
TRAIN_GROUPS = ["model/lm", "model/connector", "data", "module", "module/optimizer", "module/scheduler", "trainer",
                "strategy", "logger", "callbacks", "experiment", "debug", "paths", "hydra"]
REQUIRED = {"generate": ["checkpoint=smollm2"], "export": ["checkpoint=x.ckpt", "output_dir=out"],
            "serve": ["checkpoint=smollm2"]}


def _compose(name: str, overrides: list[str], tmp_path: Path):
    return compose_config(name, overrides + REQUIRED.get(name, []), output_dir=tmp_path / "run")


def check_train_config_instantiates(cfg) -> None:
    """Instantiates every part of a train/pipeline config (models on the meta device)."""
    if not torch.cuda.is_available() and cfg.trainer.accelerator == "gpu":
        # GPU trainer configs are instantiated with the CPU accelerator where no GPU exists.
        cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 1
    with torch.device("meta"):
        model = instantiate(cfg.model.lm)
    assert model.num_params() > 0
    module = instantiate(cfg.module, model=instantiate(cfg.model.lm, _partial_=True))
    assert callable(module.optimizer_factory)
    instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")),
                          logger=_instantiate_all(cfg.get("logger")) or False,
                          strategy=build_strategy(cfg.get("strategy")))
    assert trainer.max_steps == cfg.trainer.max_steps


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


TRAIN_CASES = [(g, o) for g in TRAIN_GROUPS if g not in ("paths", "hydra") for o in _group_options(g)]


# Options with a mandatory value (???) get one here.
REQUIRED = {("experiment", "ppo"): ["policy=smollm2"]}


@pytest.mark.parametrize("group,option", TRAIN_CASES, ids=[f"{g}={o}" for g, o in TRAIN_CASES])
def test_train_group_option_composes_and_instantiates(group, option, tmp_path):
    cfg = _compose("train", [f"{group}={option}", *REQUIRED.get((group, option), [])], tmp_path)
    check_train_config_instantiates(cfg)
    to_container(cfg)  # every interpolation resolves


@pytest.mark.parametrize("name", ["train", "pipeline"])
def test_train_entry_configs(name, tmp_path):
    check_train_config_instantiates(_compose(name, [], tmp_path))


@pytest.mark.parametrize("name", ["generate", "export", "serve", "chat", "plan", "rlhf_round"])
def test_tool_entry_configs_compose(name, tmp_path):
    cfg = _compose(name, [], tmp_path)
    to_container(cfg)
    assert cfg.hydra.output_subdir is None  # tools write no Hydra run directories


CURATE_GROUPS = ["curation/extractor", "curation/executor", "curation/c4", "curation/fuzzy"]
CURATE_CASES = [(g, o) for g in CURATE_GROUPS for o in _group_options(g)]


@pytest.mark.parametrize("group,option", CURATE_CASES, ids=[f"{g}={o}" for g, o in CURATE_CASES])
def test_curate_group_option_builds_every_stage(group, option, tmp_path):
    from mmllm.curation.pipeline import build_components

    cfg = _compose("curate", [f"{group}={option}", "input=x.warc.gz", f"output={tmp_path}"], tmp_path)
    components = build_components(cfg)
    assert components and all(v is not None for v in components.values())


@pytest.mark.parametrize("suite", _group_options("eval/suite"))
def test_eval_suite_instantiates_its_tasks(suite, tmp_path):
    cfg = _compose("eval", [f"eval/suite={suite}", "checkpoint=smollm2"], tmp_path)
    tasks = [instantiate(t) for t in cfg.tasks.values()]
    assert len(tasks) == len(cfg.tasks) > 0 and all(t.name for t in tasks)


def test_every_yaml_is_covered():
    """A new YAML must be reached by one of the tests above."""
    covered = {CONF / f"{p}.yaml" for p in PRIMARY}
    # teacher/*: instantiated by tests/unit/test_teacher.py; tools/*: by tests/unit/test_tools_registry.py
    covered |= {CONF / g / f"{o}.yaml" for g in TRAIN_GROUPS + CURATE_GROUPS + ["eval/suite", "teacher", "tools"]
                for o in _group_options(g)}
    # Task YAMLs are reached through the suites ("all" holds every benchmark).
    in_suites = set()
    for suite in _group_options("eval/suite"):
        in_suites |= set(_compose("eval", [f"eval/suite={suite}", "checkpoint=x"], Path("/tmp")).tasks)
    covered |= {CONF / "eval" / "tasks" / f"{t}.yaml" for t in in_suites}
    others = sorted(str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml") if p not in covered)
    assert others == [], f"YAML files no test composes: {others}"


@pytest.mark.parametrize("override,message", [
    ("trainer.max_stepz=3", "Key 'max_stepz' is not in struct"),
    ("model/lm=llama_8b", "Could not find 'model/lm/llama_8b'"),
])
def test_unknown_keys_fail_clearly(override, message, tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        _compose("train", [override], tmp_path)
    assert message in str(err.value) or message in str(err.value.__cause__)


def test_wrong_model_argument_names_the_target(tmp_path):
    cfg = _compose("train", ["+model.lm.n_layerz=2"], tmp_path)
    with pytest.raises(Exception, match="n_layerz"):
        with torch.device("meta"):
            instantiate(cfg.model.lm)
