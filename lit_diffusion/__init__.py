"""lit_diffusion: train CLIP, a VAE and latent diffusion from image-caption shards."""

__version__ = "0.1.0"
