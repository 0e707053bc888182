"""The bounded set of subgroup labels the monitor reports on.

Group keys arrive canonical from ingest (``"a=x,b=y"``, already capped per attribute). The monitor
maps them once more onto the configured set: a value not in ``groups.values[attr]`` becomes the
overflow value (``other``), so metric labels can never grow past the configured bound. Attributes
without a fixed value list keep ingest's capped values; ``unknown`` (attribute missing from the
event) is kept as ingest writes it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from patchd.config import GroupsConfig

ALL = "*"  # the class label of a subgroup's row that pools every class
NO_GROUP = "all"  # the group of events when no subgroup attributes are configured
UNKNOWN = "unknown"  # ingest's value for an event that lacks an attribute (kept as is)


@dataclass(frozen=True)
class GroupSpace:
    attributes: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    overflow: str

    @classmethod
    def from_config(cls, groups: GroupsConfig) -> GroupSpace:
        values = {a: tuple(v) for a, v in groups.values.items()}
        return cls(tuple(groups.attributes), values, groups.overflow)

    def known(self) -> tuple[str, ...]:
        """Every key of the configured bounded set (pre-initialised series); () when open."""
        if not self.attributes:
            return (NO_GROUP,)
        if any(a not in self.values for a in self.attributes):
            return ()
        per_attr = [(*self.values[a], self.overflow) for a in self.attributes]
        return tuple(
            ",".join(f"{a}={v}" for a, v in zip(self.attributes, combo, strict=True))
            for combo in itertools.product(*per_attr)
        )

    def canonical(self, key: str) -> str:
        """Map one ingest group key onto the bounded set."""
        if not self.attributes:
            return NO_GROUP
        parsed = dict(part.split("=", 1) for part in key.split(",") if "=" in part)
        out = []
        for attr in self.attributes:
            value = parsed.get(attr, self.overflow)
            allowed = self.values.get(attr)
            if allowed is not None and value not in allowed and value != UNKNOWN:
                value = self.overflow
            out.append(f"{attr}={value}")
        return ",".join(out)

    def ordered(self, name: str) -> str:
        """An evaluation's group name (attributes sorted by name: ``patchd.ml.data.group_name``)
        in this space's attribute order, when it names exactly these attributes; else as is."""
        parsed = dict(part.split("=", 1) for part in name.split(",") if "=" in part)
        if not self.attributes or set(parsed) != set(self.attributes):
            return name
        return ",".join(f"{a}={parsed[a]}" for a in self.attributes)

    def canonical_array(self, keys: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`canonical` over an object array (maps each distinct key once)."""
        if len(keys) == 0:
            return np.asarray(keys, dtype=object)
        uniq, inverse = np.unique(keys.astype(str), return_inverse=True)
        mapped = np.array([self.canonical(k) for k in uniq], dtype=object)
        return mapped[inverse]
