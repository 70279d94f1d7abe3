"""A Hydra search-path plugin: every research variant's ``components/<variant>/conf`` joins the
search path, so a variant composes with one override (``experiment=dpo``, ``module=glm``) from
``mmllm`` commands, ``compose_config`` and notebooks alike.

Only directories are scanned (nothing from ``components`` is imported: ``mmllm`` never depends on a
variant); a variant without a ``conf/`` directory is skipped. Hydra discovers this module because
it lives in the ``hydra_plugins`` namespace package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def component_conf_dirs() -> list[tuple[str, Path]]:
    """``(variant, conf dir)`` of every installed research variant, sorted by name."""
    spec = importlib.util.find_spec("components")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        for conf in sorted(Path(root).glob("*/conf")):
            if conf.is_dir() and not conf.parent.name.startswith(("_", ".")):
                found.append((conf.parent.name, conf))
    return found


class MMLLMComponentsSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for name, _ in component_conf_dirs():
            search_path.append(provider=f"mmllm-component-{name}", path=f"pkg://components.{name}.conf")
