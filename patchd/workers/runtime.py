"""What every stage needs inside the work horse: device, seeds, the incumbent model, a context.

Model-loading failures (a factory that does not import, weights that do not fit the
architecture, a missing weights file) become :class:`StageError` messages naming the factory or
the file and the fix, so they show on the run instead of as a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from patchd.abc import StageContext
from patchd.exceptions import IntegrityError, NotFoundError, PatchdError, StageError
from patchd.runs import jobqueue

if TYPE_CHECKING:
    import torch

    from patchd.config import Config
    from patchd.runs.recipe import Recipe

log = logging.getLogger(__name__)


def pick_device() -> str:
    from patchd.ml.models import pick_device as torch_device

    return torch_device().type


def seed_everything(seed: int) -> None:
    from patchd.ml.training import seed_everything as seed_all

    seed_all(seed)


def make_context(
    recipe: Recipe, config: Config, stage: str, out_dir: Path, run_id: str
) -> StageContext:
    return StageContext(
        run_id=run_id,
        stage=stage,
        out_dir=out_dir,
        params=config.patch,
        device=pick_device(),
        seed=config.patch.seed,
        progress=jobqueue.report_progress,
        log=logging.getLogger(f"patchd.stage.{stage}"),
    )


def build_model(config: Config) -> torch.nn.Module:
    """The configured architecture (no weights); errors name the factory."""
    from patchd.ml.models import build_model as _build

    try:
        return _build(config.model)
    except PatchdError:
        raise  # its message already names the factory
    except Exception as err:
        raise StageError(
            f"model.factory {config.model.factory!r} failed ({type(err).__name__}: {err}); "
            "check the 'module:callable' path and model.factory_kwargs"
        ) from err


def load_weights(model: torch.nn.Module, path: Path, expected_sha256: str = "") -> torch.nn.Module:
    """Load safetensors weights into ``model``; a digest or shape mismatch is a StageError."""
    from patchd.ml.models import load_weights as _load
    from patchd.workers.artifacts import sha256_file

    if not path.is_file():
        raise StageError(f"weights file {path} does not exist; fix model.weights or the registry")
    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise IntegrityError(
            f"weights {path} changed since the run was created (sha256 != {expected_sha256})"
        )
    try:
        _load(model, path)
    except StageError:
        raise
    except PatchdError as err:
        raise StageError(f"weights {path}: {err}") from err
    except Exception as err:
        raise StageError(
            f"weights {path} do not fit the architecture of the configured model.factory "
            f"({type(err).__name__}: {str(err)[:300]})"
        ) from err
    return model


def incumbent_path(recipe: Recipe, config: Config) -> Path:
    """The incumbent's weights here: from a bucket registry, fetched into the local cache and
    checked; otherwise the file the recipe names (on a filesystem this machine shares)."""
    if recipe.incumbent_source == "registry" and config.registry_url:
        from patchd.promotion.registry import open_registry

        try:
            version = open_registry(config).get(recipe.model, recipe.incumbent_sha256)
        except NotFoundError as err:
            raise StageError(f"the incumbent is not in the registry: {err}") from err
        return version.weights_path
    return Path(recipe.incumbent_path)


def load_incumbent(recipe: Recipe, config: Config) -> torch.nn.Module:
    model = build_model(config)
    load_weights(model, incumbent_path(recipe, config), recipe.incumbent_sha256)
    return model.eval()
