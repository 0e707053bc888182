"""The recipe of a patch run: everything a worker needs, fixed when serve creates the run.

Serve builds it (config with the request's overrides applied, the resolved incumbent weights and
their digest, the exported slice) and passes it as JSON to every stage job, so a worker never
reads serve's config file or store. Stored verbatim in the run record.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from patchd.config import Config, build_config
from patchd.exceptions import ValidationError

SCHEMA = 1
OVERRIDABLE = frozenset({"miner", "augmenter", "trainer", "budget", "params", "seed"})


@dataclass(frozen=True)
class Recipe:
    model: str
    miner: str
    augmenter: str
    trainer: str
    incumbent_path: str  # safetensors file the candidate is fine-tuned from
    incumbent_sha256: str
    incumbent_source: str  # "registry" | "config"
    slice_path: str  # <artifacts>/runs/<run_id>/slice.jsonl
    slice_rows: int
    config: dict[str, Any]  # the effective Config (JSON dump)
    schema: int = SCHEMA
    slice_sha256: str = ""  # what a worker checks the slice it reads against ("": not checked)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        data = json.loads(text)
        if data.get("schema") != SCHEMA:
            raise ValidationError("bad_recipe", f"recipe schema {data.get('schema')!r} != {SCHEMA}")
        return cls(**data)

    def effective_config(self) -> Config:
        return build_config(self.config)

    def summary(self) -> dict[str, Any]:
        """What the API shows (no full config)."""
        budget = self.config.get("patch", {}).get("budget", {})
        return {
            "miner": self.miner,
            "augmenter": self.augmenter,
            "trainer": self.trainer,
            "budget": budget,
            "incumbent_sha256": self.incumbent_sha256,
            "incumbent_source": self.incumbent_source,
            "slice_rows": self.slice_rows,
        }


def apply_overrides(config: Config, overrides: dict[str, Any] | None) -> Config:
    """``patch`` fields a request may override (miner, augmenter, trainer, budget, params, seed)."""
    if not overrides:
        return config
    unknown = set(overrides) - OVERRIDABLE
    if unknown:
        raise ValidationError(
            "bad_recipe",
            f"cannot override {sorted(unknown)}; a recipe may set {sorted(OVERRIDABLE)}",
            field="recipe",
        )
    data = config.model_dump(mode="json")
    patch = data["patch"]
    for key, value in overrides.items():
        if key == "budget" and isinstance(value, dict):
            patch["budget"] = {**patch["budget"], **value}
        else:
            patch[key] = value
    return build_config(data)


def build_recipe(
    config: Config,
    incumbent: tuple[Path, str, str],
    slice_path: Path,
    slice_rows: int,
    slice_sha256: str = "",
) -> Recipe:
    path, sha, source = incumbent
    return Recipe(
        model=config.model.name,
        miner=config.patch.miner,
        augmenter=config.patch.augmenter,
        trainer=config.patch.trainer,
        incumbent_path=str(path),
        incumbent_sha256=sha,
        incumbent_source=source,
        slice_path=str(slice_path),
        slice_rows=slice_rows,
        config=config.model_dump(mode="json"),
        slice_sha256=slice_sha256,
    )
