"""The remote code of an exported pipeline (`export/pipeline.py`): source files written into the diffusers folder,
which `DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` imports without lit_diffusion installed.

- `lit_diffusion_pipeline.py` (this folder): the `LitDiffusionPipeline`, copied as it is into the folder's root:
  images, a video model's clips (`num_frames`), an unCLIP decoder's images from `image_embeds` (or `image`).
- `prior_source()`: with `export --prior`, `prior/lit_diffusion_prior.py`: our unCLIP prior (models/conditions,
  attention, transformer, layers, prior) and a `LitDiffusionPrior` wrapper holding the embedding standardisation.
- `lit_diffusion_scheduler.py` (this folder): `LitDiffusionFlowHeunScheduler`, our flow `heun` sampler, copied as it
  is into scheduler/ when that is the checkpoint's default sampler.
- `denoiser_source(kind)`: the denoiser's module, `unet/lit_diffusion_unet.py` or
  `transformer/lit_diffusion_dit.py`: our own network source (models/conditions, attention, transformer, layers,
  unet or dit), concatenated with its `lit_diffusion` imports removed, so the exported network runs the very code
  that trained it, plus a `ModelMixin, ConfigMixin` wrapper whose config keys are the `UNetConfig` / `DiTConfig`
  fields and whose weights are our `unet.*` / `dit.*` state dict as it is in ldm.ckpt.

Why remote code rather than diffusers' own `UNet2DConditionModel`: ours is the ADM / LDM U-Net it implements only
for some configurations. It could hold exactly a U-Net with `scale_shift_norm` (ResnetBlock2D's "scale_shift"),
`context_layers` 0, `pos_embed` off, every width divisible by `norm_groups` (diffusers has one group count; ours
takes the gcd per layer), no temporal or space-time attention (a video U-Net), no `size_conditioning` (SDXL's
"text_time" embeds the sizes concatenated with the pooled text through one MLP; ours adds a separate MLP's output)
and no `image_embedding_dim`, with a key map (down / mid / up blocks, `transformer_depth` as
transformer_layers_per_block, GEGLU `ff.net.0.proj`, the pooled text as class_embed_type "projection"). The DiT has
no diffusers twin at all (PixArt's and SD3's transformers differ in the text pre-norm, the cross-attention's qkv
biases and the adaLN layout). One remote module covers every configuration with the code that trained it, and
`export_denoiser` re-imports bit for bit; a mapping onto UNet2DConditionModel for the configurations above is left
to do.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import lit_diffusion.models as _models

PIPELINE_FILE = Path(__file__).with_name("lit_diffusion_pipeline.py")
PIPELINE_MODULE, PIPELINE_CLASS = "lit_diffusion_pipeline", "LitDiffusionPipeline"
# our flow `heun` sampler as a scheduler (diffusers' FlowMatchHeunDiscreteScheduler cannot take our time grid),
# copied as it is into the folder's scheduler/
SCHEDULER_FILE = Path(__file__).with_name("lit_diffusion_scheduler.py")
SCHEDULER_MODULE, SCHEDULER_CLASS = "lit_diffusion_scheduler", "LitDiffusionFlowHeunScheduler"
# our network: (module file stem in the exported folder, wrapper class, the folder, attribute / state-dict prefix)
DENOISERS = {
    "unet": ("lit_diffusion_unet", "LitDiffusionUNet", "unet", ("conditions", "attention", "transformer", "layers",
                                                                  "unet")),
    "dit": ("lit_diffusion_dit", "LitDiffusionDiT", "transformer", ("conditions", "attention", "layers", "dit")),
}
_NETWORKS = {"unet": ("UNet", "UNetConfig"), "dit": ("DiT", "DiTConfig")}
# unCLIP's prior (`export --prior`): (module file stem, wrapper class, folder, our modules it is built from)
PRIOR = ("lit_diffusion_prior", "LitDiffusionPrior", "prior", ("conditions", "attention", "transformer", "layers",
                                                               "prior"))

WHY = """Why remote code: diffusers' UNet2DConditionModel could hold exactly only a U-Net with scale_shift_norm,
context_layers 0, pos_embed off, widths divisible by norm_groups, no size_conditioning or image_embedding_dim
(lit_diffusion/export/remote/__init__.py says why); the DiT has no diffusers twin. This module
runs every configuration with the code that trained it, and its weights are the training checkpoint's."""

_WRAPPER = '''

# ---------------------------------------------------------------------------------------------- diffusers wrapper
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402


@dataclass
class LitDiffusionDenoiserOutput(BaseOutput):
    sample: Tensor  # the raw prediction [B, C, H, W]: eps / v / x0 or the flow velocity, as the model was trained


class {wrapper}(ModelMixin, ConfigMixin):
    """lit_diffusion's {net} as a diffusers model: the config keys are {config}'s fields, the weights live under
    `{attr}.` exactly as in the training checkpoint."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, {signature}):
        super().__init__()
        fields = dict({arguments})
        fields = {{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}}
        self.{attr} = {net}({config}(**fields))

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None, pooled_projections: Tensor | None = None,
                added_cond_size: Tensor | None = None, image_embeds: Tensor | None = None,
                return_dict: bool = True):
        """sample [B, C, H, W], timestep [B] or a scalar (DDPM's index, or the flow time t * 1000), caption token
        features [B, L, W] and their mask [B, L] (True on real tokens), pooled text [B, E], size [B, 6]."""
        cond = Conditioning(context=encoder_hidden_states, mask=encoder_attention_mask, pooled=pooled_projections,
                            size=added_cond_size, image_embedding=image_embeds)
        out = self.{attr}(sample, timestep, cond)
        return LitDiffusionDenoiserOutput(sample=out) if return_dict else (out,)
'''


_PRIOR_WRAPPER = '''

# ---------------------------------------------------------------------------------------------- diffusers wrapper
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402


@dataclass
class LitDiffusionPriorOutput(BaseOutput):
    sample: Tensor  # the predicted clean (standardised) CLIP image embedding [B, E]


class {wrapper}(ModelMixin, ConfigMixin):
    """lit_diffusion's unCLIP prior (DiffusionPrior) as a diffusers model: the config keys are PriorConfig's fields,
    the weights live under `prior.` exactly as in prior.ckpt, beside the standardisation of CLIP image embeddings
    (`embedding_mean`, `embedding_std`): the prior samples standardised embeddings, `to_clip_space` maps them back."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, {signature}):
        super().__init__()
        self.prior = DiffusionPrior(PriorConfig({arguments}))
        self.register_buffer("embedding_mean", torch.zeros(embed_dim))
        self.register_buffer("embedding_std", torch.ones(embed_dim))

    def to_clip_space(self, x: Tensor) -> Tensor:
        """A standardised sample [B, E] back into CLIP's space: de-standardised and L2-normalised."""
        return F.normalize(x.float() * self.embedding_std + self.embedding_mean, dim=-1)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None, pooled_projections: Tensor | None = None,
                return_dict: bool = True):
        """sample [B, E] (standardised), timestep [B] (DDPM's index, or the flow time t * 1000), the caption's token
        features [B, L, W], their mask [B, L] and its pooled embedding [B, E] (L2-normalised) -> x0 [B, E]."""
        cond = Conditioning(context=encoder_hidden_states, mask=encoder_attention_mask, pooled=pooled_projections)
        out = self.prior(sample, timestep, cond)
        return LitDiffusionPriorOutput(sample=out) if return_dict else (out,)
'''


def _module_body(stem: str) -> tuple[list[str], str]:
    """(import lines, the rest) of `models/<stem>.py`: its module docstring, `from __future__` and lit_diffusion
    imports dropped."""
    path = Path(_models.__file__).with_name(f"{stem}.py")
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    drop, imports = set(), []
    for i, node in enumerate(tree.body):
        span = range(node.lineno - 1, node.end_lineno)
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            drop.update(span)  # the module docstring
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(span)
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if module not in ("__future__",) and not module.startswith("lit_diffusion"):
                imports.append("\n".join(lines[node.lineno - 1:node.end_lineno]))
    body = "\n".join(line for n, line in enumerate(lines) if n not in drop).strip("\n")
    return imports, f"# {'-' * 40} lit_diffusion/models/{stem}.py\n{body}\n"


def denoiser_source(kind: str) -> str:
    """The self-contained module file of our `kind` ("unet" or "dit") network and its diffusers wrapper."""
    stem, wrapper, _, parts = DENOISERS[kind]
    net, config = _NETWORKS[kind]
    imports, bodies = [], []
    for part in parts:
        found, body = _module_body(part)
        imports += [i for i in found if i not in imports]
        bodies.append(body)
    config_cls = getattr(__import__(f"lit_diffusion.models.{kind}", fromlist=[config]), config)
    params = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        params.append((f.name, list(default) if isinstance(default, tuple) else default))
    signature = ", ".join(f"{name}={default!r}" for name, default in params)
    arguments = ", ".join(f"{name}={name}" for name, _ in params)
    header = (f'"""lit_diffusion\'s {net} as diffusers remote code ({wrapper}), generated by `lit-diffusion export` '
              f'from the\nlit_diffusion source that trained it; needs torch and diffusers only.\n\n{WHY}"""\n\n'
              f"from __future__ import annotations\n\n")
    source = header + "\n".join(imports) + "\n\n\n" + "\n\n".join(bodies) + _WRAPPER.format(
        wrapper=wrapper, net=net, config=config, attr=kind, signature=signature, arguments=arguments)
    compile(source, f"{stem}.py", "exec")  # a broken generation fails here, not in the user's from_pretrained
    return source


def prior_source() -> str:
    """The self-contained module file of our unCLIP prior (`models/prior.py` and what it is built from) and its
    diffusers wrapper, for an exported pipeline's prior/ folder."""
    from lit_diffusion.models.prior import PriorConfig

    stem, wrapper, _, parts = PRIOR
    imports, bodies = [], []
    for part in parts:
        found, body = _module_body(part)
        imports += [i for i in found if i not in imports]
        bodies.append(body)
    for needed in ("import torch.nn.functional as F", "import torch"):
        if needed not in imports:
            imports.append(needed)
    params = [(f.name, f.default) for f in dataclasses.fields(PriorConfig)]
    signature = ", ".join(f"{name}={default!r}" for name, default in params)
    arguments = ", ".join(f"{name}={name}" for name, _ in params)
    header = ('"""lit_diffusion\'s unCLIP prior (DiffusionPrior) as diffusers remote code (LitDiffusionPrior), '
              'generated by\n`lit-diffusion export --prior` from the lit_diffusion source that trained it; needs '
              'torch and diffusers only."""\n\nfrom __future__ import annotations\n\n')
    source = header + "\n".join(imports) + "\n\n\n" + "\n\n".join(bodies) + _PRIOR_WRAPPER.format(
        wrapper=wrapper, signature=signature, arguments=arguments)
    compile(source, f"{stem}.py", "exec")
    return source
