"""A NaN/inf loss is caught at its step: stop naming the step and the last good checkpoint, or skip the update."""

import json

import lightning as L
import pytest
import torch
from conftest import TINY_CLIP, TINY_VAE, tiny_datamodule

from lit_diffusion.runtime.safety import LastCheckpoint, NonFiniteGuard, NonFiniteLossError
from lit_diffusion.runtime.tracking import JSONLLogger

BAD_STEP = 3


class WatchStep(L.Callback):
    """Parameters before and after the bad step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == BAD_STEP:
            self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == BAD_STEP + 1:
            self.after = [p.detach().clone() for p in pl_module.parameters()]


def _poison(module, method: str, value: float):
    """Make `module.method`'s loss non-finite at BAD_STEP (as a diverging batch would)."""
    original = getattr(module, method)

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        if module.trainer.global_step == BAD_STEP:
            if isinstance(out, dict):
                out = {**out, "loss": out["loss"] * value}
            else:
                out = (out[0] * value, *out[1:])
        return out

    setattr(module, method, poisoned)


def _module(kind: str):
    torch.manual_seed(0)
    if kind == "clip":
        from lit_diffusion.stages.clip import CLIPModule

        return CLIPModule(**TINY_CLIP, tokenizer_path=str(_module.data / "tokenizer.json")), "model_step"
    from lit_diffusion.stages.vae import VAEModule

    extra = {"disc_weight": 0.5, "disc_start": 0, "disc_layers": 1, "disc_channels": 8} if kind == "vae_gan" else {}
    return VAEModule(**TINY_VAE, **extra), "_losses"


def _fit(shapes_data, tmp_path, kind, guard, value=float("nan"), max_steps=5):
    _module.data = shapes_data
    module, method = _module(kind)
    _poison(module, method, value)
    watch = WatchStep()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        log_every_n_steps=1, logger=JSONLLogger(tmp_path / "run"), default_root_dir=str(tmp_path),
                        callbacks=[guard, watch, LastCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True,
                                                                save_top_k=0, every_n_train_steps=2)])
    trainer.fit(module, datamodule=tiny_datamodule(shapes_data, batch_size=8))
    return trainer, module, watch


@pytest.mark.parametrize("kind,value", [("vae", float("nan")), ("vae_gan", float("inf")), ("clip", float("nan"))])
def test_nonfinite_loss_stops_naming_the_step_and_the_last_checkpoint(shapes_data, tmp_path, kind, value):
    with pytest.raises(NonFiniteLossError) as err:
        _fit(shapes_data, tmp_path, kind, NonFiniteGuard("stop"), value)
    message = str(err.value)
    assert f"non-finite training loss ({value}) at global step {BAD_STEP}" in message
    last = tmp_path / "ckpt" / "last.ckpt"
    assert f"last good checkpoint: {last} (step 2)" in message
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("kind", ["vae", "vae_gan"])  # automatic and manual optimisation
def test_skip_mode_leaves_the_weights_alone_and_counts_the_skip(shapes_data, tmp_path, kind):
    guard = NonFiniteGuard("skip")
    trainer, module, watch = _fit(shapes_data, tmp_path, kind, guard)
    assert trainer.global_step == 5  # training went on to max_steps
    generator = [n for n, _ in module.named_parameters()]
    changed = [n for n, a, b in zip(generator, watch.before, watch.after) if not torch.equal(a, b)]
    # the poisoned generator loss left the autoencoder untouched; a discriminator step on finite losses may move
    assert not [n for n in changed if n.startswith("vae.")], changed
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert guard.skips == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skips = [(r["step"], r["train/nonfinite_skips"]) for r in rows if "train/nonfinite_skips" in r]
    assert skips == [(BAD_STEP, 1.0)]
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert any(v == {"skips": 1} for v in state.values())  # the count survives a resume


def test_skip_mode_stops_after_too_many_in_a_row(shapes_data, tmp_path):
    _module.data = shapes_data
    module, _ = _module("vae")
    original = module._losses

    def always_nan(*args, **kwargs):
        out = original(*args, **kwargs)
        return {**out, "loss": out["loss"] * float("nan")}

    module._losses = always_nan
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=10, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[NonFiniteGuard("skip", max_consecutive_skips=3)])
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row, stopping; no checkpoint"):
        trainer.fit(module, datamodule=tiny_datamodule(shapes_data, batch_size=8))
    assert trainer.global_step == 2
