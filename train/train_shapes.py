"""Train the embedded shapes model (VAE, word-level CLIP tokenizer, CLIP text encoder, UNet) on CPU.

Writes a diffusers-layout StableDiffusionPipeline folder from our own model classes. Stages:
  1. render a fixed pool of captioned shapes (runtime.shapes, seeded; held-out triples never drawn);
  2. AutoencoderKL 64x64x3 -> 16x16x4, L1 + MSE weighted onto the shape + a small KL;
     scaling_factor = 1 / latent std;
  3. a CLIP BPE tokenizer whose merges make every caption word one token (trained on the captions);
  4. CLIPTextModel and UNet2DConditionModel trained jointly (the encoder is tiny, and a trained one
     learns which colour word binds to "background"), 10% empty prompts for
     classifier-free guidance, zero terminal SNR with v-prediction, AdamW, warm-up + cosine LR,
     EMA weights (what is saved);
  5. evaluation: our StableDiffusionPipeline, DDIM 20 steps, scorer adherence on held-out prompts.

Real run (the shipped model, run 3 in train/RUNS.md; about 1 h 50 min on 2 cores):
    python3 train/train_shapes.py --vae-steps 1200 --unet-steps 4500 --seed 0 --out <folder>
Smoke run:  python3 train/train_shapes.py --vae-steps 2 --unet-steps 2 --batch-size 8 --pool 64 \
                --eval-prompts 8 --out /tmp/shapes-smoke
With --vae-steps/--unet-steps the run is reproducible from --seed; with time budgets only, the
step counts derived from a timing calibration are printed and logged so the run can be repeated.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from runtime.models import AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel  # noqa: E402
from runtime import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from runtime.image_io import to_uint8  # noqa: E402
from runtime.shapes import dataset as shapes  # noqa: E402
from runtime.shapes.scorer import adherence  # noqa: E402

MAX_TOKENS = 32  # tokenizer model_max_length = text encoder positions; the longest caption is 14 tokens
# Zero terminal SNR (Lin et al. 2024) with v-prediction and trailing timesteps. Run 2 trained on the
# usual schedule (epsilon, leading) and its samples ignored the background and position words: the
# latents' per-image mean (the background colour) is large, at t=999 the usual schedule leaves
# sqrt(abar)=0.068 of it in x_t (as strong as the noise's own mean over 16x16), so the model read
# the background from x_t instead of from the text -- and at sampling x_T is pure noise.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                        steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing",
                        rescale_betas_zero_snr=True)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(32, 32, 64), norm_num_groups=16)  # 64 -> 16: two downsamples
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu")
UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64, 128), cross_attention_dim=128, attention_head_dim=4,
                   norm_num_groups=32,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- tokenizer ---------------------------------------------------------------------------------
def caption_corpus() -> list[str]:
    """Every caption the grammar produces (both forms, all position wordings), for the BPE merges."""
    texts = []
    for s, c, b in shapes.all_triples():
        texts.append(shapes.caption(shapes.Attributes(s, c, b)))
        for p in shapes.POSITIONS:
            for z in shapes.SIZES:
                texts.append(shapes.caption(shapes.Attributes(s, c, b, p, z)))
    texts += ["in the center", "in the middle", "an", "color"]
    return texts


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP-format BPE (vocab.json + merges.txt) in which every caption word is a single token."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    from runtime.models.tokenizer import SPLIT_PATTERN

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(",.!'-0123456789")
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1, show_progress=False,
                                  initial_alphabet=letters, end_of_word_suffix="</w>")
    bpe.train_from_iterator(caption_corpus(), trainer)
    data = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    # Ids in a fixed order (the trainer's ids for equal counts vary run to run): every character
    # and character-at-word-end as in CLIP's base vocabulary, then merge results in merge order.
    tokens = letters + [ch + "</w>" for ch in letters]
    tokens += sorted(t for t in data["vocab"] if t not in tokens and t != "<|endoftext|>"
                     and not any(a + b == t for a, b in merges))
    tokens += [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # eos is the largest id, as in CLIP (pooling by argmax also works)
    tok = CLIPTokenizer(vocab, merges, model_max_length=MAX_TOKENS)
    for text in caption_corpus():
        for word in text.replace(",", " , ").split():
            pieces = tok.tokenize(word)
            assert len(pieces) == 1 and pieces[0] in vocab, (word, pieces)
    return tok


def token_ids(tok: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return torch.as_tensor(tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True)["input_ids"])


# ---- data --------------------------------------------------------------------------------------
def render_pool(n: int, seed: int):
    """(images (n, 3, 64, 64) in [-1, 1], ids of full captions (n, T), ids of short captions (n, T))."""
    images, _, attrs = shapes.sample(n, seed=seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, H, W, 3) -> (n, 3, H, W)
    full = [shapes.caption(a) for a in attrs]
    short = [shapes.caption(a, short=True) for a in attrs]
    return x, full, short


# ---- schedules and EMA -------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters, decay ramped up as (1 + n) / (10 + n) early on."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_models(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


class Budget:
    """Steps for a phase: fixed, or calibrated from the first `probe` steps to fit `seconds`."""

    def __init__(self, steps: int, seconds: float, probe: int = 10):
        self.total, self.seconds, self.probe = steps, seconds, probe
        self.start = time.perf_counter()

    def planned(self, step: int) -> int:
        if self.total <= 0 and step == self.probe:
            per_step = (time.perf_counter() - self.start) / self.probe
            self.total = max(self.probe + 1, int(self.seconds / per_step))
            log(f"  calibrated: {per_step * 1000:.0f} ms/step -> {self.total} steps")
        return self.total if self.total > 0 else 10 ** 9


def autocast(precision: str):
    """bf16 autocast of a training forward pass; master weights stay fp32. Measured on 2 cores at
    batch 64: VAE step 2.0 s fp32 -> 1.15 s bf16; UNet step 0.9 s fp32 -> 1.25 s bf16 (its convs
    are too narrow to gain, the casts cost more), hence a setting per stage."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


# ---- stage 1: VAE ------------------------------------------------------------------------------
def shape_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, H, W) loss weights: 1 on the background, 1 + weight on and around the shape. The shape
    covers 1-4% of a small image's pixels, so an unweighted loss rounds small squares and triangles
    into blobs (run 2: 2 of 90 small triangles read back right)."""
    background = x[:, :, :1, :1]  # every image has a flat background; the corner pixel is on it
    fg = ((x - background).abs().amax(1, keepdim=True) > 0.05).float()
    near = F.max_pool2d(fg, 3, stride=1, padding=1)  # the edge band too, where corners live
    return 1.0 + weight * near


def recon_loss(recon: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
    w = shape_weights(x, weight)
    err = (recon - x).abs() + (recon - x) ** 2
    return (w * err).mean() / w.mean()


def train_vae(vae: AutoencoderKL, images: torch.Tensor, args, budget: Budget, work: Path) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    last_ckpt, step, losses = time.perf_counter(), 0, []
    while step < budget.planned(step):
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        x = images[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, budget.planned(step), args.vae_lr, 50)
        with autocast(args.vae_precision):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = vae.decode(z).sample.float()
        m, v, lv = posterior.mean.float(), posterior.var.float(), posterior.logvar.float()
        kl = 0.5 * (m ** 2 + v - 1.0 - lv).sum((1, 2, 3)).mean()
        loss = recon_loss(recon, x, args.shape_weight) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log(f"  vae step {step}/{budget.planned(step)} loss {np.mean(losses[-100:]):.4f} kl {kl.item():.1f}")
        if time.perf_counter() - last_ckpt > args.checkpoint_minutes * 60:
            save_state(work / "vae.pt", vae=vae.state_dict(), step=step)
            last_ckpt = time.perf_counter()
    return {"vae_steps": step, "vae_final_loss": float(np.mean(losses[-50:]))}


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(256):
        post = vae.encode(chunk).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)  # 2 x (n, 4, 16, 16)


@torch.no_grad()
def vae_ceiling(vae: AutoencoderKL, n: int, seed: int) -> dict:
    """Scorer adherence of VAE reconstructions of held-out images: what generation can reach at best."""
    images, captions, _ = shapes.sample(n, seed=seed + 5, split="held_out")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, 3, 64, 64)
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(64)])
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (n, 64, 64, 3)
    return adherence(list(recon), captions)


# ---- stage 3 (optional): decoder fine-tune -------------------------------------------------------
def edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical pixel differences: sharp corners tell a small square or
    triangle from a circle, and L1/MSE on pixels alone leave them rounded."""
    return (F.l1_loss(recon.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(recon.diff(dim=-2), x.diff(dim=-2)))


def finetune_decoder(vae: AutoencoderKL, images: torch.Tensor, args) -> dict:
    """More training for the decoder alone (and post_quant_conv), the encoder frozen: the latent
    space the UNet learned stays the same, so this sharpens decoded images after the fact."""
    vae.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.decoder_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 3)
    losses = []
    vae.train()
    for step in range(args.decoder_steps):
        x = images[torch.randint(len(images), (args.batch_size,), generator=gen)]
        with torch.no_grad(), autocast(args.vae_precision):
            post = vae.encode(x).latent_dist
            z = (post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).float()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.decoder_steps, args.decoder_lr, 20)
        with autocast(args.vae_precision):
            recon = vae.decode(z).sample.float()
        loss = recon_loss(recon, x, args.shape_weight) + args.edge_weight * edge_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log(f"  decoder step {step + 1}/{args.decoder_steps} loss {np.mean(losses[-100:]):.4f}")
    vae.eval().requires_grad_(False)
    return {"decoder_steps": args.decoder_steps, "decoder_final_loss": float(np.mean(losses[-50:])) if losses else None}


def run_finetune_decoder(out: Path, args, report: dict) -> None:
    """--finetune-decoder: load the VAE of the folder at --out, fine-tune its decoder, write it back."""
    vae = AutoencoderKL.from_pretrained(out / "vae")
    images, _, _ = render_pool(args.pool, args.seed)
    report["vae_reconstruction_adherence_before"] = before = vae_ceiling(vae, args.eval_prompts, args.seed)
    log(f"VAE reconstructions before: {json.dumps({k: round(v, 3) for k, v in before.items()})}")
    report.update(finetune_decoder(vae, images, args))
    report["vae_reconstruction_adherence"] = after = vae_ceiling(vae, args.eval_prompts, args.seed)
    log(f"VAE reconstructions after: {json.dumps({k: round(v, 3) for k, v in after.items()})}")
    tmp = out.parent / (out.name + ".vae-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.save_pretrained(tmp)
    shutil.rmtree(out / "vae")
    tmp.replace(out / "vae")


# ---- stage 2: text encoder + UNet --------------------------------------------------------------
def train_unet(unet, text_encoder, latents, ids_full, ids_short, ids_empty, args, budget: Budget, work: Path):
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = EMA([unet, text_encoder], args.ema_decay)
    sched = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    abar = sched.alphas_cumprod.float()  # (1000,)
    gen = torch.Generator().manual_seed(args.seed + 2)
    mean, std = latents
    last_ckpt, step, losses = time.perf_counter(), 0, []
    while step < budget.planned(step):
        idx = torch.randint(len(mean), (args.batch_size,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * args.scaling_factor
        # Caption form per sample: 80% full, 10% short (no size/position), 10% empty (for CFG).
        u = torch.rand(args.batch_size, generator=gen)[:, None]
        ids = torch.where(u < 0.1, ids_empty[None], torch.where(u < 0.2, ids_short[idx], ids_full[idx]))
        t = torch.randint(0, abar.numel(), (args.batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step, budget.planned(step), args.lr, 200)
        # v = sqrt(abar) * noise - sqrt(1 - abar) * z0 (Salimans & Ho 2022); at t=999, -z0 from text alone
        target = noise if sched.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0
        with autocast(args.unet_precision):
            context = text_encoder(ids)[0]  # (B, T, 128)
            loss = F.mse_loss(unet(zt, t, context).sample.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log(f"  unet step {step}/{budget.planned(step)} loss {np.mean(losses[-100:]):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e}")
        if time.perf_counter() - last_ckpt > args.checkpoint_minutes * 60:
            save_state(work / "unet.pt", unet=unet.state_dict(), text_encoder=text_encoder.state_dict(),
                       ema=ema.shadow, step=step)
            last_ckpt = time.perf_counter()
    ema.copy_to_models()  # what ships is the EMA
    return {"unet_steps": step, "unet_final_loss": float(np.mean(losses[-100:]))}


# ---- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(pipe, prompts: list[str], guidance: float, steps: int, seed: int, batch: int = 16) -> dict:
    images = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gen, output_type="np")
        images.extend(to_uint8(out.images))
    return adherence(images, prompts), images


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (diffusers layout)")
    p.add_argument("--minutes", type=float, default=110.0,
                   help="wall budget for rendering and both training stages (evaluation adds ~5 min)")
    p.add_argument("--vae-fraction", type=float, default=0.15, help="share of the budget for the VAE")
    p.add_argument("--vae-steps", type=int, default=0, help="fixed VAE steps (0: fit the budget)")
    p.add_argument("--unet-steps", type=int, default=0, help="fixed UNet steps (0: fit the budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=20000, help="rendered training images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--shape-weight", type=float, default=10.0,
                   help="extra reconstruction-loss weight on and around the shape (VAE and decoder stages)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-precision", choices=("bf16", "fp32"), default="bf16",
                   help="autocast dtype of the VAE's training forward pass (master weights are fp32)")
    p.add_argument("--unet-precision", choices=("bf16", "fp32"), default="fp32",
                   help="autocast dtype of the UNet + text encoder training forward pass")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the folder at --out")
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="after training (or, with --finetune-decoder, on the folder at --out): "
                        "steps of decoder-only fine-tuning, the encoder frozen")
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--edge-weight", type=float, default=1.0, help="weight of the edge loss in the decoder fine-tune")
    p.add_argument("--finetune-decoder", action="store_true",
                   help="only fine-tune the decoder of the folder at --out (--decoder-steps), then evaluate")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, work = Path(args.out), Path(str(args.out).rstrip("/") + ".work")
    work.mkdir(parents=True, exist_ok=True)
    if args.finetune_decoder:
        report = {"args": vars(args)}
        run_finetune_decoder(out, args, report)
        evaluate_folder(out, work, args, report)
        (work / "finetune_log.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        return
    if args.eval_only:
        report = {"args": vars(args)}
        evaluate_folder(out, work, args, report)
        (work / f"eval_cfg{args.guidance:g}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        return
    t0 = time.perf_counter()
    report: dict = {"args": vars(args)}

    tokenizer = build_tokenizer()
    log(f"tokenizer: {len(tokenizer._vocab)} tokens")
    images, full, short = render_pool(args.pool, args.seed)
    ids_full, ids_short = token_ids(tokenizer, full), token_ids(tokenizer, short)
    ids_empty = token_ids(tokenizer, [""])[0]
    log(f"pool: {len(images)} images rendered in {time.perf_counter() - t0:.0f}s")

    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(vocab_size=len(tokenizer._vocab), pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 **TEXT_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    counts = {"vae": n_params(vae), "text_encoder": n_params(text_encoder), "unet": n_params(unet)}
    log(f"parameters: {counts} (total {sum(counts.values()) / 1e6:.2f} M, "
        f"{sum(counts.values()) * 4 / 2**20:.1f} MiB fp32)")
    report["parameters"] = counts

    seconds = args.minutes * 60
    log("stage 1: VAE")
    report.update(train_vae(vae, images, args, Budget(args.vae_steps, seconds * args.vae_fraction), work))
    vae.eval().requires_grad_(False)
    mean, std = encode_pool(vae, images)
    args.scaling_factor = float(1.0 / mean.std())
    trained = vae.state_dict()
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=args.scaling_factor).eval()  # configs are frozen
    vae.load_state_dict(trained)
    log(f"latents {tuple(mean.shape[1:])}, std {mean.std():.3f} -> scaling_factor {args.scaling_factor:.4f}")
    report["scaling_factor"] = args.scaling_factor
    if args.eval_prompts > 0:
        report["vae_reconstruction_adherence"] = ceiling = vae_ceiling(vae, args.eval_prompts, args.seed)
        log(f"VAE reconstructions, held-out images (the ceiling for generation): "
            f"{json.dumps({k: round(v, 3) for k, v in ceiling.items()})}")

    log("stage 2: text encoder + UNet")
    remaining = seconds - (time.perf_counter() - t0)
    report.update(train_unet(unet, text_encoder, (mean, std), ids_full, ids_short, ids_empty, args,
                             Budget(args.unet_steps, max(remaining, 30.0)), work))
    if args.decoder_steps > 0:  # the same as running --finetune-decoder on the saved folder afterwards
        log("stage 3: decoder fine-tune, encoder frozen")
        report.update(finetune_decoder(vae, images, args))
        report["vae_reconstruction_adherence"] = ceiling = vae_ceiling(vae, args.eval_prompts, args.seed)
        log(f"VAE reconstructions after: {json.dumps({k: round(v, 3) for k, v in ceiling.items()})}")
    del images
    report["train_seconds"] = time.perf_counter() - t0

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report["folder_mib"] = size / 2**20
    log(f"saved {out} ({size / 2**20:.1f} MiB)")

    if args.eval_prompts > 0:
        evaluate_folder(out, work, args, report)
    (work / "train_log.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; log in {work / 'train_log.json'}")


def evaluate_folder(out: Path, work: Path, args, report: dict) -> None:
    """Reload the written folder with our pipeline and score held-out and training prompts."""
    log("evaluation: DDIM 20 steps on held-out prompts")
    pipe = StableDiffusionPipeline.from_pretrained(out)  # what ships, reloaded
    pipe.set_progress_bar_config(disable=True)
    held, imgs = evaluate(pipe, shapes.held_out_prompts(args.eval_prompts), args.guidance, 20, args.seed)
    seen_prompts = [shapes.caption(a) for a in shapes.sample(args.eval_prompts, seed=args.seed + 7)[2]]
    seen, _ = evaluate(pipe, seen_prompts, args.guidance, 20, args.seed)
    report["adherence_held_out"], report["adherence_training"] = held, seen
    log(f"held-out adherence: {json.dumps({k: round(v, 3) for k, v in held.items()})}")
    log(f"training-prompt adherence: {json.dumps({k: round(v, 3) for k, v in seen.items()})}")
    if len(imgs) >= 8:  # rows of 8 held-out samples, for a look by eye
        rows = [np.concatenate(list(imgs[r * 8:(r + 1) * 8]), axis=1) for r in range(len(imgs) // 8)]
        shapes.to_pil(np.concatenate(rows)).save(work / f"held_out_samples_cfg{args.guidance:g}.png")


if __name__ == "__main__":
    main()
