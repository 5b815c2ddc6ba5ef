"""Pretrain the toy world's base model: a small latent diffusion model in the diffusers format
(AutoencoderKL, UNet2DConditionModel, CLIP text encoder and tokenizer, DDIM), trained on
freshly drawn scenes, so that its samples show the prompted shape and colour.

    python -m smpo_core.worlds.toy.pretrain OUT_DIR [--vae-steps N] [--unet-steps N] [--seed S]

Two phases: the VAE learns to reconstruct scenes (an L1 loss that weighs the object's pixels as
much as the background's, plus the error of the object's mean colour); then, with the VAE
frozen, the UNet and the text encoder learn to denoise its latents (epsilon prediction,
uniform timesteps, 10% empty captions for classifier-free guidance). Every batch is new
scenes, so nothing is memorised. OUT_DIR gets the pipeline (fp16 safetensors: small enough
to commit) and `pretrain.json`: the command, seed, steps, timings, the sha256 of every weight
file and the detector's verdict on samples ("recognisable": right shape and colour).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smpo_core.store import atomic_dir
from smpo_core.worlds.toy import scenes
from smpo_core.worlds.toy.detector import detect, fidelity

GUIDANCE_SCALE = 3.0  # the scale the toy profile samples with
SAMPLE_STEPS = 20
EMPTY_CAPTION_PROB = 0.1
MAX_TOKENS = 16  # captions are 7 words: padding to CLIP's 77 would only cost time
VAE_LR = 3e-3
#: The UNet cannot draw better than the VAE decodes: below this share of recognisable
#: reconstructions, UNet training would be time spent on a blurred world.
MIN_RECONSTRUCTED = 0.95
RECHECK_STEPS = 250
#: The object covers 5-45% of a scene: an unweighted loss is mostly background, and the VAE
#: learnt it first while blurring the object's edges (its shape) and hue (its colour). The
#: object's pixels together weigh this much against the whole image.
OBJECT_WEIGHT = 1.0
COLOUR_WEIGHT = 1.0  # the squared error of the object's mean colour, which the detector names
#: The encoder's log-variance is fixed at diffusers' floor (-30: std 3e-7): a deterministic
#: autoencoder in AutoencoderKL's format. Sampled latents with a small KL weight kept noise
#: of std ~1 in the posterior, which the decoder learnt to blur over.
LOGVAR_FLOOR = -30.0
EMA_DECAY = 0.999  # the saved UNet and text encoder are averages: constant-lr weights jitter


def build_components(seed: int, width: int = 32) -> dict:
    """Random-initialised components of the toy pipeline (tokenizer, text encoder, VAE with a
    downsampling factor of 4, UNet over 8x8x4 latents, DDIM). Small enough to pretrain on a
    shared CPU in tens of minutes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from smpo_core.worlds.tiny import _sd_scheduler, _text_config, build_clip_tokenizer

    tokenizer = build_clip_tokenizer(scenes.caption_words())
    tokenizer.model_max_length = MAX_TOKENS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer)))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 32),
            layers_per_block=1, latent_channels=4, sample_size=scenes.IMAGE_SIZE,
            # 2 groups, not 8: 8 groups of the first block's 8 channels would normalise each
            # channel alone and wash out absolute colour (measured: colour learnt slower).
            norm_num_groups=2)
        latent = vae.config.latent_channels
        with torch.no_grad():  # the log-variance half of quant_conv's output
            vae.quant_conv.weight[latent:] = 0.0
            vae.quant_conv.bias[latent:] = LOGVAR_FLOOR
        unet = UNet2DConditionModel(
            sample_size=scenes.IMAGE_SIZE // 4, in_channels=4, out_channels=4,
            layers_per_block=1, block_out_channels=(width, 2 * width),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8,
            norm_num_groups=8)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "scheduler": _sd_scheduler()}


def scene_batch(rng: random.Random, size: int) -> tuple[torch.Tensor, list[str]]:
    """`size` fresh scenes as images in [-1, 1] (N, 3, H, W) and their captions."""
    drawn = [scenes.random_scene(rng) for _ in range(size)]
    pixels = np.stack([np.asarray(scenes.draw(s), dtype=np.float32) for s in drawn])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    return images, [scenes.caption(s) for s in drawn]


def vae_batch(rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`size` fresh scenes for the VAE: images in [-1, 1] (N, 3, H, W); how much of each pixel
    is object (N, 1, H, W), 0 on the background and 1 inside, from its distance to the known
    background colour (the anti-aliased edge lies between); the object's colour in [-1, 1]
    (N, 3)."""
    drawn = [scenes.random_scene(rng) for _ in range(size)]
    pixels = np.stack([np.asarray(scenes.draw(s), dtype=np.float32) for s in drawn])
    background = np.array([scenes.BACKGROUNDS[s.background] for s in drawn], dtype=np.float32)
    colour = np.array([scenes.object_rgb(s.colour, s.saturation) for s in drawn],
                      dtype=np.float32)
    full = np.linalg.norm(colour - background, axis=1)[:, None, None]
    mask = np.linalg.norm(pixels - background[:, None, None, :], axis=3) / np.maximum(full, 1.0)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    return (images, torch.from_numpy(np.clip(mask, 0.0, 1.0))[:, None],
            torch.from_numpy(colour) / 127.5 - 1.0)


def vae_loss(recon: torch.Tensor, images: torch.Tensor, mask: torch.Tensor,
             colour: torch.Tensor) -> torch.Tensor:
    """L1 with the object's pixels weighted up to weigh OBJECT_WEIGHT of the image together,
    plus COLOUR_WEIGHT x the squared error of the mean colour of the object's core."""
    area = mask.mean(dim=(2, 3), keepdim=True).clamp_min(1e-3)
    weights = (1.0 + OBJECT_WEIGHT * mask / area) / (1.0 + OBJECT_WEIGHT)
    loss = (weights * (recon - images).abs()).mean()
    core = (mask > 0.7).float()
    mean = (recon * core).sum(dim=(2, 3)) / core.sum(dim=(2, 3)).clamp_min(1.0)
    return loss + COLOUR_WEIGHT * F.mse_loss(mean, colour)


def train_vae(vae, steps: int, batch: int, rng: random.Random,
              log: Callable[[str], None], lr: float = VAE_LR,
              deadline: float | None = None) -> tuple[float, int, dict]:
    """Reconstruction training, the learning rate decaying (cosine) to a tenth over `steps`,
    then continuing at that tenth in rounds of RECHECK_STEPS until the detector recognises
    MIN_RECONSTRUCTED of the reconstructions, `deadline` (a time.time() value) passes or
    3 x `steps` are done.
    Returns the latent scaling factor (1 / std of the latents), the steps done and the last
    reconstruction check."""
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.1 + 0.45 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    check_rng = random.Random(f"vae-check-{rng.random()}")
    step, verdict = 0, {}
    while True:
        vae.train()
        for _ in range(steps if step == 0 else min(RECHECK_STEPS, steps)):
            step += 1
            images, mask, colour = vae_batch(rng, batch)
            # The posterior's mean: its variance is fixed at the floor (LOGVAR_FLOOR).
            recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
            loss = vae_loss(recon, images, mask, colour)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 100 == 0:
                log(f"vae step {step} loss {loss.item():.4f} {time.strftime('%H:%M:%S')}")
        vae.eval()
        verdict = reconstructed(vae, check_rng)
        log(f"vae reconstructions after {step} steps: {verdict}")
        if verdict["recognisable"] >= MIN_RECONSTRUCTED or step >= 3 * steps or (
                deadline is not None and time.time() > deadline):
            break
    with torch.no_grad():
        images, _ = scene_batch(rng, 64)
        latents = vae.encode(images).latent_dist.sample()
    return float(1.0 / latents.std()), step, verdict


def reconstructed(vae, rng: random.Random, count: int = 256) -> dict:
    """The detector's verdict on decode(encode(x)) of `count` fresh drawn scenes (posterior
    means): the share that still shows the drawn shape and colour, and each alone."""
    scenes_drawn = [scenes.random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(scenes.draw(s), dtype=np.float32) for s in scenes_drawn])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    found = [detect(r.astype(np.uint8)) for r in recon]
    shape = [f.shape == s.shape for f, s in zip(found, scenes_drawn, strict=True)]
    colour = [f.colour == s.colour for f, s in zip(found, scenes_drawn, strict=True)]
    return {"scenes": count, "recognisable": float(np.mean(np.logical_and(shape, colour))),
            "shape": float(np.mean(shape)), "colour": float(np.mean(colour))}


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(parts: dict, steps: int, batch: int, lr: float, rng: random.Random,
               log: Callable[[str], None], deadline: float | None = None) -> int:
    """Denoising training of the UNet and text encoder; stops early at `deadline` (a
    time.time() value). Warm-up, then a constant learning rate, so that N steps of a run cut
    short equal a run of N steps; the weights left are the exponential moving average
    (EMA_DECAY) of the steps. Returns the steps done."""
    unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
    params = list(unet.parameters()) + list(parts["text_encoder"].parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / 50))
    ema = [p.detach().clone() for p in params]
    unet.train()
    parts["text_encoder"].train()
    scale = vae.config.scaling_factor
    for step in range(1, steps + 1):
        images, captions = scene_batch(rng, batch)
        captions = ["" if rng.random() < EMPTY_CAPTION_PROB else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = encode_text(parts["tokenizer"], parts["text_encoder"], captions)
        loss = F.mse_loss(unet(noisy, t, hidden).sample, noise)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 100 == 0 or step == steps:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} {time.strftime('%H:%M:%S')}")
        if deadline is not None and time.time() > deadline:
            log(f"unet: time budget spent after step {step}")
            break
    with torch.no_grad():
        for p, average in zip(params, ema, strict=True):
            p.copy_(average)
    unet.eval()
    parts["text_encoder"].eval()
    return step


def recognisable(pipeline, captions: list[str], seed: int = 0,
                 guidance_scale: float = GUIDANCE_SCALE) -> dict:
    """The detector's verdict on one sample per caption: the fraction showing the prompted
    shape and colour, and the fractions right in shape / in colour alone."""
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipeline(captions, num_inference_steps=SAMPLE_STEPS, guidance_scale=guidance_scale,
                      generator=generator, height=scenes.IMAGE_SIZE,
                      width=scenes.IMAGE_SIZE).images
    found = [detect(image) for image in images]
    wanted = [scenes.parse_caption(c) for c in captions]
    return {"samples": len(captions),
            "recognisable": float(np.mean([fidelity(f, c) == 1.0
                                           for f, c in zip(found, captions, strict=True)])),
            "shape": float(np.mean([f.shape == w.shape for f, w in zip(found, wanted,
                                                                        strict=True)])),
            "colour": float(np.mean([f.colour == w.colour for f, w in zip(found, wanted,
                                                                           strict=True)]))}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(out_dir: Path, vae_steps: int = 300, unet_steps: int = 1000, batch: int = 32,
             lr: float = 2e-3, seed: int = 0, width: int = 32, command: str = "",
             log: Callable[[str], None] = print, max_minutes: float | None = None,
             samples: int = 144, vae_lr: float = VAE_LR, vae_batch: int | None = None) -> dict:
    """Pretrain and save the toy pipeline into `out_dir` (atomically); returns its record.
    `max_minutes` caps the whole training: the UNet phase stops early, and the record says
    after how many steps (rerun with that many to reproduce it). `samples` images (each
    caption in turn) are judged by the detector."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    rng = random.Random(seed)
    parts = build_components(seed, width)
    started = time.time()
    deadline = started + 60 * max_minutes if max_minutes else None
    # The VAE may take at most 40% of the budget (its rechecks stop there).
    vae_deadline = started + 24 * max_minutes if max_minutes else None
    scaling, vae_steps, vae_check = train_vae(parts["vae"], vae_steps, vae_batch or batch // 2,
                                              rng, log, vae_lr, vae_deadline)
    parts["vae"].register_to_config(scaling_factor=scaling)
    vae_seconds = time.time() - started
    parts["vae"].requires_grad_(False)
    unet_steps = train_unet(parts, unet_steps, batch, lr, rng, log, deadline)
    pipeline = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        captions = scenes.all_captions()
        verdict = recognisable(pipeline, [captions[i % len(captions)] for i in range(samples)],
                               seed=seed)
    log(f"recognisable: {verdict}")
    record = {
        "command": command, "seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps,
        "batch": batch, "vae_batch": vae_batch or batch // 2, "learning_rate": lr,
        "vae_learning_rate": vae_lr, "width": width, "ema_decay": EMA_DECAY,
        "vae_reconstructions": vae_check,
        "vae_seconds": round(vae_seconds), "seconds": round(time.time() - started),
        "torch": torch.__version__, "detector": verdict | {
            "sampler": f"DDIM {SAMPLE_STEPS} steps, guidance {GUIDANCE_SCALE}"},
    }
    with atomic_dir(Path(out_dir)) as tmp:
        pipeline.to(torch.float16).save_pretrained(tmp)
        record["sha256"] = {str(p.relative_to(tmp)): sha256(p)
                            for p in sorted(tmp.rglob("*.safetensors"))}
        (tmp / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--unet-steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32, help="scenes per UNet step (the "
                        "VAE takes half)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vae-lr", type=float, default=VAE_LR)
    parser.add_argument("--vae-batch", type=int, default=None, help="scenes per VAE step "
                        "(default: half of --batch)")
    parser.add_argument("--width", type=int, default=32, help="UNet / VAE base channels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop the UNet phase when training has taken this long")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on "
                        "a shared machine: more threads only spin against each other)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m smpo_core.worlds.toy.pretrain " + " ".join(
        sys.argv[1:] if argv is None else argv)
    pretrain(args.out_dir, args.vae_steps, args.unet_steps, args.batch, args.lr, args.seed,
             args.width, command, log=lambda line: print(line, flush=True),
             max_minutes=args.max_minutes, vae_lr=args.vae_lr, vae_batch=args.vae_batch)


if __name__ == "__main__":
    main()
