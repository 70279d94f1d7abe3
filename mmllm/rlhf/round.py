"""``mmllm rlhf-round``: one round of online iterative RLHF, resumable step by step.

Round k in ``<run_dir>/rounds/<k>/``:

1. ``sample``: K responses per prompt from the current best policy (round k-1's PPO policy; the
   ``policy`` option for round 0) -> ``samples.jsonl``;
2. ``select``: pairs ordered by the current reward model's uncertainty (random before one
   exists), de-duplicated, ``budget`` of them -> the label store (``<run_dir>/labels.sqlite``);
3. ``label``: ``labeller=human`` serves the labelling page until the round is answered (stopping
   it earlier pauses the round: a rerun serves the rest, or ``label_server.accept_partial=true``
   goes on with the answers given); ``labeller=ai`` runs the pairwise judge through the teacher;
4. ``merge``: every labelled comparison of every round -> ``comparisons.jsonl`` (chosen/rejected);
5. ``reward_model``: retrains the reward model on the merged comparisons (default ``mmllm train
   experiment=reward_model``, initialised from the previous reward model);
6. ``ppo``: a PPO round (default ``mmllm train experiment=ppo``) from the current policy against
   the new reward model; its output is the next round's policy.

``round.json`` records the inputs, each step's outputs and metrics, and is rewritten atomically
after every step: a rerun skips the finished steps (the label step resumes with what is still
pending; the store keeps every answer). The two training steps go through ``train``, a function
``train(overrides, output_dir) -> metrics`` (default :func:`train_cli`, a subprocess;
:func:`train_inprocess` skips the start-up), swappable in the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mmllm.config import CONF_DIR
from mmllm.rlhf.labels import LabelStore
from mmllm.rlhf.select import select_pairs

TrainFn = Callable[[list[str], Path], dict]


class LabellingPaused(Exception):
    """The labeller stopped the page before the round's budget was answered (resumable)."""
STEPS = ("sample", "select", "label", "merge", "reward_model", "ppo")


def train_cli(overrides: list[str], output_dir: Path) -> dict:
    """Runs ``python -m mmllm train <overrides> hydra.run.dir=<output_dir>`` in a subprocess.

    An interrupted earlier attempt (``checkpoints/last.ckpt`` present) is resumed. The log goes
    to ``<output_dir>/train.log``.

    Returns:
        The last logged value of every metric in the run's ``csv/metrics.csv`` (empty without one).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    extra = ["ckpt_path=last"] if (output_dir / "checkpoints" / "last.ckpt").exists() else []
    cmd = [sys.executable, "-m", "mmllm", "train", *overrides, *extra, f"hydra.run.dir={output_dir}"]
    log = output_dir / "train.log"
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (exit {rc}); the end of {log}:\n{tail}")
    from mmllm.checkpoint import resolve_ckpt

    resolve_ckpt(output_dir)  # the next step loads it: a run that saved nothing is an error here
    return last_metrics(output_dir / "csv" / "metrics.csv")


def train_inprocess(overrides: list[str], output_dir: Path) -> dict:
    """:func:`train_cli` in this process (:func:`mmllm.train.train` on the composed ``train``
    config): no interpreter start-up and imports per step, which at pipeline scale cost more than
    the training. The same resume (``checkpoints/last.ckpt``), outputs and returned metrics.

    Returns:
        The last logged value of every metric in the run's ``csv/metrics.csv``.
    """
    from mmllm.checkpoint import resolve_ckpt
    from mmllm.config import compose_config
    from mmllm.train import train

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    extra = ["ckpt_path=last"] if (output_dir / "checkpoints" / "last.ckpt").exists() else []
    cfg = compose_config("train", [*overrides, *extra], output_dir=output_dir)
    try:
        train(cfg)
    except Exception as e:
        raise RuntimeError(f"`mmllm train {' '.join(overrides)}` (in-process) failed: {e}") from e
    resolve_ckpt(output_dir)  # the next step loads it: a run that saved nothing is an error here
    return last_metrics(output_dir / "csv" / "metrics.csv")


def last_metrics(csv_path: Path) -> dict:
    """``{column: last non-empty value}`` of a Lightning CSV log."""
    import csv

    if not Path(csv_path).exists():
        return {}
    out: dict[str, float] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def load_prompts(source) -> list[str]:
    """Prompts from a list, a ``.txt`` file (one a line) or JSONL (``prompt`` or ``messages``)."""
    if not isinstance(source, (str, Path)):
        return [str(p) for p in source]
    path = Path(source)
    if not path.is_file():
        from mmllm.errors import UserError

        raise UserError(f"prompts={source}: no such file",
                        fix="pass prompts= a .txt file (one prompt a line) or JSONL rows with 'prompt' or 'messages'")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix == ".txt":
        return [ln.strip() for ln in lines]
    prompts = []
    for i, ln in enumerate(lines, 1):
        rec = json.loads(ln)
        if "prompt" in rec:
            prompts.append(str(rec["prompt"]))
        elif "messages" in rec and rec["messages"] and rec["messages"][-1].get("role") == "user":
            prompts.append(str(rec["messages"][-1]["content"]))
        else:
            raise ValueError(f"{path}:{i}: expected a 'prompt' or 'messages' ending in a user turn")
    return prompts


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _round_json(run_dir: Path, k: int) -> dict | None:
    path = run_dir / "rounds" / str(k) / "round.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def pick_round(run_dir: Path, round: int | None) -> int:
    """``round``, or (None) the unfinished round to resume, else the one after the last finished."""
    if round is not None:
        return int(round)
    done = sorted(int(p.name) for p in (run_dir / "rounds").glob("*") if p.name.isdigit())
    for k in done:
        if (_round_json(run_dir, k) or {}).get("status") != "finished":
            return k
    return done[-1] + 1 if done else 0


def round_inputs(cfg: DictConfig, run_dir: Path, k: int) -> dict:
    """The policy and reward model round ``k`` starts from, and its prompts."""
    if str(cfg.labeller) not in ("human", "ai"):  # before any model is loaded
        from mmllm.errors import ConfigError

        raise ConfigError(f"labeller={cfg.labeller!r}: not a labeller",
                          fix="labeller=human (the labelling page) or labeller=ai (the judge, via teacher=...)")
    if k == 0:
        policy, rm = str(cfg.policy), cfg.get("reward_model")
    else:
        prev = _round_json(run_dir, k - 1)
        if not prev or prev.get("status") != "finished":
            raise RuntimeError(f"round {k} needs round {k - 1} finished first ({run_dir}/rounds/{k - 1})")
        policy, rm = prev["outputs"]["policy"], prev["outputs"]["reward_model"]
    pool = load_prompts(cfg.prompts)
    if not pool:
        raise ValueError(f"no prompts in {cfg.prompts}")
    n = min(int(cfg.prompts_per_round), len(pool))
    prompts = [pool[(k * n + i) % len(pool)] for i in range(n)]  # each round the next slice
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    return {"policy": policy, "reward_model": None if rm is None else str(rm), "prompts": prompts,
            "prompts_sha256": digest, "samples_per_prompt": int(cfg.samples_per_prompt),
            "budget": int(cfg.budget), "labeller": str(cfg.labeller)}


class Round:
    """One round's state (``round.json``) and its steps; see the module docstring."""

    def __init__(self, cfg: DictConfig, *, train: TrainFn | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.k = pick_round(self.run_dir, cfg.get("round"))
        self.dir = self.run_dir / "rounds" / str(self.k)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.train = train or instantiate(cfg.train)
        inputs = round_inputs(cfg, self.run_dir, self.k)
        self.state = _round_json(self.run_dir, self.k) or {"round": self.k, "status": "running",
                                                         "inputs": inputs, "steps": {}, "outputs": {}}
        old = {k: v for k, v in self.state["inputs"].items() if k != "prompts"}
        new = {k: v for k, v in inputs.items() if k != "prompts"}
        if old != new:
            changed = sorted(k for k in new if old.get(k) != new[k])
            raise ValueError(f"round {self.k} in {self.dir} was started with other inputs ({changed}); "
                             "finish it with its own settings, or start a new run_dir")

    @property
    def inputs(self) -> dict:
        return self.state["inputs"]

    def save(self) -> None:
        _write_json(self.dir / "round.json", self.state)

    def run(self) -> dict:
        """Runs the steps not yet done; returns ``round.json``'s content."""
        store = LabelStore(self.run_dir / "labels.sqlite")
        self.state["status"] = "running"
        try:
            for name in STEPS:
                if self.state["steps"].get(name, {}).get("status") == "done":
                    print(f"round {self.k}: {name} done, skipped")
                    continue
                t0, started = time.perf_counter(), time.time()
                print(f"round {self.k}: {name}")
                try:
                    metrics, outputs = getattr(self, f"_{name}")(store)
                except LabellingPaused as e:
                    print(e)
                    self.state["status"] = "paused"
                    self.save()
                    return self.state
                self.state["steps"][name] = {"status": "done", "started_at": started,
                                             "seconds": round(time.perf_counter() - t0, 2),
                                             "outputs": outputs, "metrics": metrics}
                self.state["outputs"].update(outputs)
                self.save()
        finally:
            store.close()
        self.state["status"] = "finished"
        self.state["metrics"] = {n: s["metrics"] for n, s in self.state["steps"].items()}
        self.save()
        return self.state

    # ------------------------------------------------------------------------------ steps
    def _sample(self, store) -> tuple[dict, dict]:
        sampler = instantiate(self.cfg.sampler)(checkpoint=self.inputs["policy"])
        prompts, n = self.inputs["prompts"], self.inputs["samples_per_prompt"]
        samples = sampler(prompts, n)
        path = self.dir / "samples.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"prompt": p, "responses": list(rs)}, ensure_ascii=False) + "\n"
                         for p, rs in zip(prompts, samples, strict=True))
        flat = [r for rs in samples for r in rs]
        return ({"prompts": len(prompts), "responses": len(flat),
                 "mean_chars": round(sum(map(len, flat)) / max(len(flat), 1), 1)}, {"samples": str(path)})

    def _scorers(self) -> tuple[list, str]:
        sel, rm = self.cfg.selection, self.inputs["reward_model"]
        if rm is None or self.cfg.get("scorer") is None:
            return [], "random"
        factory = instantiate(self.cfg.scorer)
        if sel.strategy == "disagreement":
            return [factory(checkpoint=s) for s in [rm, *sel.get("ensemble", [])]], "disagreement"
        return [factory(checkpoint=rm)], str(sel.strategy)

    def _select(self, store) -> tuple[dict, dict]:
        recs = [json.loads(ln) for ln in (self.dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        scorers, strategy = self._scorers()
        sel = self.cfg.selection
        cands, stats = select_pairs([r["prompt"] for r in recs], [r["responses"] for r in recs],
                                    budget=self.inputs["budget"], strategy=strategy, scorers=scorers,
                                    max_pairs_per_prompt=sel.get("max_pairs_per_prompt"),
                                    seed=int(sel.get("seed", 0)) + self.k)
        meta = {"policy": self.inputs["policy"], "reward_model": self.inputs["reward_model"]}
        added = store.add_comparisons(self.k, [(c.prompt, c.response_a, c.response_b, {**c.meta(), **meta})
                                               for c in cands])
        return {**stats, "strategy": strategy, "added": added}, {"labels": str(store.path)}

    def _label(self, store) -> tuple[dict, dict]:
        if self.inputs["labeller"] == "ai":
            teacher = instantiate(self.cfg.teacher)
            try:
                judge = instantiate(self.cfg.judge)(teacher=teacher)
                stats = judge.label_round(store, self.k)
            finally:
                teacher.close()
        elif self.inputs["labeller"] == "human":
            from mmllm.rlhf.label_server import serve_labels

            opts = OmegaConf.to_container(self.cfg.label_server, resolve=True)
            accept_partial, labeller = bool(opts.pop("accept_partial", False)), str(opts.pop("labeller"))

            def ready(port: int) -> None:
                print(f"round {self.k}: label at http://{opts['host']}:{port}/ (Ctrl-C pauses; every "
                      "answer is saved)", flush=True)

            stats = serve_labels(store, self.k, on_ready=ready, labeller=labeller, **opts)
            if stats["stopped_early"] and not accept_partial:
                raise LabellingPaused(f"round {self.k}: labelling paused at {stats['answered']} of "
                                      f"{stats['total']}; rerun to continue labelling, or add "
                                      "label_server.accept_partial=true to go on with the answers given")
        else:
            raise ValueError(f"labeller must be 'human' or 'ai', got {self.inputs['labeller']!r}")
        return {**stats, "counts": store.counts(self.k)}, {}

    def _merge(self, store) -> tuple[dict, dict]:
        path = self.dir / "comparisons.jsonl"
        n = store.export_jsonl(path)
        if n == 0 and not self.cfg.get("require_preferences", True):
            print(f"round {self.k}: no decisive labels yet; training is skipped this round")
        elif n == 0:
            raise RuntimeError(f"no decisive (a/b) labels in {store.path} yet: nothing to train the "
                               f"reward model on (labels so far: {store.counts()})")
        return {"preference_pairs": n, "counts": store.counts()}, {"comparisons": str(path)}

    def _vars(self, **extra) -> dict:
        return {"round": self.k, "round_dir": str(self.dir), "policy": self.inputs["policy"],
                "previous_reward_model": self.inputs["reward_model"],
                "comparisons": self.state["outputs"].get("comparisons"), **extra}

    def _overrides(self, key: str, values: dict) -> list[str]:
        try:
            return [str(o).format_map(values) for o in self.cfg[key].overrides]
        except KeyError as e:
            raise KeyError(f"{key}.overrides uses {{{e.args[0]}}}; known: {sorted(values)}") from e

    def _nothing_to_train(self) -> bool:
        """No preference pair yet (allowed by ``require_preferences=false``): carry inputs forward."""
        return self.state["steps"]["merge"]["metrics"]["preference_pairs"] == 0

    def _reward_model(self, store) -> tuple[dict, dict]:
        if self._nothing_to_train():
            return {"skipped": "no preference pairs"}, {"reward_model": self.inputs["reward_model"]}
        out = self.dir / "reward_model"
        init = self.inputs["reward_model"] or self.inputs["policy"]  # round 0: from the policy
        metrics = self.train(self._overrides("reward_train", self._vars(init=init, output_dir=str(out))), out)
        return dict(metrics or {}), {"reward_model": str(out)}

    def _ppo(self, store) -> tuple[dict, dict]:
        if self._nothing_to_train():
            return {"skipped": "no preference pairs"}, {"policy": self.inputs["policy"]}
        out = self.dir / "policy"
        values = self._vars(reward_model=self.state["outputs"]["reward_model"], output_dir=str(out))
        metrics = self.train(self._overrides("ppo_train", values), out)
        return dict(metrics or {}), {"policy": str(out)}


def run_round(cfg: DictConfig, *, train: TrainFn | None = None) -> dict:
    """Runs (or resumes) one round of ``cfg`` (``conf/rlhf_round.yaml``); returns its record."""
    return Round(cfg, train=train).run()


@hydra.main(config_path=CONF_DIR, config_name="rlhf_round", version_base="1.3")
def main(cfg: DictConfig) -> None:
    state = run_round(cfg)
    if state["status"] != "finished":
        return
    print(f"round {state['round']} finished: policy {state['outputs']['policy']}, reward model "
          f"{state['outputs']['reward_model']} ({Path(cfg.run_dir) / 'rounds' / str(state['round'])}/round.json)")


if __name__ == "__main__":
    main()
