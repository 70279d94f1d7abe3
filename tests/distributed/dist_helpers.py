"""Shared pieces of the distributed tests: synthetic data, the tiny model, a loss recorder, and a
launcher that runs a Lightning script with 2 CPU processes and leaves no process behind.

The synthetic data are random token batches with ``input_ids``/``labels`` (no dependency on the
data modules of the kit; :func:`pretrain_datamodule` is the kit's own for the data tests), in a
fixed order so that a single process with the global batch sees
exactly the tokens that the data-parallel ranks see together (DistributedSampler without shuffle
deals sample ``i`` to rank ``i % world``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mmllm.data import PretrainDataModule
from mmllm.distributed import grad_norm
from mmllm.models import DecoderLM
from mmllm.modules import CausalLMModule

VOCAB, SEQ = 64, 16
MODEL = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
             max_seq_len=64)
WORKER = Path(__file__).with_name("dist_worker.py")


class RandomTokens(Dataset):
    """``n`` random sequences of ``seq_len`` tokens (fixed by ``seed``), labels = next tokens."""

    def __init__(self, n: int, seq_len: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (n, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


class RandomTokensDataModule(L.LightningDataModule):
    """One epoch = ``batches_per_epoch`` global batches of ``global_batch`` sequences."""

    def __init__(self, *, global_batch: int, data_parallel: int, batches_per_epoch: int = 3) -> None:
        super().__init__()
        self.data = RandomTokens(global_batch * batches_per_epoch)
        self.batch_size = global_batch // data_parallel

    def train_dataloader(self) -> DataLoader:
        # Lightning's automatic DistributedSampler shuffles training data: deal samples in order.
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(self.data, shuffle=False,
                                         **self.trainer.strategy.distributed_sampler_kwargs)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


def build_model(init_path: str, tie: bool, model: dict | None = None,
                idle_expert: int | None = None) -> DecoderLM:
    """The tiny model (``MODEL`` updated by ``model``) with the weights saved at ``init_path``
    (identical in every process); ``idle_expert`` is never routed to (see :func:`force_idle`)."""
    lm = DecoderLM(**{**MODEL, **(model or {})}, tie_embeddings=tie)
    lm.load_state_dict(torch.load(init_path))
    if idle_expert is not None:
        force_idle(lm, idle_expert)
    return lm


def force_idle(model: DecoderLM, expert: int) -> None:
    """Makes every MoE router leave ``expert`` without tokens (its logit drops by 1e4)."""
    def hook(module, inputs, logits):
        penalty = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        penalty[expert] = 1e4
        return logits - penalty

    for layer in model.layers:
        layer.mlp.router.register_forward_hook(hook)


def make_module(init_path: str, *, tie: bool, parallelism: dict | None, model: dict | None = None,
                idle_expert: int | None = None, **module_kwargs) -> CausalLMModule:
    """CausalLMModule with AdamW (lr 1e-2, so that a wrong gradient shows within a few steps)."""
    opt = partial(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    return CausalLMModule(model=partial(build_model, init_path, tie, model, idle_expert),
                          optimizer=opt, parallelism=parallelism, **module_kwargs)


def pretrain_datamodule(shards: str, *, global_batch: int, data_parallel: int) -> PretrainDataModule:
    """The kit's own PretrainDataModule over ``shards`` (SEQ tokens, 3 global batches a cycle)."""
    return PretrainDataModule(sources=[{"name": "web", "path": shards, "weight": 1.0}],
                              seq_len=SEQ, batch_size=global_batch // data_parallel,
                              num_samples=3 * global_batch, seed=7)


def write_shards(root: Path) -> str:
    """Token shards of a small synthetic corpus, tokenised with a byte-level BPE (< 320 ids)."""
    import random

    from mmllm.data import tokenize_to_shards, train_bpe_tokenizer

    rng = random.Random(0)
    words = "alpha beta gamma delta river stone garden window market tower boat".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(120)]
    tok = train_bpe_tokenizer(docs, vocab_size=300, show_progress=False)
    text = root / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenize_to_shards(text, root / "shards", tok)
    return str(root / "shards")


class BatchRecorder(L.Callback):
    """A fingerprint of every training batch this rank reads, and at the end those of all ranks."""

    def __init__(self) -> None:
        self.mine: list[int] = []
        self.per_rank: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = batch["input_ids"].long()
        weights = torch.arange(1, ids.numel() + 1).view_as(ids)  # order-sensitive
        self.mine.append(int((ids * weights).sum()))

    def on_train_end(self, trainer, pl_module) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(self.per_rank, self.mine)
        else:
            self.per_rank = [self.mine]


class LossRecorder(L.Callback):
    """Records the global mean training loss and the gradient norm (before clipping) of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grad_norms.append(float(grad_norm(pl_module.parameters())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        loss = trainer.strategy.reduce(loss, reduce_op="mean")
        self.losses.append(float(loss))


def trainer_kwargs(max_steps: int, recorder: LossRecorder, callbacks=(), accelerator: str = "cpu") -> dict:
    return dict(accelerator=accelerator, max_steps=max_steps, logger=False, callbacks=[recorder, *callbacks],
                enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                enable_checkpointing=bool(callbacks))


def save_init(path: Path, tie: bool, seed: int = 0, model: dict | None = None) -> Path:
    torch.manual_seed(seed)
    torch.save(DecoderLM(**{**MODEL, **(model or {})}, tie_embeddings=tie).state_dict(), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, workdir: Path, timeout: float = 300) -> dict:
    """Runs ``dist_worker.py`` on ``spec`` and returns the results it wrote.

    The worker and the rank Lightning spawns for it share a new session, so a timeout or an
    error kills both; a fresh free port keeps concurrent launches apart.
    """
    spec_file, result_file = workdir / "spec.json", workdir / "result.json"
    spec_file.write_text(json.dumps({**spec, "result": str(result_file)}))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=env,
                            cwd=workdir, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc.pid)
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"distributed worker failed (exit {proc.returncode}):\n{out[-6000:]}")
    return json.loads(result_file.read_text())


def launch_ranks(script: Path, args: list[str], world: int, timeout: float = 180) -> list[str]:
    """Starts ``world`` processes of ``script`` with torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT), waits for all, kills all on timeout or failure; returns their outputs."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, str(script), *args],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = []
    try:
        deadline = time.time() + timeout
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.time()))[0])
    finally:
        for proc in procs:
            _kill_group(proc.pid, grace=0.0)
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"ranks failed {failed}:\n" + "\n".join(o[-4000:] for o in outputs))
    return outputs


def _kill_group(pgid: int, grace: float = 30.0) -> None:
    """Waits for the spawned rank to exit after rank 0, then kills whatever is left."""
    deadline = time.time() + grace
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.time() >= deadline:
            break
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
