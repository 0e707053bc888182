"""``vae`` augmenter: Defuse (Slack et al.) identification and distillation of model failures.

1. A small convolutional VAE on the training images (two stride-2 convs, ``z_dim`` 8, MSE
   reconstruction + analytic Gaussian KL; the reference code's sampled "KL" is a bug, see
   ``research/failure_mining.md`` §2.2).
2. Identification: for up to ``max_sources`` training images (group-balanced when groups are
   known) the code ``μ = Enc(x)`` is perturbed ``n_perturb`` times with
   ``ε = scale · (B − ½)/std(B)``, ``B ~ Beta(a, a)`` (a zero-mean version of the reference
   code's Beta(50, 50) offsets, §2.4); decoded samples whose prediction differs from the source
   label are kept (at most ``keep_per_source``, the smallest ‖ε‖).
3. Distillation: a Dirichlet-process Gaussian mixture (sklearn ``BayesianGaussianMixture``,
   full covariances, truncation ``components``) on the kept codes; components with weight above
   ``min_weight`` are the failure regions (§2.5).
4. ``samples_per_region`` codes per region from N(μ_k, τ·Σ_k), τ = 0.01, decoded; each region's
   default label is the majority source class of its codes (Defuse's premise: the perturbation
   keeps the semantics). A person may relabel or discard regions with
   ``patchd regions RUN --label REGION=CLASS`` (see :mod:`patchd.cli.regions`).

Output: ``extra`` = region samples (``y`` default label, ``g`` = region id, group names
``region=K``), ``<out_dir>/regions.json`` and one PNG per region under ``<out_dir>/previews``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchd.abc import Augmentation, Augmenter, StageContext
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.ml.training import seed_everything
from patchd.plugins.augmenters.previews import save_grid
from patchd.plugins.trainers.base import BalancedSampler, pick_device, predict

INVALID = "invalid"


def labels_path(run_dir: Path) -> Path:
    """Where ``patchd regions RUN --label`` stores a person's region labels."""
    return Path(run_dir) / "regions" / "labels.json"


class VAE(nn.Module):
    def __init__(self, channels: int, side: int, z_dim: int, width: int = 32) -> None:
        super().__init__()
        if side % 4:
            raise StageError(
                f"the vae augmenter needs an image side divisible by 4, got {side}; "
                "set data image_size"
            )
        self.s = side // 4
        self.w = width
        self.enc = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.ReLU(),
            nn.Flatten(),
        )
        flat = 2 * width * self.s * self.s
        self.mu, self.logvar = nn.Linear(flat, z_dim), nn.Linear(flat, z_dim)
        self.dec_in = nn.Linear(z_dim, flat)
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(F.relu(self.dec_in(z)).view(-1, 2 * self.w, self.s, self.s))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.mse_loss(self.decode(z), x, reduction="none").flatten(1).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return (recon + kl).mean()


@dataclass(frozen=True)
class Region:
    region: int
    weight: float
    n_codes: int
    label: int  # default: majority source class of its codes
    label_name: str
    predicted: str  # the model's majority (wrong) prediction on the region's samples
    preview: str  # relative to the stage directory


def train_vae(
    train: ImageSet, params: dict[str, Any], steps: int, device: torch.device, gen: torch.Generator
) -> VAE:
    vae = VAE(train.x.shape[1], int(train.x.shape[-1]), int(params.get("z_dim", 8))).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=float(params.get("lr", 2e-3)), weight_decay=1e-5)
    bs = int(params.get("batch_size", 64))
    for _ in range(steps):
        x = train.x[torch.randint(len(train), (bs,), generator=gen)].to(device)
        loss = vae.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    return vae


def source_rows(train: ImageSet, n: int, gen: torch.Generator) -> torch.Tensor:
    if train.has_groups:
        k = max(1, len(train.group_names))
        return torch.unique(BalancedSampler(train.y * k + train.g, n, gen)())
    return torch.randperm(len(train), generator=gen)[:n]


@torch.no_grad()
def find_flips(
    vae: VAE, model: nn.Module, train: ImageSet, params: dict[str, Any], gen: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Latent codes whose decoding the model labels differently from the source; + source labels."""
    device = next(vae.parameters()).device
    rows = source_rows(train, int(params.get("max_sources", 400)), gen)
    q, keep = int(params.get("n_perturb", 20)), int(params.get("keep_per_source", 5))
    a, scale = float(params.get("beta_a", 50.0)), float(params.get("scale", 1.5))
    beta = torch.distributions.Beta(a, a)
    std = (a * a / ((2 * a) ** 2 * (2 * a + 1))) ** 0.5
    codes, labels = [], []
    for i in rows.tolist():
        mu, _ = vae.encode(train.x[i : i + 1].to(device))
        eps = scale * (beta.sample((q, mu.shape[1])) - 0.5) / std
        z = mu + eps.to(device)
        flipped = predict(model, vae.decode(z)) != train.y[i]
        if flipped.any():
            norms = eps.norm(dim=1).masked_fill(~flipped, float("inf"))
            best = torch.argsort(norms)[: min(keep, int(flipped.sum()))]
            codes.append(z[best].cpu())
            labels += [int(train.y[i])] * len(best)
    if not codes:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return torch.cat(codes).numpy(), np.asarray(labels)


def fit_regions(codes: np.ndarray, params: dict[str, Any], seed: int) -> Any:
    from sklearn.mixture import BayesianGaussianMixture

    rng = np.random.default_rng(seed)
    sub = codes[rng.permutation(len(codes))[: int(params.get("max_codes", 5000))]]
    dpgmm = BayesianGaussianMixture(
        n_components=max(1, min(int(params.get("components", 20)), len(sub) // 2)),
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_process",
        max_iter=int(params.get("max_iter", 500)),
        random_state=seed,
        reg_covar=1e-4,
    )
    return dpgmm.fit(sub)


class VAEAugmenter(Augmenter):
    name = "vae"

    def synthesize(self, ctx: StageContext, model: nn.Module, train: ImageSet) -> Augmentation:
        params = ctx.plugin_params(self.name)
        gen = seed_everything(ctx.seed)
        device = pick_device(ctx)
        steps = int(params.get("steps", 30 * ctx.params.budget.augment_epochs))
        ctx.progress(0.0, f"training VAE ({steps} steps)")
        vae = train_vae(train, params, steps, device, gen)
        ctx.progress(0.5, "searching latent perturbations that flip the prediction")
        model = model.to(device).eval()
        codes, labels = find_flips(vae, model, train, params, gen)
        ctx.log.info("run %s defuse: %d flipping latent codes", ctx.run_id, len(codes))
        if len(codes) < 4:
            raise StageError(
                f"the VAE search found {len(codes)} prediction-flipping perturbations; raise "
                "patch.params.vae.scale or n_perturb, or the model has no failure to distill"
            )
        ctx.progress(0.7, f"clustering {len(codes)} codes (DP Gaussian mixture)")
        dpgmm = fit_regions(codes, params, ctx.seed)
        extra, regions = self.sample_regions(ctx, vae, model, train, dpgmm, codes, labels, params)
        (ctx.out_dir / "regions.json").write_text(
            json.dumps([asdict(r) for r in regions], indent=2)
        )
        previews = tuple(ctx.out_dir / r.preview for r in regions)
        info = {"flips": len(codes), "regions": len(regions)}
        return Augmentation(kind=self.name, extra=extra, previews=previews, info=info)

    @torch.no_grad()
    def sample_regions(
        self,
        ctx: StageContext,
        vae: VAE,
        model: nn.Module,
        train: ImageSet,
        dpgmm: Any,
        codes: np.ndarray,
        labels: np.ndarray,
        params: dict[str, Any],
    ) -> tuple[ImageSet, list[Region]]:
        rng = np.random.default_rng(ctx.seed)
        assign = dpgmm.predict(codes)
        min_w, n, tau = (
            float(params.get("min_weight", 0.01)),
            int(params.get("samples_per_region", 64)),
            0.01,
        )
        keep = [
            k
            for k in range(len(dpgmm.weights_))
            if dpgmm.weights_[k] > min_w and (assign == k).any()
        ]
        images, regions = [], []
        for rid, k in enumerate(keep):
            z = rng.multivariate_normal(dpgmm.means_[k], tau * dpgmm.covariances_[k], size=n)
            x = vae.decode(
                torch.as_tensor(z, dtype=torch.float32, device=next(vae.parameters()).device)
            ).cpu()
            label = int(np.bincount(labels[assign == k]).argmax())
            pred = int(torch.bincount(predict(model, x)).argmax())
            png = save_grid(x[:16], ctx.out_dir / "previews" / f"region_{rid}.png", nrow=8)
            regions.append(
                Region(
                    rid,
                    float(dpgmm.weights_[k]),
                    int((assign == k).sum()),
                    label,
                    train.class_names[label],
                    train.class_names[pred],
                    png.relative_to(ctx.out_dir).as_posix(),
                )
            )
            images.append(x)
        extra = ImageSet(
            x=torch.cat(images),
            y=torch.cat([torch.full((n,), r.label, dtype=torch.int64) for r in regions]),
            g=torch.cat([torch.full((n,), r.region, dtype=torch.int64) for r in regions]),
            class_names=train.class_names,
            group_names=tuple(f"region={r.region}" for r in regions),
            ids=tuple(f"defuse-{r.region}-{i}" for r in regions for i in range(n)),
        )
        return extra, regions


def read_labels(path: Path) -> dict[int, str]:
    """``{region: class name or 'invalid'}`` from the labels file (empty when none was given)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {int(k): str(v) for k, v in raw.get("labels", {}).items()}
    except (ValueError, AttributeError) as err:
        raise StageError(
            f"region labels file {path} is not valid JSON ({err}); fix or delete it"
        ) from err


def apply_region_labels(extra: ImageSet, path: Path) -> ImageSet:
    """Region samples with a person's labels applied; regions labelled ``invalid`` dropped."""
    labels = read_labels(path)
    if not labels:
        return extra
    y, keep = extra.y.clone(), torch.ones(len(extra), dtype=torch.bool)
    for region, name in labels.items():
        rows = extra.g == region
        if name == INVALID:
            keep &= ~rows
        elif name in extra.class_names:
            y[rows] = extra.class_names.index(name)
        else:
            raise StageError(
                f"region {region} is labelled {name!r}, not one of {extra.class_names} or 'invalid'"
            )
    relabelled = ImageSet(extra.x, y, extra.g, extra.class_names, extra.group_names, extra.ids)
    if not keep.any():
        raise StageError(
            f"every region is labelled invalid in {path}; nothing left to correct with"
        )
    return relabelled.subset(keep)
