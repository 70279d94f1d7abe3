"""Our evaluator vs lm-eval on the same model and the same local multiple-choice task.

:func:`agreement` runs the built-in capitals task (ARC format, lm-eval's ARC prompt) three ways:

* ``ours``: :func:`mmllm.eval.evaluate` with :class:`MultipleChoiceTask`;
* ``lm_eval_mmllm``: ``lm_eval.simple_evaluate`` with a task YAML pointing at local JSONL files,
  on our model through :class:`MMLLMEvalLM`;
* ``lm_eval_hf``: the same lm-eval task on lm-eval's own ``HFLM`` wrapping the transformers
  ``LlamaForCausalLM`` the DecoderLM was converted from (an independent implementation).

k-shot runs use the first k train examples on both sides (lm-eval's ``first_n`` sampler).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from mmllm.eval.builtin import capitals_task, write_capitals
from mmllm.eval.evaluator import evaluate

LM_EVAL_TASK = textwrap.dedent("""\
    task: {name}
    dataset_path: json
    dataset_name: null
    dataset_kwargs:
      data_files:
        train: {train}
        test: {test}
    output_type: multiple_choice
    training_split: train
    test_split: test
    fewshot_split: train
    fewshot_config:
      sampler: first_n
    doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
    doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
    doc_to_choice: "{{{{choices.text}}}}"
    metric_list:
      - metric: acc
        aggregation: mean
        higher_is_better: true
      - metric: acc_norm
        aggregation: mean
        higher_is_better: true
    metadata:
      version: 1.0
    """)


def write_lm_eval_task(out_dir: str | Path, *, name: str = "capitals_local", n_train: int = 10) -> Path:
    """Writes the capitals JSONL files and an lm-eval task YAML that reads them; returns the dir."""
    out = Path(out_dir)
    data = write_capitals(out / "data", n_train=n_train)
    (out / f"{name}.yaml").write_text(LM_EVAL_TASK.format(
        name=name, train=(data / "train.jsonl").resolve(), test=(data / "test.jsonl").resolve()))
    return out


def run_lm_eval(lm, task_dir: str | Path, *, name: str = "capitals_local", num_fewshot: int = 0,
                limit: int | None = None) -> dict:
    """``lm_eval.simple_evaluate`` of the local task; returns ``{"acc", "acc_norm", "samples"}``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, bootstrap_iters=0, log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    res = out["results"][name]
    lls = [[float(r[0][0]) for r in s["resps"]] for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
    return {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"], "loglikelihoods": lls}


def agreement(model, tokenizer, task_dir: str | Path, *, hf_model=None, num_fewshot: int = 0,
              limit: int | None = None, batch_size: int = 16) -> dict:
    """acc / acc_norm / per-choice log-likelihoods from our evaluator and lm-eval.

    Args:
        model: a DecoderLM; tokenizer: its tokenizer.
        task_dir: from :func:`write_lm_eval_task`.
        hf_model: the equivalent transformers model, for lm-eval's own HFLM (optional).
        num_fewshot / limit / batch_size: the evaluation settings (same on every side).

    Returns:
        ``{"ours": {...}, "lm_eval_mmllm": {...}, ["lm_eval_hf": {...}]}``.
    """
    from mmllm.eval.lm_eval_adapter import MMLLMEvalLM

    task = capitals_task(num_fewshot=num_fewshot)
    task.fewshot_sampler = "first"
    report = evaluate(model, tokenizer, [task], batch_size=batch_size, limit=limit,
                      log_samples=True, progress=False)
    ours = {**{k: report["results"]["capitals"][k] for k in ("acc", "acc_norm")},
            "loglikelihoods": [s["loglikelihoods"] for s in report["samples"]["capitals"]]}
    out = {"ours": ours, "lm_eval_mmllm": run_lm_eval(
        MMLLMEvalLM(model=model, tokenizer=tokenizer, batch_size=batch_size), task_dir,
        num_fewshot=num_fewshot, limit=limit)}
    if hf_model is not None:
        from lm_eval.models.huggingface import HFLM

        hflm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size,
                    max_length=getattr(model, "max_seq_len", None), device=str(hf_model.device))
        out["lm_eval_hf"] = run_lm_eval(hflm, task_dir, num_fewshot=num_fewshot, limit=limit)
    return out
