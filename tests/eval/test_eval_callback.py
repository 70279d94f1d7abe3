"""EvalCallback runs a small suite during training and logs its metrics."""

from __future__ import annotations

import lightning as L
import torch

from mmllm.callbacks.eval_callback import EvalCallback
from mmllm.eval.builtin import capitals_task


class TinyLMModule(L.LightningModule):
    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def training_step(self, batch, batch_idx):
        x = batch[0]
        assert self.model.training  # an evaluation in between hands the model back in train mode
        logits = self.model(x[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        loss = torch.nn.functional.cross_entropy(self.model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_eval_callback_logs_every_n_steps_and_after_validation(tiny_tokenizer, make_tiny_model, tmp_path):
    model = make_tiny_model(len(tiny_tokenizer), max_seq_len=256).train()
    data = torch.utils.data.TensorDataset(torch.randint(0, len(tiny_tokenizer), (8, 12)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    cb = EvalCallback(tasks={"capitals": capitals_task()}, every_n_steps=2, limit=4, batch_size=4)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(max_steps=4, val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=1,
                        logger=logger, callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(TinyLMModule(model, tiny_tokenizer), loader, loader)
    assert [h["step"] for h in cb.history] == [2, 4]  # not during the sanity check, once at step 4
    assert 0.0 <= trainer.callback_metrics["eval/capitals/acc"].item() <= 1.0
    logger.finalize("success")
    csv = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "eval/capitals/acc_norm" in csv
