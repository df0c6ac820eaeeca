"""The Trainer callbacks (Hugging Face, Lightning) against the documented manual loop:
the same model, batches and optimizer give the same parameters after a few optimizer steps
with gradient accumulation."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_ef import KFACPreconditioner

from . import ecosystem

BATCH, ACCUMULATE, STEPS = 4, 2, 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x, labels=None):
        out = self.body(x)
        if labels is None:
            return out
        return {"loss": F.cross_entropy(out, labels), "logits": out}


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


OPTIONS = dict(damping=1e-2, other_params="diagonal", inv_update_steps=2)


def _manual(model: nn.Module, lr: float, clip: float | None = None) -> nn.Module:
    """The documented loop: backward per micro-batch, step() once per optimizer step."""
    x, y = _data(BATCH * ACCUMULATE * STEPS)
    pre = KFACPreconditioner(model, **OPTIONS)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for s in range(STEPS):
        opt.zero_grad()
        for m in range(ACCUMULATE):
            i = (s * ACCUMULATE + m) * BATCH
            loss = F.cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH])
            (loss / ACCUMULATE).backward()
        pre.step()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    pre.remove()
    return model


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_huggingface_trainer_callback(tmp_path):
    tf = ecosystem.transformers()
    hf = importlib.import_module("kfac_ef.integrations.huggingface")
    from torch.utils.data import SequentialSampler

    torch.manual_seed(0)
    model = Net()
    reference = _manual(copy.deepcopy(model), lr=0.1)
    x, y = _data(BATCH * ACCUMULATE * STEPS)
    data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]

    class InOrder(tf.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = tf.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE, max_steps=STEPS, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    callback = hf.KFACCallback(**OPTIONS)
    InOrder(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.preconditioner is not None and callback.preconditioner.steps == STEPS
    _assert_same(model, reference)
    callback.remove()
    with pytest.raises(TypeError, match="grad_scaler"):
        hf.KFACCallback(grad_scaler=None)


def test_lightning_callback():
    lightning = ecosystem.load("lightning", "pytorch")
    lit = importlib.import_module("kfac_ef.integrations.lightning")
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    net = Net()
    clip = 0.5
    reference = _manual(copy.deepcopy(net), lr=0.1, clip=clip)

    class Module(lightning.pytorch.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return F.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = _data(BATCH * ACCUMULATE * STEPS)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    callback = lit.KFACCallback(**OPTIONS)
    trainer = lightning.pytorch.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=clip, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), loader)
    assert callback.preconditioner is not None and callback.preconditioner.steps == STEPS
    _assert_same(net, reference)
    callback.remove()
