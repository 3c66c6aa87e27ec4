"""Bad configuration fails before training, naming the key or file (what tests/test_ldm.py and
tests/test_clip_model.py already cover is not repeated here)."""

import copy

import pytest
import yaml
from conftest import TINY_CLIP
from test_reliability_checkpoints import run_cli, tiny_vae_config


def _set(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        config = config[key]
    config[leaf] = value


@pytest.mark.parametrize("key,value,expected", [
    ("model.init_args.lerning_rate", 1e-3, ["Option 'lerning_rate' is not accepted",
                                            "class_path 'lit_diffusion.stages.vae.VAEModule'"]),
    ("model.init_args.lr", "fast", ['Parser key "lr"', "Got value: fast"]),
    ("model.init_args.arch.base_chanels", 8, ["Option 'base_chanels' is not accepted", 'Parser key "arch"']),
    ("data.init_args.batch_size", [4], ['Parser key "batch_size"', "Expected a <class 'int'>"]),
    ("trainer.max_steps", "ten", ['Parser key "trainer.max_steps"']),
    ("trainr", {"max_steps": 3}, ["does not accept option 'trainr.max_steps'"]),
    ("run", {"on_nonfinite": "ignore"}, ['run.on_nonfinite', "ignore"]),
])
def test_bad_config_exits_naming_the_key(shapes_data, tmp_path, monkeypatch, capsys, key, value, expected):
    monkeypatch.delenv("LIT_DIFFUSION_RUN_NAME", raising=False)
    config = copy.deepcopy(tiny_vae_config(shapes_data, max_steps=2))  # TINY_VAE is shared
    _set(config, key, value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing started


def test_clip_text_context_length_must_match_its_tokenizer(shapes_data):
    from lit_diffusion.data.tokenizer import Tokenizer
    from lit_diffusion.stages.clip import CLIPModule

    tokenizer = shapes_data / "tokenizer.json"
    have = Tokenizer.load(tokenizer).context_length
    text = {**TINY_CLIP["text"], "context_length": have + 5}
    with pytest.raises(ValueError, match=rf"model.init_args.text.context_length = {have + 5} does not match the "
                                         rf"tokenizer \({tokenizer}: {have}\)"):
        CLIPModule(**{**TINY_CLIP, "text": text}, tokenizer_path=str(tokenizer))
    # left unset it is taken from the tokenizer, and a CLIP checkpoint carries its own tokenizer
    assert CLIPModule(**TINY_CLIP, tokenizer_path=str(tokenizer)).hparams.text["context_length"] == have
