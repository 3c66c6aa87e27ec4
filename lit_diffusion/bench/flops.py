"""Model FLOPs per training step, counted by torch's FlopCounterMode, for MFU on a GPU; any denoiser with the
shared call `(x_t, t, context, mask, pooled)` (UNet, DiT).

`train_step_flops` counts one real LDM step and the trained denoiser's share of it; `denoiser_step_flops` counts one
forward + backward of a denoiser on the meta device (no compute, any size), e.g.
`denoiser_step_flops(lambda: DiT(cfg), in_channels, batch, latent_size, context_dim, context_len, pooled_dim)`;
`unet_step_flops` and `dit_step_flops` are that for a UNetConfig or DiTConfig, which `base_config_estimate` uses to
size the GPU configs (configs/ldm/base*.yaml).
"""

from __future__ import annotations

from pathlib import Path

from lit_diffusion.bench.common import CONFIG_DIR

# dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU; --peak-tflops overrides
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def flop_counter():
    """FlopCounterMode that also counts CPU's fused attention kernel: torch's table has the formulas of the CUDA
    attention kernels and of the math path (bmm) that the meta device takes, not of this one, so a step on the CPU
    would count no attention at all."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={  # the formulas get shapes; q, k, v [B, heads, L, head_dim]
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad_out, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v)})


def denoiser_network(module):
    """The stage's denoiser (U-Net, DiT, ...): its one child module with trainable parameters. CLIP and the VAE
    inside the LDM stage are frozen; a compiled wrapper shares the denoiser's parameters and is skipped."""
    found, seen = [], set()
    for name, child in module.named_children():
        params = {id(p) for p in child.parameters() if p.requires_grad}
        if params and not params & seen:
            found.append((name, child))
        seen |= params
    if len(found) != 1:
        raise ValueError(f"bench flops: {type(module).__name__} has {len(found)} child modules with trainable "
                         f"parameters ({', '.join(n for n, _ in found) or 'none'}); expected one, the denoiser")
    return found[0][1]


def train_step_flops(module, batch: dict) -> dict:
    """Model FLOPs of one LDM training step (frozen CLIP/VAE forwards + denoiser forward and backward), counted by
    FlopCounterMode on a real step, whatever the denoiser; `denoiser` is its share."""
    import torch

    net = denoiser_network(module)
    module.train()
    counter = flop_counter()
    with counter:
        loss = module.model_step(batch, train=True)
        loss.backward()
    module.zero_grad(set_to_none=True)
    # FlopCounterMode names a module called from outside any other by its class (the stage's methods call the
    # denoiser, not a parent forward); the count includes the backward through it
    share = sum(counter.get_flop_counts().get(type(net).__name__, {}).values())
    return {"total": int(counter.get_total_flops()), "denoiser": int(share), "denoiser_class": type(net).__name__,
            "batch_size": int(batch["image"].shape[0]), "device": str(next(module.parameters()).device),
            "torch": torch.__version__}


def denoiser_step_flops(build, in_channels: int, batch_size: int, latent_size: int, context_dim: int | None = None,
                        context_len: int = 77, pooled_dim: int | None = None, device: str = "meta") -> dict:
    """Parameters and FLOPs of one forward + backward of the denoiser `build()` makes (any network with the shared
    call `(x_t, t, cond)`: UNet, DiT) at `batch_size`, plus the bytes autograd saves for backward
    (fp32; bf16-mixed keeps most of them in half). On the meta device (no compute, any size) attention takes the
    math path, whose backward reuses the saved scores; a fused kernel (flash, CPU's) recomputes them, one more
    [L_q, L_k] matmul per attention, which its count includes."""
    import torch

    from lit_diffusion.models.conditions import Conditioning

    with torch.device(device):
        net = build()
        x = torch.randn(batch_size, in_channels, latent_size, latent_size)  # [B, C, H, W]
        t = torch.zeros(batch_size, dtype=torch.long)  # [B]
        ctx = torch.randn(batch_size, context_len, context_dim) if context_dim else None  # [B, L, D]
        mask = torch.ones(batch_size, context_len, dtype=torch.bool) if context_dim else None  # [B, L]
        pooled = torch.randn(batch_size, pooled_dim) if pooled_dim else None  # [B, E]
    params = {id(p) for p in net.parameters()}
    saved = 0

    def pack(tensor):
        nonlocal saved
        if id(tensor) not in params:
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with flop_counter() as fwd_counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = net(x, t, Conditioning(context=ctx, mask=mask, pooled=pooled))
    with flop_counter() as bwd_counter:
        out.float().pow(2).mean().backward()
    forward, backward = int(fwd_counter.get_total_flops()), int(bwd_counter.get_total_flops())
    return {"params": sum(p.numel() for p in net.parameters()), "batch_size": batch_size,
            "forward_flops": forward, "backward_flops": backward, "total_flops": forward + backward,
            "saved_activation_bytes_fp32": saved}


def unet_step_flops(unet_config: dict, batch_size: int, latent_size: int, context_len: int = 77) -> dict:
    """`denoiser_step_flops` of the UNet that `unet_config` (UNetConfig fields) describes."""
    from lit_diffusion.models.unet import UNet, UNetConfig

    cfg = UNetConfig.from_dict(unet_config)
    return denoiser_step_flops(lambda: UNet(cfg), cfg.in_channels, batch_size, latent_size, cfg.context_dim,
                               context_len, cfg.pooled_dim)


def peak_flops_for(device_name: str | None) -> float | None:
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if device_name and fragment in device_name:
            return flops
    return None


def dit_step_flops(dit_config: dict, batch_size: int, latent_size: int, context_len: int = 77) -> dict:
    """`denoiser_step_flops` of the DiT that `dit_config` (DiTConfig fields, or a `preset` and overrides) describes."""
    from lit_diffusion.models.dit import DiT, DiTConfig

    cfg = DiTConfig.from_dict(dict(dit_config))
    return denoiser_step_flops(lambda: DiT(cfg), cfg.in_channels, batch_size, latent_size, cfg.context_dim,
                               context_len, cfg.pooled_dim)


def base_config_estimate(path: Path | None = None, clip_config: Path | None = None) -> dict:
    """Parameters, FLOPs per step and memory per device of a GPU-scale LDM config (configs/ldm/base.yaml by default)
    at its batch, whichever denoiser it names (`unet:` or `dit:`), conditioned on the text tower of `clip_config`
    (configs/clip/base.yaml). On the meta device: nothing is computed or allocated. Under an FSDP strategy, weights,
    gradients and AdamW state are sharded: divide `weights_grads_adam_gib_fp32` by the number of devices."""
    import yaml

    path = Path(path or CONFIG_DIR / "ldm" / "base.yaml")
    cfg = yaml.safe_load(path.read_text())
    clip = yaml.safe_load(Path(clip_config or CONFIG_DIR / "clip" / "base.yaml").read_text())["model"]["init_args"]
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    name = "dit" if model.get("dit") else "unet"
    net = {**model[name], "context_dim": int(clip["text"]["width"])}
    if model.get("pooled_text"):
        net["pooled_dim"] = int(clip["embed_dim"])
    latent = int(model["image_size"]) // 8  # the f=8 VAE of configs/vae/base.yaml
    est = (dit_step_flops if name == "dit" else unet_step_flops)(net, 1, latent)
    batch = int(data["batch_size"])
    strategy = (cfg.get("trainer") or {}).get("strategy")
    strategy = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy)
    return {"config": str(path), "denoiser": name, "params": est["params"], "latent_size": latent,
            "per_device_batch": batch, "forward_flops_per_sample": est["forward_flops"],
            "train_flops_per_sample": est["total_flops"], "train_flops_per_step": est["total_flops"] * batch,
            "saved_activation_gib_fp32_per_device": est["saved_activation_bytes_fp32"] * batch / 2**30,
            # fp32 weights + grads + AdamW's two moments (+ an EMA copy where the config keeps one)
            "weights_grads_adam_gib_fp32": est["params"] * (4 + 4 + 8) / 2**30,
            "ema_gib_fp32": est["params"] * 4 / 2**30, "sharded": "fsdp" in strategy.lower()}
