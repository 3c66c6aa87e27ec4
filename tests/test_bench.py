"""The benchmarks measure what they claim: same work on both sides, ratios computed from the reported numbers.
No wall-clock thresholds here: timings on a shared machine are only checked for structure."""

import copy
import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from lit_diffusion.bench import run_bench
from lit_diffusion.bench.common import Settings, build_stage, format_table, prebuilt_batches, row, save_stage_checkpoint
from lit_diffusion.bench.flops import denoiser_network, denoiser_step_flops, train_step_flops, unet_step_flops
from lit_diffusion.bench.memory import bench_memory
from lit_diffusion.bench.sampling import CountedCalls, bare_forwards, sampler_run, sampler_timesteps
from lit_diffusion.bench.train import configured_optimizer, lightning_fit, plain_loop
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.diffusion.schedule import NoiseSchedule
from lit_diffusion.models.unet import UNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(quick=True, repeats=1, sample_repeats=1, ddpm_timesteps=6, ddim_steps=3, dpm_steps=3, cfg_calls=2)


def _float_state(module) -> dict:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("stage", ["clip", "vae", "ldm", "ldm_dit"])
def test_plain_loop_and_lightning_fit_train_the_same_weights(stage, shapes_data, tmp_path):
    module, _, _ = build_stage(stage, shapes_data, tmp_path, quick=True)
    batches = prebuilt_batches(shapes_data, 16, 8, 4, "cpu")
    lit, plain = copy.deepcopy(module), copy.deepcopy(module)
    lit_stamps = lightning_fit(lit, batches, "cpu", gradient_clip_val=0.5, root=str(tmp_path))
    plain_stamps = plain_loop(plain, batches, "cpu", gradient_clip_val=0.5)
    assert len(lit_stamps) == len(plain_stamps) == 4  # one timed step per batch on both sides

    init, a, b = _float_state(module), _float_state(lit), _float_state(plain)
    moved = max((a[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-4  # 4 steps changed the weights, so equality below is not vacuous
    for key in init:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_same_weights_under_bf16_mixed(shapes_data, tmp_path):
    module, _, _ = build_stage("vae", shapes_data, tmp_path, quick=True)
    batches = prebuilt_batches(shapes_data, 16, 8, 3, "cpu")
    lit, plain, fp32 = copy.deepcopy(module), copy.deepcopy(module), copy.deepcopy(module)
    lightning_fit(lit, batches, "cpu", precision="bf16-mixed", root=str(tmp_path))
    plain_loop(plain, batches, "cpu", precision="bf16-mixed")
    plain_loop(fp32, batches, "cpu")
    a, b, c = _float_state(lit), _float_state(plain), _float_state(fp32)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # autocast really ran in bf16


def test_optimizer_and_schedule_come_from_the_module(shapes_data, tmp_path):
    module, _, _ = build_stage("clip", shapes_data, tmp_path, quick=True)
    opt, sched = configured_optimizer(module, total_steps=10)
    assert isinstance(opt, torch.optim.AdamW) and module._trainer is None
    assert opt.param_groups[0]["weight_decay"] == module.hparams.weight_decay
    # warm-up then cosine to 10% over the 10 steps Lightning would report as estimated_stepping_batches
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(module.hparams.lr / 2) and lrs[1] == pytest.approx(module.hparams.lr)
    assert lrs[-1] < lrs[2]


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddim", 4), ("dpmpp_2m", 5)])
def test_bare_forward_baseline_makes_as_many_unet_calls_as_the_sampler(name, steps, pooled):
    torch.manual_seed(0)
    unet = UNet(dict(in_channels=4, out_channels=4, model_channels=8, channel_mult=[1], num_res_blocks=1,
                     attention_resolutions=[1], head_dim=4, norm_groups=4, context_dim=6,
                     pooled_dim=3 if pooled else None)).eval()
    schedule = NoiseSchedule(num_timesteps=7 if name == "ddpm" else 50)
    cond = Conditioning(context=torch.randn(3, 5, 6), mask=torch.ones(3, 5, dtype=torch.bool),
                        pooled=torch.randn(3, 3) if pooled else None)
    uncond = Conditioning(context=torch.randn(1, 2, 6), mask=torch.ones(1, 2, dtype=torch.bool),
                          pooled=torch.randn(1, 3) if pooled else None)
    shape = (3, 4, 4, 4)

    seen = {"sampler": [], "bare": []}

    def recorder(kind):
        def denoiser(x, t, cond):
            seen[kind].append((tuple(x.shape), tuple(cond.context.shape), sorted(set(t.tolist())),
                               None if cond.pooled is None else cond.pooled.sum().item()))
            return unet(x, t, cond)
        return CountedCalls(denoiser)

    sampler_calls = sampler_run(name, recorder("sampler"), schedule, cond, uncond, 3.0, shape, steps, "cpu")
    ts = sampler_timesteps(name, schedule, steps)
    bare_calls = bare_forwards(recorder("bare"), ts, cond, uncond, shape, "cpu")
    assert sampler_calls == bare_calls == len(ts) == (7 if name == "ddpm" else steps)
    # the same forwards: batch 2B of [uncond; cond] padded to one context length, at the same timesteps
    assert seen["sampler"] == seen["bare"]
    assert seen["bare"][0][0] == (6, 4, 4, 4) and seen["bare"][0][1] == (6, 5, 6)


def test_report_json_and_table(shapes_data, tmp_path):
    out = tmp_path / "bench.json"
    report = run_bench("sampling", json_out=str(out), device="cpu", data_dir=str(shapes_data),
                       work_dir=str(tmp_path / "work"), settings=Settings(**TINY))
    saved = json.loads(out.read_text())
    assert saved["rows"] == report["rows"]
    assert {"cpu", "cpu_cores", "torch", "lightning", "device", "load_average_1min"} <= set(saved["machine"])
    assert saved["machine"]["device"] == "cpu"
    names = [r["name"] for r in saved["rows"]]
    assert names == ["ddpm (6 steps)", "ddim (3 steps)", "dpmpp_2m (3 steps)", "cfg batch 4"]
    for r in saved["rows"]:
        assert {"section", "name", "metric", "framework", "baseline", "ratio", "target", "meets_target"} <= set(r)
        assert r["framework"] > 0 and r["baseline"] > 0
        assert r["ratio"] == pytest.approx(r["framework"] / r["baseline"])
        op, target = r["target"].split()
        assert r["meets_target"] == (r["ratio"] <= float(target) if op == "<=" else r["ratio"] >= float(target))
    details = saved["details"]["sampling"]
    assert [details[n]["unet_calls"] for n in ("ddpm", "ddim", "dpmpp_2m")] == [6, 3, 3]
    # the reported ratio is the ratio of the reported medians of the interleaved runs
    ddim = details["ddim"]
    assert saved["rows"][1]["framework"] == pytest.approx(statistics.median(ddim["sampler_seconds"]))

    table = format_table(saved)
    assert "ddim (3 steps)" in table and f"{saved['rows'][1]['ratio']:.3f}" in table
    assert saved["machine"]["cpu"] in table.splitlines()[0]


def test_row_ratio_and_target():
    r = row("train", "clip", "steps/s", 9.0, 10.0, ">=", 0.95)
    assert r["ratio"] == pytest.approx(0.9) and r["meets_target"] is False and r["target"] == ">= 0.95"
    r = row("eval", "clip", "s/eval", 3.0, 6.0, "<=", 0.6)
    assert r["ratio"] == pytest.approx(0.5) and r["meets_target"] is True


def test_flop_counts_scale_with_batch_and_backward_costs_about_twice_forward():
    cfg = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
               attention_resolutions=[2], head_dim=8, norm_groups=4, context_dim=32)
    one, three = unet_step_flops(cfg, 1, 8, 7), unet_step_flops(cfg, 3, 8, 7)
    assert three["total_flops"] == 3 * one["total_flops"]  # matmuls and convolutions only: linear in batch
    assert three["params"] == sum(p.numel() for p in UNet(cfg).parameters())
    # grad of inputs and of weights: 2x forward, except the first conv (its input needs no gradient)
    assert one["forward_flops"] < one["backward_flops"] < 2 * one["forward_flops"]
    # Conv2d(4 -> 16, 3x3) at 8x8: the closed form of the first layer alone is part of the forward count
    assert one["forward_flops"] > 2 * 8 * 8 * 16 * 4 * 9


def test_train_step_flops_of_the_ldm(tiny_ckpts, tmp_path):
    module, _, _ = build_stage("ldm", tiny_ckpts["data"], tmp_path, quick=True,
                               clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]))
    batch = prebuilt_batches(tiny_ckpts["data"], 16, 2, 1, "cpu")[0]
    flops = train_step_flops(module, batch)
    assert flops["batch_size"] == 2 and flops["denoiser_class"] == "UNet"
    assert 0 < flops["denoiser"] < flops["total"]  # frozen CLIP text and VAE encoder forwards come on top
    assert all(p.grad is None for p in module.parameters())
    # the U-Net's share of the real step is one forward + backward of the U-Net alone at the step's shapes (2 latents,
    # the tokenizer's context length, the pooled text embedding of the quick config), attention included
    cfg = module.unet.config
    assert cfg.pooled_dim
    shapes = (cfg.in_channels, 2, module.latent_size, cfg.context_dim, module.clip.tokenizer.context_length,
              cfg.pooled_dim)
    alone = denoiser_step_flops(lambda: UNet(cfg), *shapes, device="cpu")
    assert flops["denoiser"] == alone["total_flops"]
    # on the meta device: the same forward; the backward without the fused attention's recomputed scores
    meta = unet_step_flops(dataclasses.asdict(cfg), 2, module.latent_size, module.clip.tokenizer.context_length)
    assert meta == denoiser_step_flops(lambda: UNet(cfg), *shapes)
    assert meta["forward_flops"] == alone["forward_flops"]
    assert 0.9 * alone["backward_flops"] < meta["backward_flops"] < alone["backward_flops"]


def test_train_rows_of_the_dit_stage_report_its_flops_and_mfu(tiny_ckpts, tmp_path):
    """`bench train`'s DiT + flow row: Lightning vs the plain loop on the same module, FLOPs of the real step (the
    DiT's share = the DiT alone at the step's shapes) and MFU = FLOPs / Lightning's step time / peak."""
    from lit_diffusion.bench.train import bench_train
    from lit_diffusion.models.dit import DiT

    settings = Settings(quick=True, repeats=1, train_warmup=1, train_measured=2)
    rows, details = bench_train(tiny_ckpts["data"], tmp_path, "cpu", settings, clip_ckpt=str(tiny_ckpts["clip"]),
                                vae_ckpt=str(tiny_ckpts["vae"]), stages=("ldm_dit",), peak_flops=1e12)
    (r,) = rows
    d = details["ldm_dit"]
    assert r["name"] == "ldm_dit" and r["target"] == ">= 0.95"
    assert r["framework"] == pytest.approx(1 / statistics.median(d["lightning_step_seconds"]))
    assert r["ratio"] == pytest.approx(statistics.median(d["plain_step_seconds"]) /
                                       statistics.median(d["lightning_step_seconds"]))
    flops = d["flops_per_step"]
    assert flops["denoiser_class"] == "DiT" and flops["batch_size"] == 16
    assert d["mfu"] == pytest.approx(flops["total"] * r["framework"] / 1e12)

    module, _, _ = build_stage("ldm_dit", tiny_ckpts["data"], tmp_path, quick=True,
                               clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]))
    assert module.objective == "flow" and d["params_trained"] == sum(p.numel() for p in module.dit.parameters())
    cfg = module.dit.config
    alone = denoiser_step_flops(lambda: DiT(cfg), cfg.in_channels, 16, module.latent_size, cfg.context_dim,
                                module.clip.tokenizer.context_length, cfg.pooled_dim, device="cpu")
    assert flops["denoiser"] == alone["total_flops"] < flops["total"]


class PixelDenoiser(torch.nn.Module):
    """Not a U-Net: a per-pixel linear map plus projected text features, behind the shared denoiser call."""

    def __init__(self, channels: int, context_dim: int, pooled_dim: int):
        super().__init__()
        self.pixel = torch.nn.Linear(channels, channels)
        self.context = torch.nn.Linear(context_dim, channels)
        self.pooled = torch.nn.Linear(pooled_dim, channels)

    def forward(self, x, t, cond):
        h = self.pixel(x.movedim(1, -1))  # [B, H, W, C]
        text = self.context(cond.context).mean(1) + self.pooled(cond.pooled)  # [B, C]
        return (h + text[:, None, None]).movedim(-1, 1)  # [B, C, H, W]


def test_denoiser_step_flops_of_any_network_match_the_closed_form():
    b, c, s, length, d, e = 3, 4, 8, 5, 6, 7
    flops = denoiser_step_flops(lambda: PixelDenoiser(c, d, e), c, b, s, context_dim=d, context_len=length,
                                pooled_dim=e)
    forward = 2 * b * (s * s * c * c + length * d * c + e * c)  # three matmuls, 2 FLOPs per multiply-add
    assert flops["forward_flops"] == forward
    assert flops["backward_flops"] == forward  # no input needs a gradient: one weight-gradient matmul per layer
    assert flops["params"] == (c + 1) * c + (d + 1) * c + (e + 1) * c


@pytest.mark.parametrize("joint", [False, True])
def test_denoiser_step_flops_of_a_dit(joint):
    dit = pytest.importorskip("lit_diffusion.models.dit")  # the DiT backbone is written on its own branch
    cfg = dit.DiTConfig(hidden_size=64, depth=2, num_heads=4, context_dim=32, pooled_dim=16, joint_attention=joint)
    shapes = (cfg.in_channels, 2, 8, cfg.context_dim, 7, cfg.pooled_dim)
    meta = denoiser_step_flops(lambda: dit.DiT(cfg), *shapes)
    cpu = denoiser_step_flops(lambda: dit.DiT(cfg), *shapes, device="cpu")
    # attention by the math path (meta) or CPU's fused kernel (counted by bench's own formula): the same forward
    assert meta["forward_flops"] == cpu["forward_flops"] > 0
    assert meta["backward_flops"] < cpu["backward_flops"]  # the fused backward recomputes the attention scores
    six = denoiser_step_flops(lambda: dit.DiT(cfg), cfg.in_channels, 6, *shapes[2:])
    assert six["total_flops"] == 3 * meta["total_flops"]


def test_denoiser_network_is_the_one_trainable_child():
    stage = torch.nn.Module()
    stage.encoder = torch.nn.Linear(2, 2).requires_grad_(False)
    stage.net = torch.nn.Linear(2, 2)
    stage.compiled = torch.compile(stage.net)  # shares the net's parameters: not a second denoiser
    assert denoiser_network(stage) is stage.net
    stage.other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"2 child modules with trainable parameters \(net, other\)"):
        denoiser_network(stage)


def test_ldm_base_config(tiny_ckpts, tmp_path):
    """configs/ldm/base.yaml: 256 px, f=8 latents 32x32x4, a U-Net of the stated size, GPU switches on."""
    from lightning.pytorch.cli import LightningCLI

    raw = yaml.safe_load((CONFIGS / "ldm" / "base.yaml").read_text())
    model = raw["model"]["init_args"]
    assert raw["trainer"]["precision"] == "bf16-mixed" and raw["trainer"]["accelerator"] == "gpu"
    assert model["compile"] is True and model["channels_last"] is True and model["image_size"] == 256
    assert raw["data"]["init_args"]["pin_memory"] is True and raw["data"]["init_args"]["persistent_workers"] is True
    clip_base = yaml.safe_load((CONFIGS / "clip" / "base.yaml").read_text())["model"]["init_args"]
    vae_base = yaml.safe_load((CONFIGS / "vae" / "base.yaml").read_text())["model"]["init_args"]
    assert 2 ** (len(vae_base["arch"]["ch_mult"]) - 1) == 8 and vae_base["arch"]["z_channels"] == 4

    est = unet_step_flops({**model["unet"], "context_dim": clip_base["text"]["width"]}, 1, 32)
    assert 2e8 < est["params"] < 9e8
    assert f"{est['params']:,}" in (CONFIGS / "ldm" / "base.yaml").read_text()  # the comment states it

    # builds with LightningCLI (CPU, a narrow U-Net, tiny f=8 VAE / CLIP stand-ins for the stage checkpoints)
    from lit_diffusion.stages.clip import CLIPModule
    from lit_diffusion.stages.vae import VAEModule

    clip = CLIPModule(tokenizer_path=str(tiny_ckpts["data"] / "tokenizer.json"), embed_dim=16,
                      vision=dict(image_size=16, patch_size=8, width=16, layers=1, heads=2),
                      text=dict(width=16, layers=1, heads=2))
    vae = VAEModule(arch=dict(base_channels=8, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=4,
                              mid_attention=False, norm_groups=4))
    raw["model"]["init_args"].update(clip_ckpt=str(save_stage_checkpoint(clip, tmp_path / "clip.ckpt")),
                                     vae_ckpt=str(save_stage_checkpoint(vae, tmp_path / "vae.ckpt")))
    raw["model"]["init_args"]["unet"].update(model_channels=16, head_dim=8, norm_groups=4)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(raw))
    cli = LightningCLI(run=False, save_config_callback=None,
                       args=["--config", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1",
                             "--trainer.strategy=auto", "--trainer.precision=32", "--trainer.logger=false"])
    assert cli.model.latent_size == 32 and cli.model.latent_channels == 4
    assert cli.model.unet.config.context_dim == 16 and cli.model.unet.config.use_checkpoint is False
    assert cli.datamodule.image_size == 256 and cli.datamodule.pin_memory is True


@pytest.mark.slow
def test_memory_runs_train_the_same_steps_on_1x_and_10x_shards(tmp_path):
    settings = Settings(quick=True, repeats=1, memory_steps=3, memory_shard_size=8, memory_pixels=32)
    rows, details = bench_memory(tmp_path, settings, num_workers=0)
    assert details["steps"] == {"1x": [3], "10x": [3]}
    assert details["shards"] == {"1x": [2], "10x": [20]}
    assert details["data_mib"]["10x"] == pytest.approx(10 * details["data_mib"]["1x"])
    run_1x, run_10x = details["runs"]["1x"][0], details["runs"]["10x"][0]
    for run in (run_1x, run_10x):
        assert run["main_peak_rss_kib"] > 100 * 1024  # torch + Lightning + the model: a real process
        assert run["peak_rss_kib"] == max(run["main_peak_rss_kib"], run["worker_peak_rss_kib"])
    (r,) = rows
    assert r["framework"] == pytest.approx(run_10x["peak_rss_kib"] / 1024)
    assert r["ratio"] == pytest.approx(run_10x["peak_rss_kib"] / run_1x["peak_rss_kib"])


def test_cli_dispatches_bench(monkeypatch, tmp_path, capsys):
    from lit_diffusion import cli

    calls = {}

    def fake_run_bench(what, **kwargs):
        calls.update(what=what, **kwargs)
        return {"machine": {"cpu": "X", "cpu_cores": 2, "cpu_cores_usable": 2, "torch": "t", "lightning": "l",
                            "device": "cpu", "load_average_1min": 1.0},
                "rows": [row("eval", "clip", "s/eval", 1.0, 2.0, "<=", 0.6)], "notes": ["n"]}

    monkeypatch.setattr("lit_diffusion.bench.run_bench", fake_run_bench)
    cli.main(["bench", "eval", "--quick", "--json", str(tmp_path / "b.json"), "--repeats", "4"])
    assert calls["what"] == "eval" and calls["quick"] is True and calls["repeats"] == 4
    assert calls["json_out"] == str(tmp_path / "b.json")
    out = capsys.readouterr().out
    assert "0.500" in out and "note: n" in out


@pytest.mark.parametrize("kind", ["images", "clips"])
def test_the_loaders_peak_memory_is_the_child_process_own(kind, shapes_data, tmp_path):
    """bench data / video measure a spawned child's peak RSS at 1x and 10x the shards. ru_maxrss of a spawned
    child starts at its parent's peak (exec keeps it), so both read the bench process's own peak and the row could
    not fail; the child's VmHWM is its own."""
    from lit_diffusion.bench import data, video
    from lit_diffusion.bench.memory import _vm_hwm_kib

    if _vm_hwm_kib() is None:
        pytest.skip("no /proc/self/status VmHWM on this system")
    ballast = bytearray(1536 * 2**20)  # 1.5 GiB touched in this process
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    parent = _vm_hwm_kib() / 1024
    if kind == "images":
        child = data.peak_rss_mb(str(shapes_data / "train-*.tar"), 16, 8, 2, None)
    else:
        from lit_diffusion.data.moving_shapes import write_moving_shapes

        write_moving_shapes(tmp_path, train=16, val=0, size=16, frames=2, shard_size=16, seed=0)
        child = video.peak_rss_mb(str(tmp_path / "train-*.tar"), 16, 2, 4, 2)
    del ballast
    assert 50 < child < parent - 1024, (child, parent)
