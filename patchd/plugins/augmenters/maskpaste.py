"""``maskpaste`` augmenter: subgroup translation that moves real pixels instead of generating them.

Locating a subgroup's feature is easy; generating it faithfully is hard (a CycleGAN hides the
position of a removed sticker in a faint code and paints added ones in one corner; see
``research/synthesis_fidelity.md``). So, per class and between its two largest subgroups A, B:

1. **Locate.** A fully convolutional locator with two per-pixel heads, one per group, trained as
   multiple-instance detectors: an image's score for group k is the max over its pixels of head
   k (BCE against "is the image in group k"). Head k's sigmoid map is where group k's feature is.
   A head is *valid* when it separates the groups on held-out rows (AUROC >= ``min_auroc``): a
   present feature (a sticker, a colour) has one; an absent one (no sticker) cannot.
2. **Move real pixels.** To translate x (group s) to group t, a donor d is drawn from the real
   images of (class, t), so positions and appearance follow the real group:
   - the target's feature is *localized* (its mask covers < ``local_area`` of the image): x's own
     s-feature region is filled from the donor, then the donor's t-feature is pasted at the
     donor's position (a sticker moves with its real position; removing one takes a clean donor's
     pixels there);
   - the target's feature is *global* (a background colour or texture): only x's own s-feature
     region changes, taking the donor's pixels where the donor shows its feature there and the
     group's mean feature colour elsewhere, so the object is never overwritten;
   - neither head valid: no feature could be located; the rows keep ``F = G = x`` and the info
     says why (the fidelity policy then drops the class).

Output as the ``cyclegan`` augmenter's: ``paired={"F", "G"}`` aligned with the training rows
(for x in A, G(x) is x in B and F(x) = x; for x in B the reverse), previews per class and
direction, and ``info["classes"]`` with each class's locator quality and route.

One locator serves every class that translates between the same two groups (``share``, on by
default): its batches draw each class x group cell equally often, so the group is independent
of the class there and a head learns the feature, not the class; a class's scarce minority (25
stickered T-shirts) borrows the feature's examples from the class where it is common. Each head
is judged per class, on that class's out-of-fold scores.

Hyperparameters (``patch.params.maskpaste``): ``steps`` 300, ``batch_size`` 32, ``width`` 16,
``threshold`` 0.5 (detections = sigmoid map above it; the mask is the detections grown to the
pixels within ``colour_tol`` 0.12 of their colour, dilated by one pixel), ``min_auroc`` 0.9,
``local_area`` 0.25, ``share`` true (false: one locator per class).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from patchd.abc import Augmentation, Augmenter, StageContext
from patchd.ml.data import ImageSet
from patchd.ml.fidelity import class_pairs
from patchd.plugins.augmenters.previews import save_triplets
from patchd.plugins.trainers.base import pick_device


@dataclass(frozen=True)
class PasteConfig:
    steps: int = 300
    batch_size: int = 32
    width: int = 16
    threshold: float = 0.5
    min_auroc: float = 0.9
    local_area: float = 0.25
    colour_tol: float = 0.12
    share: bool = True

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PasteConfig:
        known = {k: type(getattr(cls(), k))(params[k]) for k in asdict(cls()) if k in params}
        return cls(**known)


def _head(channels: int, width: int) -> nn.Sequential:
    """One per-pixel detector (full resolution, receptive field 9 px)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 1, 1),
    )


class Locator(nn.Module):
    """Per-pixel logits of the two groups' features, one independent detector each.

    The detectors share nothing: a group without a feature of its own (no sticker) cannot be
    detected by any pixel, and its futile loss must not bend the other group's detector.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([_head(channels, width), _head(channels, width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level logits [N, 2]: the max over pixels of each head."""
        return self.forward(x).flatten(2).amax(2)


@dataclass(frozen=True)
class Located:
    """One class's rows as the locator sees them: images, group (0/1 in the locator's order),
    out-of-fold image scores [N, 2] and feature masks [N, 2, H, W]."""

    x: torch.Tensor
    member: torch.Tensor
    held: torch.Tensor
    masks: torch.Tensor


@dataclass(frozen=True)
class ClassRoute:
    """What was learned for one class: head quality and how each direction translates."""

    cls: int
    groups: tuple[int, int]
    auroc: tuple[float, float]
    valid: tuple[bool, bool]
    area: tuple[float, float]  # mean mask fraction of each head on its own group
    localized: tuple[bool, bool]
    note: str = ""


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve (rank statistic; 0.5 when a side is empty)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    ranks = torch.empty(len(scores))
    ranks[torch.argsort(scores)] = torch.arange(1, len(scores) + 1, dtype=torch.float32)
    return float((ranks[positive].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fit_locator(
    x: torch.Tensor,
    member: torch.Tensor,
    strata: torch.Tensor,
    cfg: PasteConfig,
    seed: int,
    device: torch.device,
) -> Locator:
    """Train the two heads; ``member`` is 0 (group A) or 1 (group B) per image.

    Batches draw every stratum (a class x group cell) equally often, so across classes the
    group is independent of the class and no head can learn the class instead of the feature.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    locator = Locator(x.shape[1], cfg.width).to(device)
    optimizer = torch.optim.Adam(locator.parameters(), lr=2e-3)
    targets = torch.stack([member == 0, member == 1], 1).float()
    _, cell = strata.unique(return_inverse=True)
    weights = (1.0 / torch.bincount(cell).float())[cell]
    locator.train()
    for _ in range(cfg.steps):
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=generator)
        logits = locator.scores(x[idx].to(device))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets[idx].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return locator.eval()


@torch.no_grad()
def feature_maps(locator: Locator, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sigmoid maps [N, 2, H, W] on CPU."""
    out = [torch.sigmoid(locator(chunk.to(device))).cpu() for chunk in torch.split(x, 256)]
    return torch.cat(out) if out else torch.zeros(0, 2, *x.shape[2:])


def masks(maps: torch.Tensor, x: torch.Tensor, threshold: float, colour_tol: float) -> torch.Tensor:
    """Binary masks [N, 2, H, W]: each head's detections grown to the pixels of their colour,
    then dilated by one pixel.

    A multiple-instance detector needs only one pixel to call an image, so its map marks where
    the feature is, not all of it; a feature's extent (a whole background, a whole sticker) is
    the detections' own colour around them. Pixels within ``colour_tol`` (RGB distance) of the
    mean colour of an image's detections join its mask.
    """
    seeds = maps > threshold
    grown = seeds.clone()
    for k in range(maps.shape[1]):
        weight = seeds[:, k : k + 1].float()
        count = weight.sum(dim=(2, 3), keepdim=True)
        colour = (x * weight).sum(dim=(2, 3), keepdim=True) / count.clamp(min=1)
        near = (x - colour).norm(dim=1) < colour_tol
        grown[:, k] |= near & (count[:, 0] > 0)
    return nn.functional.max_pool2d(grown.float(), 3, stride=1, padding=1)


def learn_route(
    x: torch.Tensor,
    member: torch.Tensor,
    strata: torch.Tensor,
    cfg: PasteConfig,
    seed: int,
    device: torch.device,
) -> tuple[Locator, torch.Tensor]:
    """A locator on all rows, and every row's out-of-fold image scores [N, 2].

    Cross-fitting (2 folds, each stratum split in halves) scores every row with a locator that
    did not see it, so even a minority group of four examples is judged on all four.
    """
    fold = stratified_folds(strata, seed)
    held_scores = torch.zeros(len(x), 2)
    for k in (0, 1):
        train = fold != k
        probe = fit_locator(x[train], member[train], strata[train], cfg, seed + k, device)
        with torch.no_grad():
            held_scores[fold == k] = probe.scores(x[fold == k].to(device)).cpu()
    return fit_locator(x, member, strata, cfg, seed, device), held_scores


def stratified_folds(strata: torch.Tensor, seed: int) -> torch.Tensor:
    """Fold 0 or 1 per row, each stratum split in halves (seeded)."""
    fold = torch.zeros_like(strata)
    gen = torch.Generator().manual_seed(seed)
    for value in strata.unique():
        rows = (strata == value).nonzero()[:, 0]
        order = rows[torch.randperm(len(rows), generator=gen)]
        fold[order[1::2]] = 1
    return fold


def translate(
    x: torch.Tensor,
    donors: torch.Tensor,
    mask_x: torch.Tensor,
    mask_d: torch.Tensor,
    localized: bool,
    fill: torch.Tensor | None,
) -> torch.Tensor:
    """x's own feature region ``mask_x`` and the donors' feature region ``mask_d``: [N,1,H,W].

    ``fill`` is the target group's mean feature colour [C] (global targets), or None.
    """
    if localized or fill is None:
        cleared = x * (1 - mask_x) + donors * mask_x
        return cleared * (1 - mask_d) + donors * mask_d
    content = donors * mask_d + fill[None, :, None, None] * (1 - mask_d)
    return x * (1 - mask_x) + content * mask_x


def locator_sets(
    pairs: dict[int, tuple[int, int]], share: bool
) -> list[tuple[tuple[int, int], list[int]]]:
    """The locators to fit: each one's (sorted) pair of groups and the classes it serves.

    With ``share`` every class that translates between the same two groups shares one locator:
    a group's feature (a sticker, a colour) looks the same on every class, and a class's scarce
    minority borrows the other classes' examples of it. Without, one locator per class.
    """
    if not share:
        return [((min(pair), max(pair)), [cls]) for cls, pair in sorted(pairs.items())]
    sets: dict[tuple[int, int], list[int]] = {}
    for cls, pair in sorted(pairs.items()):
        sets.setdefault((min(pair), max(pair)), []).append(cls)
    return list(sets.items())


class MaskPasteAugmenter(Augmenter):
    def synthesize(self, ctx: StageContext, model: nn.Module, train: ImageSet) -> Augmentation:
        cfg = PasteConfig.from_params(ctx.plugin_params("maskpaste"))
        device = pick_device(ctx)
        f, g = train.x.clone(), train.x.clone()
        routes, previews = [], []
        pairs = class_pairs(train)
        sets = locator_sets(pairs, cfg.share)
        for i, (groups, classes) in enumerate(sets):
            ctx.progress(i / max(1, len(sets)), f"maskpaste classes {classes}")
            rows = torch.isin(train.y, torch.tensor(classes)) & torch.isin(
                train.g, torch.tensor(groups)
            )
            x, y = train.x[rows], train.y[rows]
            member = (train.g[rows] == groups[1]).long()
            locator, held = learn_route(
                x, member, y * 2 + member, cfg, ctx.seed + classes[0], device
            )
            hard = masks(feature_maps(locator, x, device), x, cfg.threshold, cfg.colour_tol)
            for cls in classes:
                own = y == cls
                located = Located(x[own], member[own], held[own], hard[own])
                route, done = self.route_class(ctx, cls, pairs[cls], groups, located, cfg)
                routes.append(asdict(route))
                a_rows, b_rows = [(train.y == cls) & (train.g == k) for k in pairs[cls]]
                g[a_rows], f[b_rows] = done[0], done[1]
                previews += self.write_previews(ctx, train, f, g, cls, pairs[cls])
        return Augmentation(
            kind="maskpaste",
            paired={"F": f, "G": g},
            previews=tuple(previews),
            info={"classes": routes, "params": asdict(cfg)},
        )

    def route_class(
        self,
        ctx: StageContext,
        cls: int,
        pair: tuple[int, int],
        groups: tuple[int, int],
        located: Located,
        cfg: PasteConfig,
    ) -> tuple[ClassRoute, tuple[torch.Tensor, torch.Tensor]]:
        """The route of one class and its translations (A→B for A's rows, B→A for B's rows).

        ``located`` holds the class's rows in the locator's group order (``groups``, member 0
        or 1); the route and the translations are returned in the class's own order ``pair``.
        """
        x, member, hard = located.x, located.member, located.masks
        quality = tuple(auroc(located.held[:, k], member == k) for k in (0, 1))
        valid = (quality[0] >= cfg.min_auroc, quality[1] >= cfg.min_auroc)
        area = tuple(
            float(hard[member == k, k].mean()) if (member == k).any() else 0.0 for k in (0, 1)
        )
        localized = (area[0] < cfg.local_area, area[1] < cfg.local_area)
        order = (0, 1) if pair[0] == groups[0] else (1, 0)

        def in_class_order(values: tuple[Any, ...]) -> Any:
            return (values[order[0]], values[order[1]])

        route = ClassRoute(
            cls, pair, *(in_class_order(v) for v in (quality, valid, area, localized))
        )
        if not any(valid):
            note = "no group feature could be located (both heads below min_auroc): identity"
            ctx.log.warning("run %s maskpaste class %d: %s", ctx.run_id, cls, note)
            return replace(route, note=note), in_class_order((x[member == 0], x[member == 1]))
        generator = torch.Generator().manual_seed(ctx.seed * 7919 + cls)
        out = []
        for s, t in ((0, 1), (1, 0)):
            src, dst = member == s, member == t
            pick = torch.randint(int(dst.sum()), (int(src.sum()),), generator=generator)
            donors, donor_masks = x[dst][pick], hard[dst][pick]
            mask_x = hard[src][:, s : s + 1] if valid[s] else torch.zeros_like(x[src][:, :1])
            mask_d = donor_masks[:, t : t + 1] if valid[t] else torch.zeros_like(mask_x)
            fill = _mean_colour(x[dst], hard[dst][:, t]) if valid[t] else None
            out.append(translate(x[src], donors, mask_x, mask_d, localized[t], fill))
        ctx.log.info("run %s maskpaste class %d: %s", ctx.run_id, cls, route)
        return route, in_class_order((out[0], out[1]))

    def write_previews(
        self,
        ctx: StageContext,
        train: ImageSet,
        f: torch.Tensor,
        g: torch.Tensor,
        cls: int,
        pair: tuple[int, int],
    ) -> list[Any]:
        paths = []
        folder = ctx.out_dir / "previews"
        for group in pair:
            idx = ((train.y == cls) & (train.g == group)).nonzero(as_tuple=True)[0][:8]
            if len(idx):
                name = (
                    f"maskpaste-{_slug(train.class_names[cls])}-{_slug(train.group_names[group])}"
                )
                path = folder / f"{name}.png"
                paths.append(save_triplets(train.x[idx], f[idx], g[idx], path))
        return paths


def _mean_colour(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pixel value [C] inside the masks (the whole image where no mask is set)."""
    weight = mask[:, None]
    total = weight.sum()
    if total < 1:
        return x.mean(dim=(0, 2, 3))
    return (x * weight).sum(dim=(0, 2, 3)) / total


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:40] or "x"
