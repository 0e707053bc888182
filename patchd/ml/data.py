"""The in-memory image dataset every ML stage passes around.

Built-in and user datasets load into an :class:`ImageSet`: images as a float tensor in [0, 1],
labels, and a subgroup index per example. A *cell* is a (class, subgroup) pair; worst-group
metrics are taken over cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

UNKNOWN_GROUP = -1


def group_name(attributes: Mapping[str, object]) -> str | None:
    """The canonical subgroup name of attribute values: ``a=x,b=y``, attributes sorted by name.

    Every place that names a subgroup (a dataset's group columns, a production event's
    ``groups``) uses this one order, so the same attribute values are always the same cell.
    None when there are no attributes (the group is unknown).
    """
    return ",".join(f"{k}={attributes[k]}" for k in sorted(attributes)) or None


@dataclass(frozen=True)
class ImageSet:
    x: torch.Tensor  # float32 [N, C, H, W] in [0, 1]
    y: torch.Tensor  # int64 [N] class index
    g: torch.Tensor  # int64 [N] index into group_names, UNKNOWN_GROUP when not known
    class_names: tuple[str, ...]
    group_names: tuple[str, ...]  # e.g. ("color=red", "color=green")
    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.y.shape != (n,) or self.g.shape != (n,) or len(self.ids) != n:
            raise ValueError(
                f"ImageSet parts disagree: x has {n} rows, y {tuple(self.y.shape)}, "
                f"g {tuple(self.g.shape)}, ids {len(self.ids)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_groups(self) -> bool:
        return len(self) > 0 and bool((self.g != UNKNOWN_GROUP).all())

    def subset(self, index: torch.Tensor) -> ImageSet:
        """Rows selected by a bool mask or an index tensor."""
        if index.dtype == torch.bool:
            index = index.nonzero(as_tuple=True)[0]
        return replace(
            self,
            x=self.x[index],
            y=self.y[index],
            g=self.g[index],
            ids=tuple(self.ids[i] for i in index.tolist()),
        )

    def with_groups(self, g: torch.Tensor, group_names: tuple[str, ...]) -> ImageSet:
        """The same images with another subgroup assignment (e.g. mined pseudo-groups)."""
        return replace(self, g=g.to(torch.int64), group_names=group_names)

    def cell_index(self) -> torch.Tensor:
        """Cell id per example: class * len(group_names) + group.

        Without group names every example is in its class's one cell. With group names an
        example whose group is unknown has cell id ``UNKNOWN_GROUP``: it is no group's cell.
        """
        if not self.group_names:
            return self.y.clone()
        cells = self.y * len(self.group_names) + self.g
        return torch.where(self.g < 0, UNKNOWN_GROUP, cells)


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
