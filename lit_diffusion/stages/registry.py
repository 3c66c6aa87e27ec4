"""The stages in training order and the figures each one's one-line summary and the report show."""

STAGES = ("clip", "vae", "prior", "ldm")
OPTIONAL_STAGES = ("prior",)  # unCLIP's prior: trained when a pipeline config names it (stages.prior)
LATENT_STAGES = ("prior", "ldm")  # the stages that can read latent shards (`encode:`)
STAGE_KEYS = {  # the figures a stage's one-line summary and the report show
    "clip": ("val/i2t_r1", "val/t2i_r1", "val/zeroshot_acc", "val/negative_acc", "val/loss"),
    "vae": ("val/psnr", "val/ssim", "val/rfid", "val/latent_std"),
    "prior": ("val/prior_cos", "val/prior_cos_text_baseline", "val/prior_cos_unrelated", "val/loss"),
    "ldm": ("val/loss", "train/loss"),
}
STAGE_KEY_PREFIXES = {"clip": ("val/binding_acc_",)}  # figures named by the config (one per binding group)


def stage_keys(stage: str, figures: dict) -> tuple[str, ...]:
    """The figures of `figures` a stage's summary and the report show: `STAGE_KEYS`, then those named by its
    config (`STAGE_KEY_PREFIXES`), sorted."""
    prefixes = STAGE_KEY_PREFIXES.get(stage, ())
    named = sorted(k for k in figures if prefixes and k.startswith(prefixes))
    return STAGE_KEYS[stage] + tuple(named)


def configured_stages(cfg: dict) -> tuple[str, ...]:
    """The stages a pipeline config trains or uses, in training order: every required one, and the optional ones
    it names."""
    given = cfg.get("stages") or {}
    return tuple(s for s in STAGES if s not in OPTIONAL_STAGES or given.get(s) is not None)
