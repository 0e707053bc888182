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
   full covariances, truncation ``components``) on the kept codes of each source class;
   components whose share of all kept codes is above ``min_weight`` are the failure regions
   (§2.5; one mixture over all classes merges them into a broad component of any class).
4. ``samples_per_region`` codes per region from N(μ_k, τ·Σ_k) with τ = ``tau`` (default 1: the
   component's own covariance; the reference's τ = 0.01 decodes to near-identical images), and
   ``heldout_per_region`` more from an independent stream, written to ``heldout.safetensors`` for
   evaluation only (no trainer reads them). Each region records its source class (the class
   of its codes, Defuse's premise that a small perturbation keeps the semantics), the
   model's prediction mix, and its quality (:mod:`patchd.plugins.augmenters.region_quality`:
   spread against real images of the source class, novelty against the misclassified training
   images, Fréchet distance in the incumbent's features). The source class is *not* a label: a
   region is unlabelled until a person (or a stand-in annotator) labels it or marks it
   ``invalid`` with ``patchd regions RUN --label REGION=CLASS``; the defuse trainer falls back to
   the source class for unlabelled regions and the run report says so.

Output: ``extra`` = region samples (``y`` source class, ``g`` = region id, group names
``region=K``), ``<out_dir>/regions.json`` (schema 2: VAE reconstruction error and preview,
realism, regions), one PNG per region and ``vae_samples.png`` (8 real, their reconstructions,
8 prior samples) under ``<out_dir>/previews``.
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
from patchd.exceptions import StageError, ValidationError
from patchd.ml.data import ImageSet
from patchd.ml.training import seed_everything
from patchd.plugins.augmenters.previews import save_grid
from patchd.plugins.trainers.base import BalancedSampler, pick_device, predict
from patchd.runs import regions as region_store
from patchd.runs.regions import INVALID as INVALID  # the label that drops a region
from patchd.runs.regions import labels_path as labels_path  # where a person's labels are


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
        self.channels, self.side, self.z_dim = channels, side, z_dim
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
    # majority source class of its codes: Defuse's premise, never a person's label (labels are
    # in ``<run>/regions/labels.json``; a region without one is *unlabelled*)
    source_label: int
    source_name: str
    predicted: str  # the model's majority (wrong) prediction on the region's samples
    prediction_mix: dict[str, int]  # the model's predictions on the region's samples
    preview: str  # relative to the stage directory
    spread: float  # mean pairwise L2 distance between the region's samples
    real_spread: float  # the same between real training images of the source class
    novelty: float  # see patchd.plugins.augmenters.region_quality.novelty
    fd: float  # Fréchet distance (incumbent features) of the region's samples to real images


def train_vae(
    train: ImageSet, params: dict[str, Any], steps: int, device: torch.device, gen: torch.Generator
) -> VAE:
    vae = VAE(
        train.x.shape[1],
        int(train.x.shape[-1]),
        int(params.get("z_dim", 8)),
        int(params.get("width", 32)),
    ).to(device)
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Latent codes whose decoding the model labels differently from the source; their source
    labels, their source rows, and how many sources were searched."""
    device = next(vae.parameters()).device
    rows = source_rows(train, int(params.get("max_sources", 400)), gen)
    q, keep = int(params.get("n_perturb", 20)), int(params.get("keep_per_source", 5))
    a, scale = float(params.get("beta_a", 50.0)), float(params.get("scale", 1.5))
    beta = torch.distributions.Beta(a, a)
    std = (a * a / ((2 * a) ** 2 * (2 * a + 1))) ** 0.5
    codes, labels, sources = [], [], []
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
            sources += [i] * len(best)
    if not codes:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), len(rows)
    return torch.cat(codes).numpy(), np.asarray(labels), np.asarray(sources), len(rows)


@dataclass(frozen=True)
class Component:
    """One failure region: a Gaussian in latent space around codes of one source class."""

    mean: np.ndarray
    cov: np.ndarray
    weight: float  # share of all kept codes the mixture gives this component
    source_label: int
    n_codes: int


def _fit_mixture(codes: np.ndarray, params: dict[str, Any], seed: int) -> Any:
    from sklearn.mixture import BayesianGaussianMixture

    dpgmm = BayesianGaussianMixture(
        n_components=max(1, min(int(params.get("components", 10)), len(codes) // 2)),
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_process",
        max_iter=int(params.get("max_iter", 500)),
        random_state=seed,
        reg_covar=1e-4,
    )
    return dpgmm.fit(codes)


def fit_regions(
    codes: np.ndarray, labels: np.ndarray, params: dict[str, Any], seed: int
) -> tuple[tuple[Component, ...], np.ndarray]:
    """A DP Gaussian mixture per source class on its kept codes (one mixture over every class
    merges the classes into one broad component whose samples are any class); components whose
    share of all codes is above ``min_weight`` are the regions. Returns them and each code's
    region (-1: in no region)."""
    rng = np.random.default_rng(seed)
    cap = int(params.get("max_codes", 5000))
    min_w = float(params.get("min_weight", 0.01))
    total = len(codes)
    assign = np.full(total, -1, dtype=np.int64)
    found: list[Component] = []
    for c in np.unique(labels).tolist():
        rows = np.flatnonzero(labels == c)
        if len(rows) < 4:
            continue
        sub = rows[rng.permutation(len(rows))[:cap]]
        dpgmm = _fit_mixture(codes[sub], params, seed)
        own = dpgmm.predict(codes[rows])
        for k in range(len(dpgmm.weights_)):
            members = rows[own == k]
            weight = float(dpgmm.weights_[k]) * len(rows) / total
            if weight <= min_w or len(members) == 0:
                continue
            assign[members] = len(found)
            found.append(
                Component(dpgmm.means_[k], dpgmm.covariances_[k], weight, int(c), len(members))
            )
    return tuple(found), assign


@dataclass(frozen=True)
class Distilled:
    """The fitted pieces of one Defuse search: the VAE, the kept codes and the regions."""

    vae: VAE
    codes: np.ndarray
    labels: np.ndarray  # source class per kept code
    sources: np.ndarray  # source training row per kept code
    n_searched: int  # source images searched
    regions: tuple[Component, ...]
    assign: np.ndarray  # region per kept code, -1 when in none


@torch.no_grad()
def draw_region(
    vae: VAE, region: Component, n: int, tau: float, rng: np.random.Generator
) -> torch.Tensor:
    """``n`` decoded samples of one region: codes from N(μ_k, τ·Σ_k) (τ = 1: the component's
    own spread; the reference's τ = 0.01 gives near-identical images)."""
    z = rng.multivariate_normal(region.mean, tau * region.cov, n)
    device = next(vae.parameters()).device
    return vae.decode(torch.as_tensor(z, dtype=torch.float32, device=device)).cpu()


@torch.no_grad()
def vae_quality(vae: VAE, train: ImageSet, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    """Per-pixel reconstruction MSE (posterior means) on up to 512 training images, and a preview
    grid tensor: 8 real images, their reconstructions, 8 prior samples."""
    device = next(vae.parameters()).device
    rows = torch.randperm(len(train), generator=gen)[:512]
    x = train.x[rows].to(device)
    recon = vae.decode(vae.encode(x)[0])
    mse = float(F.mse_loss(recon, x))
    prior = vae.decode(torch.randn(8, vae.mu.out_features, generator=gen).to(device))
    return mse, torch.cat([x[:8], recon[:8], prior]).cpu()


HELDOUT_FILE = "heldout.safetensors"
VAE_FILE = "vae.safetensors"


def save_vae(out_dir: Path, vae: VAE) -> Path:
    """The VAE's weights and shape (``channels``, ``side``, ``z_dim``, ``width`` as metadata)."""
    from safetensors.torch import save_file

    path = out_dir / VAE_FILE
    meta = {"channels": vae.channels, "side": vae.side, "z_dim": vae.z_dim, "width": vae.w}
    tensors = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
    return path


def load_vae(out_dir: Path) -> VAE:
    """The VAE :func:`save_vae` wrote under ``out_dir`` (CPU, eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = out_dir / VAE_FILE
    if not path.is_file():
        raise StageError(f"no VAE weights at {path}; run the vae augmenter")
    with safe_open(str(path), framework="pt") as fh:
        meta = {k: int(v) for k, v in (fh.metadata() or {}).items()}
    vae = VAE(meta["channels"], meta["side"], meta["z_dim"], meta["width"])
    vae.load_state_dict(load_file(str(path)))
    return vae.eval()


def save_heldout(out_dir: Path, x: torch.Tensor, g: torch.Tensor) -> Path:
    """Held-out region samples (``x``, region id ``g``): evaluation only, no trainer reads them."""
    from safetensors.torch import save_file

    path = out_dir / HELDOUT_FILE
    save_file({"x": x.contiguous(), "g": g.contiguous()}, str(path))
    return path


def read_heldout(out_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, region id)`` of the held-out region samples written by the ``vae`` augmenter."""
    from safetensors.torch import load_file

    path = out_dir / HELDOUT_FILE
    if not path.is_file():
        raise StageError(f"no held-out region samples at {path}; run the vae augmenter")
    tensors = load_file(str(path))
    return tensors["x"], tensors["g"]


class VAEAugmenter(Augmenter):
    name = "vae"

    def distill(self, ctx: StageContext, model: nn.Module, train: ImageSet) -> Distilled:
        """Train the VAE, find prediction-flipping codes, fit the DP mixture (steps 1-3)."""
        params = ctx.plugin_params(self.name)
        gen = seed_everything(ctx.seed)
        device = pick_device(ctx)
        steps = int(params.get("steps", 30 * ctx.params.budget.augment_epochs))
        ctx.progress(0.0, f"training VAE ({steps} steps)")
        vae = train_vae(train, params, steps, device, gen)
        ctx.progress(0.5, "searching latent perturbations that flip the prediction")
        model = model.to(device).eval()
        codes, labels, sources, searched = find_flips(vae, model, train, params, gen)
        ctx.log.info("run %s defuse: %d flipping latent codes", ctx.run_id, len(codes))
        if len(codes) < 4:
            raise StageError(
                f"the VAE search found {len(codes)} prediction-flipping perturbations; raise "
                "patch.params.vae.scale or n_perturb, or the model has no failure to distill"
            )
        ctx.progress(0.7, f"clustering {len(codes)} codes (DP Gaussian mixture)")
        regions, assign = fit_regions(codes, labels, params, ctx.seed)
        if not regions:
            raise StageError(
                f"no failure region has a weight above min_weight among {len(codes)} flipping "
                "codes; lower patch.params.vae.min_weight or search more sources"
            )
        return Distilled(vae, codes, labels, sources, searched, regions, assign)

    def synthesize(self, ctx: StageContext, model: nn.Module, train: ImageSet) -> Augmentation:
        params = ctx.plugin_params(self.name)
        found = self.distill(ctx, model, train)
        ctx.progress(0.85, f"sampling {len(found.regions)} failure regions")
        model = model.to(pick_device(ctx)).eval()
        extra, regions, realism = self.sample_regions(ctx, model, train, found, params)
        gen = torch.Generator().manual_seed(ctx.seed + 7)
        mse, grid = vae_quality(found.vae, train, gen)
        vae_png = save_grid(grid, ctx.out_dir / "previews" / "vae_samples.png", nrow=8)
        save_vae(ctx.out_dir, found.vae)
        vae_info = {
            "recon_mse": mse,
            "steps": int(params.get("steps", 30 * ctx.params.budget.augment_epochs)),
            "z_dim": int(found.vae.mu.out_features),
            "preview": vae_png.relative_to(ctx.out_dir).as_posix(),
        }
        body = {
            "schema": 2,
            "vae": vae_info,
            "flips": len(found.codes),
            "sources_searched": found.n_searched,
            "sources_with_flips": len(set(found.sources.tolist())),
            "realism": realism,
            "regions": [asdict(r) for r in regions],
        }
        (ctx.out_dir / "regions.json").write_text(json.dumps(body, indent=2, default=float))
        previews = tuple(ctx.out_dir / r.preview for r in regions)
        info = {
            "flips": len(found.codes),
            "regions": len(regions),
            "vae_recon_mse": mse,
            "realism_fd": realism["regions_fd"],
            "real_fd": realism["real_fd"],
        }
        return Augmentation(kind=self.name, extra=extra, previews=previews, info=info)

    @torch.no_grad()
    def sample_regions(
        self,
        ctx: StageContext,
        model: nn.Module,
        train: ImageSet,
        found: Distilled,
        params: dict[str, Any],
    ) -> tuple[ImageSet, list[Region], dict[str, float]]:
        """Training samples per region (``extra``), held-out samples per region (written to
        :data:`HELDOUT_FILE`, drawn from an independent stream) and each region's quality."""
        from patchd.plugins.augmenters import region_quality as rq

        rng = np.random.default_rng([ctx.seed, 1])
        held_rng = np.random.default_rng([ctx.seed, 2])
        n = int(params.get("samples_per_region", 64))
        n_held = int(params.get("heldout_per_region", 32))
        tau = float(params.get("tau", 1.0))
        if tau <= 0:
            raise StageError(f"patch.params.vae.tau must be > 0, got {tau}")
        train_pred = predict(model, train.x)
        mistakes = train.x[train_pred != train.y]
        pool = torch.randperm(len(train), generator=torch.Generator().manual_seed(ctx.seed))
        half = min(1000, len(train) // 2)
        real_feats = rq.feature_matrix(model, train.x[pool[:half]])
        images, held, held_g, regions = [], [], [], []
        for rid, comp in enumerate(found.regions):
            x = draw_region(found.vae, comp, n, tau, rng)
            held.append(draw_region(found.vae, comp, n_held, tau, held_rng))
            held_g.append(torch.full((n_held,), rid, dtype=torch.int64))
            label = comp.source_label
            preds = predict(model, x)
            counts = torch.bincount(preds, minlength=train.num_classes)
            real = train.x[train.y == label][:256]
            png = save_grid(x[:16], ctx.out_dir / "previews" / f"region_{rid}.png", nrow=8)
            regions.append(
                Region(
                    region=rid,
                    weight=comp.weight,
                    n_codes=comp.n_codes,
                    source_label=label,
                    source_name=train.class_names[label],
                    predicted=train.class_names[int(counts.argmax())],
                    prediction_mix={
                        train.class_names[c]: int(v) for c, v in enumerate(counts.tolist()) if v
                    },
                    preview=png.relative_to(ctx.out_dir).as_posix(),
                    spread=rq.mean_pairwise(x),
                    real_spread=rq.mean_pairwise(real),
                    novelty=rq.novelty(x, mistakes, real),
                    fd=rq.frechet(rq.feature_matrix(model, x), real_feats),
                )
            )
            images.append(x)
        all_x = torch.cat(images)
        save_heldout(ctx.out_dir, torch.cat(held), torch.cat(held_g))
        ref = pool[half : half + min(len(all_x), half)]
        realism = {
            "regions_fd": rq.frechet(rq.feature_matrix(model, all_x), real_feats),
            "real_fd": rq.frechet(rq.feature_matrix(model, train.x[ref]), real_feats),
            "n_regions_samples": len(all_x),
            "n_real_reference": len(ref),
        }
        extra = ImageSet(
            x=all_x,
            y=torch.cat([torch.full((n,), r.source_label, dtype=torch.int64) for r in regions]),
            g=torch.cat([torch.full((n,), r.region, dtype=torch.int64) for r in regions]),
            class_names=train.class_names,
            group_names=tuple(f"region={r.region}" for r in regions),
            ids=tuple(f"defuse-{r.region}-{i}" for r in regions for i in range(n)),
        )
        return extra, regions, realism


def read_labels(path: Path) -> dict[int, str]:
    """``{region: class name or 'invalid'}`` from the labels file (empty when none was given)."""
    return read_labels_file(path)[0]


def read_labels_file(path: Path) -> tuple[dict[int, str], str | None]:
    """The labels and who gave them (comma-joined, None when not recorded) from the labels file
    (:func:`patchd.runs.regions.read_labels`)."""
    try:
        found = region_store.read_labels(path)
    except ValidationError as err:
        raise StageError(str(err)) from err
    return dict(found.labels), found.people


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
