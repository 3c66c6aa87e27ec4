"""Evaluation of a video model (a diffusion stage with `frames` > 1) on its val clips, in the loop or offline.

For each guidance scale, every val caption is generated as a clip (the same per-key seed on every rank, as for
images) and measured against the real clips of the val stream, each of which is seen by exactly one rank; every
metric's state is summed over ranks before it is computed:
- `eval/motion_acc_g{g}` and `eval_detail/motion_{attribute}_g{g}`: the motion caption judge
  (`metrics.motion_accuracy`) on the clips whose attributes describe moving shapes;
- `eval/clip_score_g{g}`: CLIP score (100 x cosine, floored at 0) between the video CLIP's clip and caption
  embeddings;
- `eval/fid_frames_g{g}`: FID over single frames, each frame's features its own embedding by the video CLIP as a
  still clip (the frame repeated over the clip's length): how good the frames look, whatever they do;
- `eval/fcd_g{g}`: the Frechet distance between the video CLIP's embeddings of real and generated clips. Ours, not
  FVD: FVD uses an I3D network trained on Kinetics, which is neither available offline nor meaningful for these
  clips; this one uses the stage-1 video CLIP, which has learnt exactly the motions the captions name.
- `eval/motion_acc_vae` and `eval_detail/motion_vae_{one_object,two_objects}`: the judge on the real clips sent
  through the model's VAE and back (encoded and decoded frame by frame, stored as uint8 as samples are): what any
  denoiser over these latents can reach at most.
The real statistics and the VAE's figures are computed in the first evaluation (reduced over ranks) and kept for
the later ones.
`eval_detail/motion_judged` is the number of clips the judge could check (their attributes describe the decoded
frames: `data.video.VideoDecoder` marks the others). Still images in the val stream (joint image and video data)
are skipped and counted in the log. A rank with nothing to generate while another still does makes the same
denoiser calls on a dummy caption when the denoiser is sharded (FSDP all-gathers its weights in every call).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import torch
from torch import Tensor, nn

from lit_diffusion.evaluation.loop import (
    EvalConfig,
    _all_sum,
    _idle_samples,
    _lockstep,
    _take,
    check_guidance_scales,
    sample_seed,
    vae_round_trip,
)
from lit_diffusion.metrics.caption_accuracy import KINDS
from lit_diffusion.metrics.clip_score import CLIPScore
from lit_diffusion.metrics.features import to_uint8
from lit_diffusion.metrics.fid import FID
from lit_diffusion.metrics.motion_accuracy import MotionAccuracy

log = logging.getLogger("lit_diffusion")


class ClipFeatures(nn.Module):
    """Clips [B, T, 3, H, W] in [0, 1] -> the video CLIP's clip embeddings [B, E]; with `still_frames`, frames
    [N, 3, H, W] -> each frame's embedding as a still clip of `frames` copies of it."""

    def __init__(self, clip_module, frames: int, still_frames: bool = False):
        super().__init__()
        self.clip, self.frames, self.still_frames = clip_module, frames, still_frames
        self.num_features = int(clip_module.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.still_frames:
            x = x[:, None].expand(-1, self.frames, -1, -1, -1)
        return self.clip.encode_image(x * 2 - 1).float()


def check_video_clip(clip_module, frames: int) -> None:
    """A `frames`-frame model's figures (CLIP score, FID of frames, FCD) need its frozen CLIP to read clips of as
    many frames: an image CLIP, or one of other clips, is refused here, before training, not at the first
    evaluation. (Only a CLIPModule is checked; a stand-in that embeds clips its own way passes.)"""
    model = getattr(clip_module, "model", None)
    if model is None:
        return
    visual = getattr(model, "visual", None)
    if visual is None or visual.cfg.frames != frames:
        what = ("no image tower" if visual is None else "an image tower (vision.frames 1)" if visual.cfg.frames == 1
                else f"a tower reading {visual.cfg.frames}-frame clips")
        raise ValueError(f"evaluating a {frames}-frame video model needs a CLIP that reads {frames}-frame clips (CLIP "
                         f"score, FID of frames, FCD), but its frozen CLIP (clip_ckpt) has {what}: train the CLIP on "
                         f"the model's clips (configs/clip/moving_shapes.yaml), or leave out the evaluation")


class VideoEvaluator:
    """The metrics of the module docstring, per guidance scale, kept between evaluations (the real statistics)."""

    def __init__(self, config: EvalConfig, clip_module, frames: int):
        if config.aspect_ratios:
            raise ValueError("evaluation aspect_ratios: video models are evaluated at their own size")
        check_guidance_scales(config.guidance)
        check_video_clip(clip_module, frames)
        self.config, self.clip, self.frames = config, clip_module, frames
        self.frame_features = ClipFeatures(clip_module, frames, still_frames=True)
        self.clip_features = ClipFeatures(clip_module, frames)
        guidance = config.guidance
        self.fid_frames = {g: FID(self.frame_features, keep_real=True) for g in guidance}
        self.fcd = {g: FID(self.clip_features, keep_real=True) for g in guidance}
        self.clip_scores = {g: CLIPScore() for g in guidance}
        self.motion = {g: MotionAccuracy() for g in guidance}
        self.motion_vae = MotionAccuracy()  # the real clips through the VAE, in the first evaluation
        self.real_stats: dict | None = None  # "frames" / "clips" -> RealStats, after the first evaluation
        self.vae_figures: dict[str, float] = {}  # the VAE round trip's judge figures, after the first evaluation
        self.timings: list[dict] = []

    def _metrics(self) -> Iterable:
        for by_g in (self.fid_frames, self.fcd, self.clip_scores, self.motion):
            yield from by_g.values()

    @torch.no_grad()
    def run(self, model, loader: Iterable, step: int | None = None) -> dict[str, float]:
        cfg, device = self.config, model.device
        for metric in (*self._metrics(), self.motion_vae):
            metric.to(device)
            metric.reset()
        need_real, g0 = self.real_stats is None, cfg.guidance[0]
        t0, n_local, n_judged, n_stills = time.perf_counter(), 0, 0, 0
        for batch in _lockstep(_take(loader, cfg.num_samples), device):
            if batch is not None and batch["video"].shape[1] != self.frames:
                # still images of a joint image and video val stream: the metrics here are of clips
                n_stills += len(batch["key"])
                batch = None
            if batch is None:  # this rank has no clips to generate now, another may (DDP: it waits below)
                _idle_samples(model, cfg)
                continue
            captions, keys = list(batch["caption"]), list(batch["key"])
            attrs = list(batch.get("attrs") or [{}] * len(captions))
            seeds = [sample_seed(k, cfg.seed) for k in keys]
            if need_real:
                real = ((batch["video"].to(device).float() + 1) / 2).clamp(0, 1)  # [B, T, 3, H, W]
                self.fid_frames[g0].update(real.flatten(0, 1), real=True)
                self.fcd[g0].update(real, real=True)
            _, text_emb = self.clip.encode_text(self.clip.tokenize(captions).to(device))
            judged = [i for i, a in enumerate(attrs)
                      if a and a.get("objects") and "frames" in a and not a.get("partial_window")]
            if need_real and judged:
                self.motion_vae.update(vae_round_trip(model, batch["video"][judged].to(device)).cpu(),
                                       [attrs[i] for i in judged])
            for g in cfg.guidance:
                clips = model.sample(captions, guidance=g, sampler=cfg.sampler, steps=cfg.steps, seed=seeds,
                                     guidance_rescale=cfg.guidance_rescale, clip_x0=cfg.clip_x0)
                clips = to_uint8(clips.flatten(0, 1)).float().div(255).unflatten(0, clips.shape[:2])  # as stored
                self.fid_frames[g].update(clips.flatten(0, 1), real=False)
                self.fcd[g].update(clips, real=False)
                self.clip_scores[g].update(self.clip.encode_image(clips * 2 - 1), text_emb)
                if judged:
                    self.motion[g].update(clips[judged].cpu(), [attrs[i] for i in judged])
            n_local += len(captions)
            n_judged += len(judged)
        if need_real:
            self.real_stats = {"frames": self.fid_frames[g0].real_stats(), "clips": self.fcd[g0].real_stats()}
        for g in cfg.guidance:
            for fid, which in ((self.fid_frames[g], "frames"), (self.fcd[g], "clips")):
                if not fid.real_injected:  # g0's accumulated real images are replaced by their gathered statistics
                    fid.set_real_stats(*self.real_stats[which])
        judged_total = int(_all_sum(torch.tensor(n_judged, device=device)))
        if need_real and judged_total:
            acc = self.motion_vae.attribute_accuracy()
            self.vae_figures = {"eval/motion_acc_vae": acc["correct"],
                                **{f"eval_detail/motion_vae_{k}": acc[k] for k in KINDS if k in acc}}
        results: dict[str, float] = dict(self.vae_figures)
        for g in cfg.guidance:
            if judged_total:
                acc = self.motion[g].attribute_accuracy()
                results[f"eval/motion_acc_g{g:.1f}"] = acc["correct"]
                results.update({f"eval_detail/motion_{k}_g{g:.1f}": v for k, v in acc.items() if k != "correct"})
            results[f"eval/clip_score_g{g:.1f}"] = float(self.clip_scores[g].compute())
            results[f"eval/fid_frames_g{g:.1f}"] = float(self.fid_frames[g].compute())
            results[f"eval/fcd_g{g:.1f}"] = float(self.fcd[g].compute())
        results["eval/num_samples"] = float(_all_sum(torch.tensor(n_local, device=device)))
        results["eval_detail/motion_judged"] = float(judged_total)
        stills = int(_all_sum(torch.tensor(n_stills, device=device)))
        if stills:
            log.info("video evaluation: %d still images of the val stream skipped (the video metrics are of "
                     "%d-frame clips)", stills, self.frames)
        results["eval/seconds"] = time.perf_counter() - t0
        self.timings.append({"step": step, "seconds": results["eval/seconds"], "real_stats": "computed" if need_real
                             else "memory"})
        return results
