"""``cyclegan`` augmenter: CAMEL stage 1 (Goel et al., "Model Patching").

One CycleGAN per class between its two subgroups (true groups, or the miner's pseudo-groups in
``train.g``). For a class whose examples fall in more than two subgroups, the CycleGAN translates
between the two largest; the other rows of that class keep ``F(x) = G(x) = x`` (their
consistency term is then 0). Classes with a single subgroup are left alone the same way.

Per class, with A the larger and B the smaller subgroup:
- ``G: A → B`` and ``F: B → A``, trained on equal-size subsets (the smaller group's size, capped
  by ``max_per_group``), as in the CAMEL stage-1 configs (``research/camel_gdro.md`` §2);
- ResNet-style generator (Zhu et al.) sized to the image: a 7x7 stem, one stride-2 down/up stage
  for images of 16 px or more (none below), ``blocks`` residual blocks, instance norm, and a
  global skip in tanh space (``tanh(artanh(x) + r(x))``, starts as the identity; see
  :class:`Generator`);
  PatchGAN discriminator with one stride-2 layer per 16 px of side (at least one);
- LSGAN (least squares) adversarial loss, cycle loss λ_cyc = 10, identity loss λ_id = 0.5
  (CAMEL's effective ½·1.0; with the identity-initialised generator a larger λ_id, e.g. Zhu et
  al.'s 5, kept the generators at the identity in our 200-step CPU runs), Adam (β1 0.5, lr 1e-3
  for generators as in CAMEL's MNIST config, 1e-3 for discriminators), a replay buffer of 50.

Output: ``paired={"F": F(x), "G": G(x)}`` for every training row (so for x in A, G(x) is x
rendered in B and F(x) ≈ x; for x in B the reverse), and PNG triplets (x, F(x), G(x)) per class
and subgroup under ``<out_dir>/previews``.

Hyperparameters (``patch.params.cyclegan``): ``steps`` (default 20 × ``budget.augment_epochs``),
``batch_size`` 16, ``ngf`` 8, ``ndf`` 16, ``blocks`` 2, ``lambda_cyc`` 10, ``lambda_id`` 0.5,
``lr`` 1e-3, ``lr_disc`` 1e-3, ``max_per_group`` 500. Sized for 2 shared CPU cores; on a GPU
raise ``ngf``/``blocks``/``steps``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from patchd.abc import Augmentation, Augmenter, StageContext
from patchd.ml.data import ImageSet
from patchd.ml.training import seed_everything
from patchd.plugins.augmenters.previews import save_triplets
from patchd.plugins.trainers.base import pick_device


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """ResNet generator with a global skip in tanh space: ``out = tanh(artanh(x) + r(x))``.

    The residual body ``r`` starts near zero, so a generator begins as the identity and only has
    to learn the subgroup change (colour, texture) while the content is kept; this matters with
    the few hundred (or few) minority images per class a patch run has. Images in [-1, 1].
    """

    def __init__(self, channels: int, side: int, ngf: int, blocks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        width = ngf
        down = side >= 16 and side % 2 == 0
        if down:
            layers += [nn.Conv2d(ngf, 2 * ngf, 3, 2, 1), nn.InstanceNorm2d(2 * ngf), nn.ReLU(True)]
            width = 2 * ngf
        layers += [ResBlock(width) for _ in range(blocks)]
        if down:
            layers += [
                nn.ConvTranspose2d(width, ngf, 3, 2, 1, output_padding=1),
                nn.InstanceNorm2d(ngf),
                nn.ReLU(True),
            ]
        last = nn.Conv2d(ngf, channels, 7)
        nn.init.normal_(last.weight, 0.0, 0.02)
        assert last.bias is not None  # Conv2d's bias=True default
        nn.init.zeros_(last.bias)
        layers += [nn.ReflectionPad2d(3), last]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.atanh(x.clamp(-0.98, 0.98)) + self.body(x))


def generator(channels: int, side: int, ngf: int, blocks: int) -> nn.Module:
    return Generator(channels, side, ngf, blocks)


def discriminator(channels: int, side: int, ndf: int) -> nn.Module:
    """PatchGAN: stride-2 4x4 convs (one per 16 px of side, at least one), then a 1-channel map."""
    n_down = max(1, min(3, side // 16))
    layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    width = ndf
    for _ in range(n_down - 1):
        layers += [
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.InstanceNorm2d(2 * width),
            nn.LeakyReLU(0.2, True),
        ]
        width *= 2
    layers += [nn.Conv2d(width, width, 3, 1, 1), nn.InstanceNorm2d(width), nn.LeakyReLU(0.2, True)]
    layers += [nn.Conv2d(width, 1, 3, 1, 1)]
    return nn.Sequential(*layers)


class ReplayBuffer:
    """Shrivastava et al.'s history of fakes (size 50): half of each batch from the past."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.gen = size, generator
        self.items: list[torch.Tensor] = []

    def __call__(self, fakes: torch.Tensor) -> torch.Tensor:
        out = []
        for img in fakes.detach():
            if len(self.items) < self.size:
                self.items.append(img)
                out.append(img)
            elif torch.rand(1, generator=self.gen).item() < 0.5:
                j = int(torch.randint(self.size, (1,), generator=self.gen))
                out.append(self.items[j])
                self.items[j] = img
            else:
                out.append(img)
        return torch.stack(out)


@dataclass(frozen=True)
class GanConfig:
    steps: int
    batch_size: int
    ngf: int
    ndf: int
    blocks: int
    lambda_cyc: float
    lambda_id: float
    lr: float
    lr_disc: float
    max_per_group: int

    @classmethod
    def from_params(cls, params: dict[str, Any], augment_epochs: int) -> GanConfig:
        return cls(
            steps=int(params.get("steps", 20 * augment_epochs)),
            batch_size=int(params.get("batch_size", 16)),
            ngf=int(params.get("ngf", 8)),
            ndf=int(params.get("ndf", 16)),
            blocks=int(params.get("blocks", 2)),
            lambda_cyc=float(params.get("lambda_cyc", 10.0)),
            lambda_id=float(params.get("lambda_id", 0.5)),
            lr=float(params.get("lr", 1e-3)),
            lr_disc=float(params.get("lr_disc", 1e-3)),
            max_per_group=int(params.get("max_per_group", 500)),
        )


class CycleGAN:
    """Two generators (G: A→B, F: B→A), two PatchGANs, LSGAN + cycle + identity losses."""

    def __init__(
        self, channels: int, side: int, cfg: GanConfig, device: torch.device, gen: torch.Generator
    ) -> None:
        self.cfg, self.device, self.gen = cfg, device, gen
        self.G = generator(channels, side, cfg.ngf, cfg.blocks).to(device)
        self.F = generator(channels, side, cfg.ngf, cfg.blocks).to(device)
        self.DA = discriminator(channels, side, cfg.ndf).to(device)
        self.DB = discriminator(channels, side, cfg.ndf).to(device)
        gen_params = list(self.G.parameters()) + list(self.F.parameters())
        disc_params = list(self.DA.parameters()) + list(self.DB.parameters())
        self.opt_g = torch.optim.Adam(gen_params, lr=cfg.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(disc_params, lr=cfg.lr_disc, betas=(0.5, 0.999))
        self.pool_a, self.pool_b = ReplayBuffer(50, gen), ReplayBuffer(50, gen)

    def step(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        """One update of both generators, then both discriminators; a, b in [-1, 1]."""
        c = self.cfg
        fake_b, fake_a = self.G(a), self.F(b)
        adv = _lsgan(self.DB(fake_b), 1.0) + _lsgan(self.DA(fake_a), 1.0)
        cyc = (self.F(fake_b) - a).abs().mean() + (self.G(fake_a) - b).abs().mean()
        idt = (self.F(a) - a).abs().mean() + (self.G(b) - b).abs().mean()
        loss_g = adv + c.lambda_cyc * cyc + c.lambda_id * idt
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        old_b, old_a = self.pool_b(fake_b), self.pool_a(fake_a)
        loss_d = 0.5 * (_lsgan(self.DB(b), 1.0) + _lsgan(self.DB(old_b), 0.0))
        loss_d = loss_d + 0.5 * (_lsgan(self.DA(a), 1.0) + _lsgan(self.DA(old_a), 0.0))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        return {
            k: float(v.detach())
            for k, v in (("adv", adv), ("cycle", cyc), ("identity", idt), ("disc", loss_d))
        }

    def fit(self, a: torch.Tensor, b: torch.Tensor, on_step: Any = None) -> dict[str, float]:
        last: dict[str, float] = {}
        bs = self.cfg.batch_size
        for s in range(self.cfg.steps):
            ia = torch.randint(len(a), (bs,), generator=self.gen)
            ib = torch.randint(len(b), (bs,), generator=self.gen)
            last = self.step(_to_tanh(a[ia]).to(self.device), _to_tanh(b[ib]).to(self.device))
            if on_step is not None:
                on_step(s)
        return last

    @torch.no_grad()
    def translate(self, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """F(x), G(x) in [0, 1] for every row (generators in eval mode)."""
        self.F.eval()
        self.G.eval()
        fs, gs = [], []
        for i in range(0, len(x), batch):
            xb = _to_tanh(x[i : i + batch]).to(self.device)
            fs.append(_from_tanh(self.F(xb)).cpu())
            gs.append(_from_tanh(self.G(xb)).cpu())
        return torch.cat(fs), torch.cat(gs)


def _lsgan(pred: torch.Tensor, target: float) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


def _to_tanh(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1


def _from_tanh(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def two_largest(train: ImageSet, cls: int) -> tuple[int, int] | None:
    """(A, B): the class's largest and second-largest subgroup, or None with fewer than two."""
    groups = train.g[(train.y == cls) & (train.g >= 0)]
    counts = torch.bincount(groups, minlength=len(train.group_names))
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    if len(order) < 2 or counts[order[1]] == 0:
        return None
    return order[0], order[1]


class CycleGANAugmenter(Augmenter):
    name = "cyclegan"

    def synthesize(self, ctx: StageContext, model: nn.Module, train: ImageSet) -> Augmentation:
        cfg = GanConfig.from_params(ctx.plugin_params(self.name), ctx.params.budget.augment_epochs)
        gen = seed_everything(ctx.seed)
        device = pick_device(ctx)
        paired_f, paired_g = train.x.clone(), train.x.clone()
        previews, info = [], {}
        for cls in range(train.num_classes):
            pair = two_largest(train, cls)
            if pair is None:
                ctx.log.warning(
                    "run %s: class %d has fewer than two subgroups; no CycleGAN", ctx.run_id, cls
                )
                continue
            start = time.monotonic()
            gan = self.fit_class(ctx, train, cls, pair, cfg, device, gen)
            rows = ((train.y == cls) & ((train.g == pair[0]) | (train.g == pair[1]))).nonzero(
                as_tuple=True
            )[0]
            paired_f[rows], paired_g[rows] = gan.translate(train.x[rows])
            previews += self.write_previews(ctx, train, cls, pair, paired_f, paired_g, gen)
            info[train.class_names[cls]] = {
                "A": train.group_names[pair[0]],
                "B": train.group_names[pair[1]],
                "seconds": round(time.monotonic() - start, 1),
            }
        return Augmentation(
            kind=self.name,
            paired={"F": paired_f, "G": paired_g},
            previews=tuple(previews),
            info=info,
        )

    def fit_class(
        self,
        ctx: StageContext,
        train: ImageSet,
        cls: int,
        pair: tuple[int, int],
        cfg: GanConfig,
        device: torch.device,
        gen: torch.Generator,
    ) -> CycleGAN:
        a_rows = ((train.y == cls) & (train.g == pair[0])).nonzero(as_tuple=True)[0]
        b_rows = ((train.y == cls) & (train.g == pair[1])).nonzero(as_tuple=True)[0]
        n = min(len(a_rows), len(b_rows), cfg.max_per_group)
        a = train.x[a_rows[torch.randperm(len(a_rows), generator=gen)[:n]]]
        b = train.x[b_rows[torch.randperm(len(b_rows), generator=gen)[:n]]]
        gan = CycleGAN(train.x.shape[1], int(train.x.shape[-1]), cfg, device, gen)
        total = train.num_classes * cfg.steps

        def on_step(s: int) -> None:
            if s % 50 == 0:
                ctx.progress(
                    (cls * cfg.steps + s) / total, f"cyclegan class {cls} step {s}/{cfg.steps}"
                )

        losses = gan.fit(a, b, on_step)
        ctx.log.info("run %s cyclegan class %d (%d per group): %s", ctx.run_id, cls, n, losses)
        return gan

    def write_previews(
        self,
        ctx: StageContext,
        train: ImageSet,
        cls: int,
        pair: tuple[int, int],
        f: torch.Tensor,
        g: torch.Tensor,
        gen: torch.Generator,
    ) -> list:
        out = []
        for grp in pair:
            rows = ((train.y == cls) & (train.g == grp)).nonzero(as_tuple=True)[0]
            pick = rows[torch.randperm(len(rows), generator=gen)[:8]]
            name = f"cyclegan_{_slug(train.class_names[cls])}_{_slug(train.group_names[grp])}.png"
            out.append(
                save_triplets(train.x[pick], f[pick], g[pick], ctx.out_dir / "previews" / name)
            )
        return out


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text)
