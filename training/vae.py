"""Stage ``vae``: train an AutoencoderKL on the dataset's images.

Loss: L1 or L2 reconstruction + ``kl_weight`` × KL, and optionally a PatchGAN discriminator with
hinge loss and the adaptive weight of Esser et al. 2021 (VQGAN, eq. 7) after a start step, as in
the latent-diffusion recipe (Rombach et al. 2022, appendix G). After training the latents'
per-channel mean and std on the data are measured; with ``standardise_latents`` they are folded
into the VAE's 1×1 quant convs (every channel zero mean, one std), and ``scaling_factor = 1 / std``
is stored in the VAE's config.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch import nn

from ldm_pipeline.evaluation.metrics import vae_reconstruction_psnr
from ldm_pipeline.loading import load_component
from ldm_pipeline.presets import build_vae

from .checkpoint import GeneratorState
from .config import RunConfig
from .data import ImageSet
from .loop import check_finite, make_optimizer, run_loop, stage_checkpoints
from .quality import psnr_check
from .seeds import seed_of


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a real/fake logit for each overlapping image patch."""

    def __init__(self, channels: int = 32, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(layers):
            out = width * 2
            stride = 2 if i < layers - 1 else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Autoencode(nn.Module):
    """encode → sample → decode as one ``forward``, so DDP sees the call and syncs gradients."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and per-image KL to the unit Gaussian."""
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's λ = ‖∇ L_rec‖ / (‖∇ L_GAN‖ + 1e-4) at the decoder's last layer, clamped to [0, 1e4]."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def _random_crop(x: torch.Tensor, size: int | None, generator: torch.Generator) -> torch.Tensor:
    """One random window of side ``size`` (at most the image's sides) per batch; None: whole."""
    if size is None:
        return x
    height, width = min(size, x.shape[-2]), min(size, x.shape[-1])
    spans = (x.shape[-2] - height + 1, x.shape[-1] - width + 1)
    if spans[0] == spans[1]:
        top, left = torch.randint(0, spans[0], (2,), generator=generator).tolist()
    else:
        top, left = (int(torch.randint(0, span, (1,), generator=generator)) for span in spans)
    return x[..., top : top + height, left : left + width]


def new_vae(cfg: RunConfig) -> AutoencoderKL:
    """The preset's VAE with the encoder's log-variance output biased to ``logvar_init``."""
    vae = build_vae(cfg.model)
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels :] = cfg.vae.logvar_init
    return vae


@torch.no_grad()
def latent_statistics(
    vae: AutoencoderKL, images: ImageSet, batch_size: int = 128, max_images: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of posterior samples per latent channel over (up to ``max_images`` of) the images."""
    vae.eval()
    channels = vae.config.latent_channels
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    generator = torch.Generator(device=vae.device).manual_seed(0)
    seen = 0
    for pixels in images.buckets:
        num = min(len(pixels), max_images - seen)
        for start in range(0, num, batch_size):
            index = torch.arange(start, min(start + batch_size, num))
            z = vae.encode(pixels.float_batch(index).to(vae.device)).latent_dist.sample(generator).double().cpu()
            total += z.sum((0, 2, 3))
            total_sq += z.pow(2).sum((0, 2, 3))
            count += z.numel() // channels
        seen += num
    mean = total / count
    return mean, (total_sq / count - mean**2).clamp(min=0).sqrt()


@torch.no_grad()
def standardise_latents(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> float:
    """Give every latent channel zero mean and the same std (the channels' RMS std, returned), in
    the weights.

    The encoder's 1×1 ``quant_conv`` maps its posterior to (z − mean_c) · s / std_c and the
    decoder's ``post_quant_conv`` undoes it, so images decode exactly as before and any diffusers
    pipeline (which only divides by ``scaling_factor``) reads the new latents correctly. Without
    it a channel with a tenth of another's std is drowned by the noise schedule far earlier, and a
    channel's constant offset is signal the UNet need not learn.
    """
    if not vae.config.use_quant_conv or not vae.config.use_post_quant_conv:
        raise ValueError("standardise_latents needs the VAE's quant_conv and post_quant_conv")
    channels = vae.config.latent_channels
    std = std.clamp(min=1e-6)
    common = std.pow(2).mean().sqrt()
    gain = common / std  # each channel's std becomes the RMS std
    q, p = vae.quant_conv, vae.post_quant_conv
    w = q.weight.dtype
    gain_w, mean_w = gain.to(w), mean.to(w)
    q.weight[:channels] *= gain_w.view(-1, 1, 1, 1)
    q.bias[:channels] = (q.bias[:channels] - mean_w) * gain_w
    q.bias[channels:] += 2 * gain_w.log()  # log-variance: std scales by the gain
    p.bias += p.weight[:, :, 0, 0] @ mean_w
    p.weight /= gain_w.view(1, -1, 1, 1)
    return float(common)


def measure_scaling_factor(vae: AutoencoderKL, images: ImageSet, standardise: bool = False) -> float:
    """1 / std of posterior samples over (up to 4,096 of) the images, after ``standardise_latents``
    with ``standardise``.

    Scaled by it, latents have unit variance, as the noise schedule assumes (Rombach et al.
    2022, section 4.3.2).
    """
    mean, std = latent_statistics(vae, images)
    if standardise:
        return 1.0 / standardise_latents(vae, mean, std)
    # Over all channels: the channels' variances plus the spread of their means.
    return 1.0 / float((std.pow(2) + mean.pow(2)).mean() - mean.mean() ** 2) ** 0.5


def train_vae(
    cfg: RunConfig, train: ImageSet, holdout: ImageSet, out: Path, accelerator: Accelerator, resume: Path | None = None
) -> dict:
    """Train (or load, with ``vae.pretrained``) the VAE, save it to ``out/vae``, return metrics."""
    c = cfg.vae
    if c.pretrained:
        vae = load_component(AutoencoderKL, c.pretrained, "vae", cfg.allow_pickle)
        metrics: dict = {"pretrained": c.pretrained}
    else:
        vae = new_vae(cfg)
        optimizer = make_optimizer(vae.parameters(), c)
        autoencode, optimizer = accelerator.prepare(Autoencode(vae), optimizer)
        batches = train.batches(
            c.batch_size, c.gradient_accumulation_steps, seed_of(cfg.seed, "vae.batches"), accelerator
        )
        use_gan = c.gan_start_step is not None
        disc = d_opt = None
        if use_gan:
            disc = PatchDiscriminator()
            d_opt = make_optimizer(disc.parameters(), c, betas=(0.5, 0.9))
            disc, d_opt = accelerator.prepare(disc, d_opt)
        state: dict = {}

        crop_gen = torch.Generator().manual_seed(seed_of(cfg.seed, "vae.crops"))
        stateful = {"batches": batches, "crop_generator": GeneratorState(crop_gen)}
        if use_gan:
            stateful.update(discriminator=disc, discriminator_optimizer=d_opt)

        def compute_loss(step: int) -> dict[str, torch.Tensor]:
            batch = next(batches)
            x = _random_crop(batch.pixels.float_batch(batch.index), c.crop_size, crop_gen).to(accelerator.device)
            rec, kl = autoencode(x)
            err = (rec.float() - x).abs() if c.loss == "l1" else (rec.float() - x).pow(2)
            rec_loss = err.mean()
            kl = kl.float().mean() / x[0].numel()
            loss = rec_loss + c.kl_weight * kl
            terms = {"rec": rec_loss.detach(), "kl": kl.detach()}
            if use_gan and step >= c.gan_start_step:
                g_loss = -disc(rec).float().mean()
                weight = adaptive_gan_weight(rec_loss, g_loss, vae.decoder.conv_out.weight)
                loss = loss + c.gan_weight * weight * g_loss
                terms["g"] = g_loss.detach()
            state.update(x=x, rec=rec.detach())
            return {"loss": loss, **terms}

        def discriminator_step(step: int) -> dict[str, float]:
            if step < c.gan_start_step:
                return {}
            with accelerator.autocast():
                real, fake = disc(state["x"]).float(), disc(state["rec"]).float()
                d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            accelerator.backward(d_loss)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
            return {"d": float(d_loss.detach())}

        check = psnr_check(vae, holdout, c.eval_every, c.target, c.decay_at) if c.eval_every else None
        result = run_loop(
            accelerator,
            autoencode,
            optimizer,
            compute_loss,
            c,
            desc="vae",
            after_step=discriminator_step if use_gan else None,
            checkpoints=stage_checkpoints(out, "vae", c, stateful, resume),
            quality=check,
        )
        metrics = {"steps": result.steps, "minutes": round(result.minutes, 2), "final_loss": result.final_loss}
        metrics.update(result.quality_report(check))
        if accelerator.is_main_process:
            result.save(out / "logs" / "vae_losses.json")
        vae.register_to_config(scaling_factor=measure_scaling_factor(vae, train, c.standardise_latents))
    vae.eval()
    if len(holdout):
        # Mean over the held-out images of each bucket, weighted by their counts.
        psnr = sum(len(p) * vae_reconstruction_psnr(vae, p.float_batch(torch.arange(len(p)))) for p in holdout.buckets)
        metrics["psnr"] = round(psnr / len(holdout), 3)
    metrics["scaling_factor"] = vae.config.scaling_factor
    check_finite(vae, "the VAE")
    if accelerator.is_main_process:
        vae.save_pretrained(out / "vae")
    accelerator.wait_for_everyone()
    return metrics
