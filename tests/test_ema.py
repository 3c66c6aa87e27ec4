"""`averaged_weights` lends the module the EMA weights through `WeightAveraging`'s public hooks; these tests pin
what it relies on in them (see callbacks/ema.py), against the closed-form EMA written in torch's
`get_ema_avg_fn`: W_1 = w_1, W_t = decay * W_{t-1} + (1 - decay) * w_t. A Lightning release that changes how
the hooks update or swap fails here."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from torch.utils.data import DataLoader, TensorDataset

from lit_diffusion.callbacks.ema import EMAWeightAveraging, averaged_weights

DECAY = 0.5
STEPS = 6


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(4 * STEPS, 3, generator=g), torch.randn(4 * STEPS, 2, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=4)


def weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class Probe(L.Callback):
    """At every batch end: the trained weights, the weights inside `averaged_weights`, and the weights after it."""

    def __init__(self):
        self.trained, self.inside, self.after = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trained.append(weights(pl_module))
        with averaged_weights(trainer, pl_module) as model:
            assert model is pl_module
            self.inside.append(weights(model))
        self.after.append(weights(pl_module))


PRODUCT = lambda a, b: DECAY * a + (1 - DECAY) * b  # noqa: E731  torch's get_ema_avg_fn, Lightning's class
LERP = lambda a, b: torch.lerp(a, b, 1 - DECAY)  # noqa: E731  torch's get_ema_multi_avg_fn, ours


def closed_form_ema(trained: list[list[torch.Tensor]], update=PRODUCT) -> list[list[torch.Tensor]]:
    ema = [trained[0]]
    for w in trained[1:]:
        ema.append([update(a, b) for a, b in zip(ema[-1], w)])
    return ema


@pytest.mark.parametrize("probe_first", [True, False])  # before the EMA callback (it takes the update) or after
@pytest.mark.parametrize("cls,update", [(LightningEMA, PRODUCT), (EMAWeightAveraging, LERP)],
                         ids=["lightning", "ours"])
def test_averaged_weights_are_this_steps_ema_and_the_trained_weights_come_back(tmp_path, probe_first, cls, update):
    torch.manual_seed(0)
    probe, ema = Probe(), cls(decay=DECAY)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[probe, ema] if probe_first else [ema, probe])
    trainer.fit(Linear())
    expected = closed_form_ema(probe.trained, update)
    assert len(probe.inside) == STEPS
    for step, (inside, want, trained, after) in enumerate(zip(probe.inside, expected, probe.trained, probe.after)):
        for a, b in zip(inside, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"EMA weights at step {step + 1}")
        assert all(torch.equal(a, b) for a, b in zip(after, trained)), f"trained weights back at step {step + 1}"
    assert not all(torch.equal(a, b) for a, b in zip(expected[-1], probe.trained[-1]))  # the EMA is not a copy
    # one update per step, whoever called the hook first: the saved average is the closed form's last value
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    saved = torch.load(tmp_path / "ema.ckpt", weights_only=True)["state_dict"]
    for a, b in zip([saved["net.weight"], saved["net.bias"]], expected[-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_without_weight_averaging_the_module_is_lent_as_it_is(tmp_path):
    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[probe])
    trainer.fit(Linear())
    for inside, trained in zip(probe.inside, probe.trained):
        assert all(torch.equal(a, b) for a, b in zip(inside, trained))


class WithFrozen(Linear):
    """A trained layer beside a frozen one, as the diffusion stage holds the frozen CLIP and VAE."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(64, 64).requires_grad_(False)


@pytest.mark.parametrize("cls,bit_identical", [(EMAWeightAveraging, True), (LightningEMA, False)],
                         ids=["ours", "lightning"])
def test_frozen_weights_stay_bit_identical_in_our_average(tmp_path, cls, bit_identical):
    """decay * w + (1 - decay) * w rounds away from w in some of 4160 weights within a few updates; lerp is w.
    The Lightning case pins why the configs name our class (if a release switches to lerp, ours can go)."""
    torch.manual_seed(0)
    model, ema = WithFrozen(), cls(decay=0.995)
    frozen = [p.detach().clone() for p in model.frozen.parameters()]
    initial = model.net.weight.detach().clone()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ema])
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    saved = torch.load(tmp_path / "ema.ckpt", weights_only=True)["state_dict"]  # the averaged weights
    same = [torch.equal(saved[f"frozen.{name}"], w) for name, w in zip(("weight", "bias"), frozen)]
    assert all(same) == bit_identical
    assert not torch.equal(saved["net.weight"], initial)  # the trained layer moved: the frozen one was averaged too


def test_the_final_last_ckpt_keeps_the_raw_weights_beside_the_average(tmp_path):
    """Lightning copies the average into the module at train end, before the checkpoint callbacks (always last)
    write the final last.ckpt: its `current_model_state` had been the average, so a run resumed from it to more
    steps went on from the EMA weights with the raw weights' optimizer state."""
    from lit_diffusion.runtime.safety import AtomicCheckpointIO, LastCheckpoint

    probe = Probe()
    torch.manual_seed(0)
    model = Linear()
    L.Trainer(accelerator="cpu", max_steps=STEPS - 1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
              callbacks=[probe, EMAWeightAveraging(decay=DECAY),
                         LastCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0,
                                        every_n_train_steps=100)]).fit(model)
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS - 1
    raw, ema = probe.trained[-1], probe.inside[-1]
    torch.testing.assert_close(ckpt["current_model_state"]["net.weight"], raw[0], rtol=0, atol=0)
    torch.testing.assert_close(ckpt["state_dict"]["net.weight"], ema[0], rtol=0, atol=0)
    assert not torch.equal(raw[0], ema[0])
    # resuming it: the module trains on from the raw weights, the average from the saved one
    seen = []
    resumed = Linear()
    L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path,
              callbacks=[EMAWeightAveraging(decay=DECAY),
                         L.pytorch.callbacks.LambdaCallback(on_train_start=lambda t, m: seen.append(
                             m.net.weight.detach().clone()))]).fit(resumed, ckpt_path=tmp_path / "ck" / "last.ckpt")
    torch.testing.assert_close(seen[0], raw[0], rtol=0, atol=0)


@pytest.mark.parametrize("start", [3, STEPS + 2])  # the first update at step 4; none within the run
def test_before_its_first_update_the_average_follows_the_trained_weights(tmp_path, start):
    """diffusers' `EMAModel` (decay 0 until `update_after_step`) is the reference: before the first update the
    averaged weights are the trained ones, then the closed-form EMA from that update on. Lightning's average is the
    initial weights until then, so grids, validation and checkpoints before it showed the untrained model."""
    from lit_diffusion.runtime.safety import AtomicCheckpointIO, LastCheckpoint

    torch.manual_seed(0)
    probe, model = Probe(), Linear()
    initial = weights(model)
    L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
              callbacks=[probe, EMAWeightAveraging(decay=DECAY, update_starting_at_step=start),
                         LastCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0,
                                        every_n_train_steps=2)]).fit(model)
    before = min(start, STEPS)  # steps 1..start see no update (step_idx < start)
    for step in range(before):
        assert all(torch.equal(a, b) for a, b in zip(probe.inside[step], probe.trained[step])), f"step {step + 1}"
    expected = closed_form_ema(probe.trained[before:], LERP) if before < STEPS else []
    for step, (inside, want) in enumerate(zip(probe.inside[before:], expected), start=before + 1):
        for a, b in zip(inside, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"EMA weights at step {step}")
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["net.weight"], probe.inside[-1][0], rtol=0, atol=0)
    assert not torch.equal(saved["net.weight"], initial[0])
