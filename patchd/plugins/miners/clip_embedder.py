"""CLIP image/text embeddings from a LOCAL open_clip checkpoint (never a download).

``patch.clip_checkpoint`` is either
- a directory holding ``open_clip_config.json`` plus weights (``open_clip_model.safetensors``
  preferred), loaded with open_clip's ``local-dir:`` schema; or
- a weights file (``.safetensors``, ``.bin``, ``.pt``) for the architecture named by the miner's
  ``clip_model`` parameter (default ``ViT-B-32``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from patchd.exceptions import DependencyMissingError, StageError

log = logging.getLogger(__name__)

WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_model.bin",
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip():  # noqa: ANN202 - the module
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only
    try:
        import open_clip
    except ImportError as err:
        raise DependencyMissingError(
            "CLIP mining needs open_clip_torch: pip install 'patchd[worker]'"
        ) from err
    return open_clip


def _model_name(checkpoint: Path, arch: str) -> tuple[str, str | None]:
    """(open_clip model name, pretrained file or None) for a directory or a weights file."""
    if checkpoint.is_dir():
        if not (checkpoint / "open_clip_config.json").is_file():
            raise StageError(f"CLIP checkpoint directory {checkpoint} has no open_clip_config.json")
        if not any((checkpoint / n).is_file() for n in WEIGHT_NAMES):
            raise StageError(
                f"CLIP checkpoint directory {checkpoint} has no weights (one of {WEIGHT_NAMES})"
            )
        return f"local-dir:{checkpoint}", None
    if checkpoint.is_file():
        return arch, str(checkpoint)
    raise StageError(f"CLIP checkpoint {checkpoint} does not exist (patch.clip_checkpoint)")


class ClipEmbedder:
    """Embeds images (tensors in [0, 1]) and texts with a local open_clip model."""

    def __init__(
        self, checkpoint: Path, arch: str = "ViT-B-32", device: str | torch.device = "cpu"
    ) -> None:
        open_clip = _open_clip()
        name, pretrained = _model_name(Path(checkpoint), arch)
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, pretrained_text=False
            )
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            raise StageError(f"cannot load CLIP checkpoint {checkpoint} as {name}: {err}") from err
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = torch.device(device)
        size = getattr(model.visual, "image_size", 224)
        self.image_size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        log.info("CLIP embedder %s loaded from %s", name, checkpoint)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(
            x.float(), size=self.image_size, mode="bicubic", align_corners=False
        ).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN)[None, :, None, None]
        std = torch.tensor(CLIP_STD)[None, :, None, None]
        return ((x - mean) / std).to(self.device)

    def embed_images(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] → [N, D] L2-normalised (a plain resize, as Jain et al.)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out = []
        with torch.no_grad():
            for batch in torch.split(x, batch_size):
                out.append(self.model.encode_image(self._prepare(batch), normalize=True).cpu())
        return torch.cat(out) if out else torch.zeros((0, 0))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw (projected, normalised) text embeddings [T, D]."""
        with torch.no_grad():
            tokens = self.tokenizer(list(texts)).to(self.device)
            return self.model.encode_text(tokens, normalize=True).float().cpu()
