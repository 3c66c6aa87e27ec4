"""Model FLOPs per training step, counted by torch's FlopCounterMode, for MFU on a GPU.

`train_step_flops` counts one real LDM step; `unet_step_flops` counts one U-Net forward + backward on the meta device
(no compute, any size), which `base_config_estimate` uses to size configs/ldm/base.yaml.
"""

from __future__ import annotations

from pathlib import Path

from lit_diffusion.bench.common import CONFIG_DIR

# dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU; --peak-tflops overrides
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def train_step_flops(module, batch: dict) -> dict:
    """Model FLOPs of one LDM training step (frozen CLIP/VAE forwards + U-Net forward and backward), counted by
    FlopCounterMode on a real step; `unet` is the U-Net's share."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = module.model_step(batch, train=True)
        loss.backward()
    module.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()
    unet = sum(counts.get("UNet", {}).values())  # FlopCounterMode names modules by class from the outermost
    return {"total": int(counter.get_total_flops()), "unet": int(unet), "batch_size": int(batch["image"].shape[0]),
            "device": str(next(module.parameters()).device), "torch": torch.__version__}


def unet_step_flops(unet_config: dict, batch_size: int, latent_size: int, context_len: int = 77) -> dict:
    """U-Net parameters and FLOPs of one forward + backward at `batch_size`, on the meta device (no compute, any
    size), plus the bytes autograd saves for backward (fp32; bf16-mixed keeps most of them in half)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lit_diffusion.models.unet import UNet, UNetConfig

    cfg = UNetConfig.from_dict(unet_config)
    with torch.device("meta"):
        unet = UNet(cfg)
        x = torch.randn(batch_size, cfg.in_channels, latent_size, latent_size)
        t = torch.zeros(batch_size, dtype=torch.long)
        ctx = torch.randn(batch_size, context_len, cfg.context_dim) if cfg.context_dim else None
        mask = torch.ones(batch_size, context_len, dtype=torch.bool) if cfg.context_dim else None
    params = {id(p) for p in unet.parameters()}
    saved = 0

    def pack(tensor):
        nonlocal saved
        if id(tensor) not in params:
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with FlopCounterMode(display=False) as fwd_counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = unet(x, t, ctx, mask)
    with FlopCounterMode(display=False) as bwd_counter:
        out.float().pow(2).mean().backward()
    forward, backward = int(fwd_counter.get_total_flops()), int(bwd_counter.get_total_flops())
    return {"params": sum(p.numel() for p in unet.parameters()), "batch_size": batch_size,
            "forward_flops": forward, "backward_flops": backward, "total_flops": forward + backward,
            "saved_activation_bytes_fp32": saved}


def peak_flops_for(device_name: str | None) -> float | None:
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if device_name and fragment in device_name:
            return flops
    return None


def base_config_estimate(path: Path | None = None) -> dict:
    """Parameters, FLOPs per step and saved-activation memory of configs/ldm/base.yaml's U-Net at its batch."""
    import yaml

    path = path or CONFIG_DIR / "ldm" / "base.yaml"
    cfg = yaml.safe_load(Path(path).read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    unet = dict(model["unet"])
    unet.setdefault("context_dim", 512)
    latent = int(model["image_size"]) // 8
    est = unet_step_flops(unet, 1, latent)
    batch = int(data["batch_size"])
    return {"config": str(path), "unet_params": est["params"], "latent_size": latent, "per_device_batch": batch,
            "unet_train_flops_per_step": est["total_flops"] * batch,
            "saved_activation_gib_fp32_per_device": est["saved_activation_bytes_fp32"] * batch / 2**30,
            "weights_grads_adam_ema_gib_fp32": est["params"] * (4 + 4 + 8 + 4) / 2**30}

