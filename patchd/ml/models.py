"""Classifiers: built-in architectures, the configured factory, safetensors weights, features.

The architecture always comes from code (a ``module:callable`` factory); weights come from
safetensors files only, so loading a model never unpickles anything from outside.

- :func:`build_model` builds the configured architecture (``config.model``), with the
  configured input normalization as a forward pre-hook.
- :func:`save_weights` / :func:`load_weights`: atomic safetensors write, strict checked load.
- :func:`features`: penultimate features of any classifier (input of its last ``nn.Linear``).
- :func:`pooled_features`: global max- and mean-pooled channels of its last spatial activation.
- :func:`predict`: class probabilities.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from patchd.digests import sha256_file
from patchd.exceptions import PluginError, StageError

if TYPE_CHECKING:
    from patchd.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256


class SmallCNN(nn.Module):
    """Two conv layers, adaptive pooling (any image size), a hidden layer and a linear head."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 4 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def small_cnn(num_classes: int = 2, in_channels: int = 3, width: int = 16) -> nn.Module:
    """The built-in small CNN (the colored-digits / colored-fmnist base model)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)


def resnet18(num_classes: int = 2) -> nn.Module:
    """torchvision ResNet-18, randomly initialised (no download)."""
    from torchvision.models import resnet18 as tv_resnet18

    return tv_resnet18(weights=None, num_classes=num_classes)


def resolve_callable(path: str) -> Callable[..., Any]:
    """``module:attr`` → the object; PluginError naming the path when it is not importable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"factory {path!r} must look like 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PluginError(
            f"factory {path!r}: cannot import module {module_name!r} ({err}); "
            "check model.factory and that the package is installed"
        ) from err
    obj: object = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise PluginError(f"factory {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise PluginError(f"factory {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def build_model(model_config: ModelConfig) -> nn.Module:
    """Build the configured architecture from ``factory`` + ``factory_kwargs`` (no weights).

    With ``model.input_normalization`` the model gets a :class:`InputNormalizer` forward
    pre-hook: every caller keeps handing it RGB in [0, 1] and the module sees normalized inputs,
    while its state dict (the safetensors weights) is unchanged.
    """
    model = build_from_factory(model_config.factory, model_config.factory_kwargs)
    norm = model_config.input_normalization
    if norm is not None:
        model.register_forward_pre_hook(InputNormalizer(norm.mean, norm.std))
    return model


class InputNormalizer:
    """Forward pre-hook ``x -> (x - mean) / std`` per channel on a model's first input."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        channels = self.mean.shape[1]
        if x.ndim != 4 or channels not in (1, x.shape[1]):
            raise StageError(
                f"model.input_normalization has {channels} channel values but the model input "
                f"has shape {tuple(x.shape)}; give one mean/std per channel of [N, C, H, W]"
            )
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        return ((x - mean) / std, *args[1:])


def build_from_factory(factory: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    fn = resolve_callable(factory)
    try:
        model = fn(**dict(kwargs or {}))
    except TypeError as err:
        raise PluginError(
            f"factory {factory!r} rejected its kwargs {dict(kwargs or {})}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise PluginError(
            f"factory {factory!r} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_weights(module: nn.Module, path: Path) -> str:
    """Write the module's state dict as safetensors atomically; return the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(_state_tensors(module), str(tmp), metadata={"format": "pt"})
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o644)  # mkstemp makes 0600; model servers under another user must read it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return sha256_file(path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU tensors; StageError when missing or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise StageError(f"weights file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise StageError(
            f"weights file {path} is not a readable safetensors file ({err}); "
            "patchd loads safetensors only (convert with safetensors.torch.save_file)"
        ) from err


def _strip_prefix(
    tensors: dict[str, torch.Tensor], prefix: str = "module."
) -> dict[str, torch.Tensor]:
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def weights_mismatch(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable problems between a module's state dict and loaded tensors (empty: fits)."""
    expected = module.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if shapes:
        problems.append(f"shape mismatch {_short(shapes)}")
    return problems


def _short(items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


def load_weights(module: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``module`` strictly; StageError listing every mismatch."""
    tensors = _strip_prefix(read_safetensors(path))
    problems = weights_mismatch(module, tensors)
    if problems:
        raise StageError(
            f"weights {path} do not match the architecture {type(module).__name__}: "
            + "; ".join(problems)
            + ". Check model.factory / model.factory_kwargs (e.g. num_classes) against the weights"
        )
    module.load_state_dict(tensors, strict=True)
    return module


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` in registration order (the classification head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StageError(
            f"model {type(model).__name__} has no nn.Linear layer; penultimate features need one "
            "as the classification head"
        )
    return linears[-1]


def _batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(x, max(1, batch_size)))


def features(model: nn.Module, x: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """Penultimate features [N, D] on CPU: the input of the model's last nn.Linear."""
    head = last_linear(model)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach().flatten(1).float().cpu())

    handle = head.register_forward_pre_hook(hook)
    try:
        _run_batches(model, x, batch_size)
    finally:
        handle.remove()
    if not captured:
        return torch.zeros((0, head.in_features))
    return torch.cat(captured)


def pooled_features(
    model: nn.Module, x: torch.Tensor, batch_size: int = DEFAULT_BATCH
) -> torch.Tensor | None:
    """[N, 2C] on CPU: per channel, the max and the mean over the positions of the model's last
    spatial activation (the last module output, in forward order, that is ``[N, C, H, W]`` with
    H x W > 1); None when the model has none (an MLP).

    Why a second feature space: on the examples a model was trained on, its penultimate features
    are memorized toward the class (a minority example it fits looks like the majority there),
    while the channels of a spatial stage, pooled over positions, still say *what* is in the
    image and not *where* (a sticker anywhere lights the same channel's max).
    ``patchd bench mining`` measures both."""
    last: list[torch.Tensor] = []
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output[0, 0].numel() > 1:
            last[:] = [output]

    def pool(_module: nn.Module, _inputs: object, _output: object) -> None:
        # the model's own hook runs after every submodule's: ``last`` is this batch's
        if last:
            a = last.pop().float()
            captured.append(torch.cat([a.amax((2, 3)), a.mean((2, 3))], 1).cpu())

    handles = [m.register_forward_hook(keep) for m in model.modules()]
    handles.append(model.register_forward_hook(pool))
    try:
        batches = len(_run_batches(model, x, batch_size))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(captured) if captured and len(captured) == batches else None


def _run_batches(model: nn.Module, x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [model(b.to(device)).float().cpu() for b in _batches(x, batch_size)]
    finally:
        model.train(was_training)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """Class probabilities [N, K] on CPU (softmax of the logits), in eval mode."""
    outs = _run_batches(model, x, batch_size)
    if not outs:
        return torch.zeros((0, last_linear(model).out_features))
    return torch.softmax(torch.cat(outs), dim=1)
