"""``mmllm curate input=<path|glob|list> output=<dir> [overrides]`` (config: ``conf/curate.yaml``).

Examples::

    mmllm curate input='crawl/*.warc.gz' output=out/web
    mmllm curate input=demo.warc.gz output=out/demo curation/executor=local dedup.substring=null
    mmllm curate input=[a.jsonl,b.parquet] output=out/mix output_format=parquet \
        stages.langid.languages=null curation/c4=enabled
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from mmllm.config import CONF_DIR
from mmllm.curation.pipeline import run_from_config



@hydra.main(config_path=CONF_DIR, config_name="curate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run a curation and print where the shards and the report are."""
    result = run_from_config(cfg)
    funnel = result.report["funnel"]
    start = funnel[0]["docs_in"] if funnel else 0
    print(f"{'reused' if result.reused else 'curated'}: {start} input documents -> "
          f"{result.num_documents} kept in {len(result.shards)} shard(s) under "
          f"{result.output_dir}/data; report: {result.report_paths.get('md')}")


if __name__ == "__main__":
    main()
