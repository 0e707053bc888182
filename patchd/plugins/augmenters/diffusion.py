"""``diffusion`` augmenter: targeted synthetic samples for the under-represented cells.

A *cell* is a (class, subgroup) pair of ``train.g`` (true or mined groups). Cells whose count is
below ``minority_ratio`` (0.5) × the largest cell of their class are under-represented; each gets
``samples_per_cell`` (``patch.budget.samples_per_cell``) new labeled samples, returned as
``Augmentation.extra``. The ``camel`` trainer uses them for **plain rebalancing** (they join the
originals in their cell, so the group-balanced batches draw fresh minority samples); they carry no
pairing, so the consistency term is not applied to them.

Two routes (``patch.params.diffusion.route``: ``auto`` picks ``pretrained`` when
``patch.diffusion_checkpoint`` is set, else ``conditional``):

(a) ``pretrained``: a Stable Diffusion directory in diffusers format, loaded offline
    (``local_files_only``, no safety checker). Each cell is prompted by its caption
    (``params.prompts[<class>|<group>]``, e.g. the miner's caption, else
    "a photo of a <class>, <group>"). With ``alpha`` != 1 the text embedding is moved along the
    failure direction *in SD's own text-encoder space*:
    ``e = e_neutral + alpha·(e_cell − e_neutral)`` with ``e_neutral`` the plain class prompt
    (option (a) of ``research/ecosystem_apis.md`` §5.2).
    Img2img starts from the cell's own (hard) training images when it has any (``strength`` 0.6),
    text-to-image otherwise; outputs are resized to the training images' size.
(b) ``conditional``: a small diffusers ``UNet2DModel`` trained on the user's data on CPU,
    conditioned on class **and** subgroup through a summed (class + subgroup) embedding fed as
    the UNet's class embedding (so a rare cell borrows the class from its common sibling and the
    subgroup from the other class), DDPM training on group-balanced batches, DDIM sampling.

PNG grid of samples per cell under ``<out_dir>/previews``. Hyperparameters
(``patch.params.diffusion``): ``route``, ``minority_ratio`` 0.5, ``samples_per_cell``,
``steps`` (training, 40 × ``budget.augment_epochs``), ``batch_size`` 32, ``channels`` 32, ``lr``
2e-3, ``sample_steps`` 25; route (a): ``prompts``, ``alpha`` 1.0, ``strength`` 0.6,
``guidance_scale`` 7.5, ``resolution`` (the pipeline's default).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchd.abc import Augmentation, Augmenter, StageContext
from patchd.exceptions import DependencyMissingError, StageError
from patchd.ml.data import ImageSet
from patchd.ml.training import seed_everything
from patchd.plugins.augmenters.previews import save_grid
from patchd.plugins.trainers.base import BalancedSampler, pick_device

log = logging.getLogger(__name__)


def minority_cells(train: ImageSet, ratio: float) -> list[tuple[int, int]]:
    """(class, group) cells with 0 < count < ratio × the largest cell of the same class."""
    k = max(1, len(train.group_names))
    counts = torch.bincount(train.y * k + train.g.clamp(min=0), minlength=train.num_classes * k)
    counts = counts[: train.num_classes * k].view(train.num_classes, k)
    return [
        (y, g)
        for y in range(train.num_classes)
        for g in range(k)
        if 0 < counts[y, g] < ratio * counts[y].max()
    ]


def cell_name(train: ImageSet, y: int, g: int) -> str:
    return f"{train.class_names[y]}|{train.group_names[g]}"


def samples_set(
    train: ImageSet, images: list[torch.Tensor], cells: list[tuple[int, int]], kind: str
) -> ImageSet:
    ys = [
        torch.full((len(im),), y, dtype=torch.int64)
        for im, (y, _) in zip(images, cells, strict=True)
    ]
    gs = [
        torch.full((len(im),), g, dtype=torch.int64)
        for im, (_, g) in zip(images, cells, strict=True)
    ]
    ids = tuple(
        f"{kind}-{y}-{g}-{i}"
        for im, (y, g) in zip(images, cells, strict=True)
        for i in range(len(im))
    )
    return ImageSet(
        x=torch.cat(images).clamp(0, 1),
        y=torch.cat(ys),
        g=torch.cat(gs),
        class_names=train.class_names,
        group_names=train.group_names,
        ids=ids,
    )


class CellConditioner(nn.Module):
    """Summed class and subgroup embeddings (the UNet's ``class_embed_type='identity'`` input)."""

    def __init__(self, classes: int, groups: int, dim: int) -> None:
        super().__init__()
        self.cls = nn.Embedding(classes, dim)
        self.grp = nn.Embedding(groups, dim)

    def forward(self, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.cls(y) + self.grp(g)


class ConditionalDiffusion:
    """Route (b): a small class-and-subgroup conditional DDPM on the training images."""

    def __init__(self, train: ImageSet, params: dict[str, Any], device: torch.device) -> None:
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

        ch = int(params.get("channels", 32))
        side = int(train.x.shape[-1])
        if side % 2:
            raise StageError(
                f"conditional diffusion needs an even image side, got {side}; set data image_size"
            )
        self.unet = UNet2DModel(
            sample_size=side,
            in_channels=train.x.shape[1],
            out_channels=train.x.shape[1],
            layers_per_block=1,
            block_out_channels=(ch, 2 * ch),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            class_embed_type="identity",
            norm_num_groups=min(8, ch),
        ).to(device)
        self.cond = CellConditioner(train.num_classes, max(1, len(train.group_names)), 4 * ch).to(
            device
        )
        self.ddpm = DDPMScheduler(num_train_timesteps=1000)
        self.ddim = DDIMScheduler.from_config(self.ddpm.config)
        self.device = device

    def fit(
        self,
        train: ImageSet,
        steps: int,
        batch_size: int,
        lr: float,
        gen: torch.Generator,
        ctx: StageContext,
    ) -> float:
        k = max(1, len(train.group_names))
        sampler = BalancedSampler(train.y * k + train.g.clamp(min=0), batch_size, gen)
        opt = torch.optim.Adam([*self.unet.parameters(), *self.cond.parameters()], lr=lr)
        loss = torch.zeros(())
        for s in range(steps):
            idx = sampler()
            x = (train.x[idx] * 2 - 1).to(self.device)
            noise = torch.randn(x.shape, generator=gen).to(self.device)
            t = torch.randint(0, 1000, (len(idx),), generator=gen).to(self.device)
            emb = self.cond(train.y[idx].to(self.device), train.g[idx].clamp(min=0).to(self.device))
            pred = self.unet(self.ddpm.add_noise(x, noise, t), t, class_labels=emb).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if s % 50 == 0:
                ctx.progress(
                    0.8 * s / steps,
                    f"diffusion training step {s}/{steps} loss {float(loss.detach()):.3f}",
                )
        return float(loss.detach())

    @torch.no_grad()
    def sample(
        self, y: int, g: int, n: int, shape: tuple[int, ...], steps: int, gen: torch.Generator
    ) -> torch.Tensor:
        self.unet.eval()
        self.ddim.set_timesteps(steps)
        x = torch.randn((n, *shape), generator=gen).to(self.device)
        emb = self.cond(
            torch.full((n,), y, device=self.device), torch.full((n,), g, device=self.device)
        )
        for t in self.ddim.timesteps:
            x = self.ddim.step(self.unet(x, t, class_labels=emb).sample, t, x).prev_sample
        return ((x.cpu() + 1) / 2).clamp(0, 1)


class PretrainedDiffusion:
    """Route (a): Stable Diffusion from a local diffusers directory, offline."""

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
        except ImportError as err:  # pragma: no cover - depends on the install
            raise DependencyMissingError(
                f"route (a) needs diffusers + transformers: {err}"
            ) from err
        if not Path(path).is_dir():
            raise StageError(
                f"patch.diffusion_checkpoint {path} is not a directory; give a diffusers-format "
                "Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/)"
            )
        self.text2img = StableDiffusionPipeline.from_pretrained(
            str(path),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
            dtype=torch.float32,
        ).to(device)
        self.text2img.set_progress_bar_config(disable=True)
        self.img2img = StableDiffusionImg2ImgPipeline(**self.text2img.components)
        self.img2img.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def embed(self, prompt: str) -> torch.Tensor:
        pipe = self.text2img
        ids = pipe.tokenizer(
            [prompt],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(pipe.device)
        return pipe.text_encoder(ids)[0]

    def generate(
        self,
        prompt_embeds: torch.Tensor,
        init: torch.Tensor | None,
        n: int,
        params: dict[str, Any],
        gen: torch.Generator,
    ) -> torch.Tensor:
        neg = self.embed("")
        common = {
            "prompt_embeds": prompt_embeds.repeat(n, 1, 1),
            "negative_prompt_embeds": neg.repeat(n, 1, 1),
            "guidance_scale": float(params.get("guidance_scale", 7.5)),
            "num_inference_steps": int(params.get("sample_steps", 25)),
            "generator": gen,
            "output_type": "pt",
        }
        res = int(
            params.get(
                "resolution", self.text2img.unet.config.sample_size * self.text2img.vae_scale_factor
            )
        )
        if init is None:
            out = self.text2img(height=res, width=res, **common).images
        else:
            image = F.interpolate(
                init[:n].repeat((n + len(init) - 1) // len(init), 1, 1, 1)[:n],
                size=(res, res),
                mode="bilinear",
            )
            out = self.img2img(
                image=image, strength=float(params.get("strength", 0.6)), **common
            ).images
        return torch.as_tensor(out).float()


class DiffusionAugmenter(Augmenter):
    name = "diffusion"

    def synthesize(self, ctx: StageContext, model: nn.Module, train: ImageSet) -> Augmentation:
        params = ctx.plugin_params(self.name)
        cells = minority_cells(train, float(params.get("minority_ratio", 0.5)))
        if not cells:
            ctx.log.warning("run %s: no under-represented cell; nothing to synthesize", ctx.run_id)
            return Augmentation(kind=self.name, info={"cells": []})
        route = params.get("route", "auto")
        if route == "auto":
            route = "pretrained" if ctx.params.diffusion_checkpoint else "conditional"
        gen = seed_everything(ctx.seed)
        n = int(params.get("samples_per_cell", ctx.params.budget.samples_per_cell))
        if route == "pretrained":
            images = self.pretrained(ctx, train, cells, n, params, gen)
        elif route == "conditional":
            images = self.conditional(ctx, train, cells, n, params, gen)
        else:
            raise StageError(
                f"diffusion route {route!r} is unknown; use auto, pretrained or conditional"
            )
        extra = samples_set(train, images, cells, f"diffusion-{route}")
        previews = [
            save_grid(
                im[:16],
                ctx.out_dir / "previews" / f"diffusion_{_slug(cell_name(train, y, g))}.png",
                nrow=8,
            )
            for im, (y, g) in zip(images, cells, strict=True)
        ]
        info = {"route": route, "cells": [cell_name(train, y, g) for y, g in cells], "per_cell": n}
        return Augmentation(kind=self.name, extra=extra, previews=tuple(previews), info=info)

    def conditional(
        self,
        ctx: StageContext,
        train: ImageSet,
        cells: list[tuple[int, int]],
        n: int,
        params: dict[str, Any],
        gen: torch.Generator,
    ) -> list[torch.Tensor]:
        model = ConditionalDiffusion(train, params, pick_device(ctx))
        steps = int(params.get("steps", 40 * ctx.params.budget.augment_epochs))
        loss = model.fit(
            train, steps, int(params.get("batch_size", 32)), float(params.get("lr", 2e-3)), gen, ctx
        )
        ctx.log.info("run %s diffusion trained %d steps, last loss %.4f", ctx.run_id, steps, loss)
        out = []
        for i, (y, g) in enumerate(cells):
            ctx.progress(0.8 + 0.2 * i / len(cells), f"sampling {cell_name(train, y, g)}")
            batches = [
                model.sample(
                    y,
                    g,
                    min(128, n - s),
                    tuple(train.x.shape[1:]),
                    int(params.get("sample_steps", 25)),
                    gen,
                )
                for s in range(0, n, 128)
            ]
            out.append(torch.cat(batches))
        return out

    def pretrained(
        self,
        ctx: StageContext,
        train: ImageSet,
        cells: list[tuple[int, int]],
        n: int,
        params: dict[str, Any],
        gen: torch.Generator,
    ) -> list[torch.Tensor]:
        if ctx.params.diffusion_checkpoint is None:
            raise StageError(
                "diffusion route 'pretrained' needs patch.diffusion_checkpoint (a local directory)"
            )
        sd = PretrainedDiffusion(ctx.params.diffusion_checkpoint, pick_device(ctx))
        prompts: dict[str, str] = dict(params.get("prompts", {}))
        alpha = float(params.get("alpha", 1.0))
        out = []
        for i, (y, g) in enumerate(cells):
            name = cell_name(train, y, g)
            ctx.progress(i / len(cells), f"stable diffusion {name}")
            neutral = sd.embed(f"a photo of a {train.class_names[y]}")
            target = sd.embed(
                prompts.get(name, f"a photo of a {train.class_names[y]}, {train.group_names[g]}")
            )
            embeds = neutral + alpha * (target - neutral)
            hard = train.x[(train.y == y) & (train.g == g)]
            images = sd.generate(embeds, hard if len(hard) else None, n, params, gen)
            out.append(
                F.interpolate(
                    images, size=tuple(train.x.shape[-2:]), mode="bilinear", antialias=True
                )
            )
        return out


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text)
