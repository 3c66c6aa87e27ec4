"""The stages in training order and the figures each one's one-line summary and the report show."""

STAGES = ("clip", "vae", "ldm")
STAGE_KEYS = {  # the figures a stage's one-line summary and the report show
    "clip": ("val/i2t_r1", "val/t2i_r1", "val/zeroshot_acc", "val/negative_acc", "val/loss"),
    "vae": ("val/psnr", "val/ssim", "val/rfid", "val/latent_std"),
    "ldm": ("val/loss", "train/loss"),
}
