"""Diffusion augmenter: route (a) with a tiny random Stable Diffusion pipeline loaded offline from
a local directory; route (b) trained on colored digits, sampling the minority cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from patchd.abc import StageContext
from patchd.config import BudgetConfig, DatasetSpec, PatchConfig
from patchd.ml.data import ImageSet
from patchd.plugins.augmenters.diffusion import DiffusionAugmenter, minority_cells

torch.set_num_threads(1)


def byte_vocab() -> dict[str, int]:
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return vocab


def tiny_sd_dir(root: Path) -> Path:
    """diffusers' get_dummy_components(), with a byte-level tokenizer written locally."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    vocab = byte_vocab()
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            max_position_embeddings=32,
        )
    )
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=32
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    out = root / "tiny-sd"
    pipe.save_pretrained(out)
    return out


def toy_set(n_major: int = 12, n_minor: int = 3, side: int = 16) -> ImageSet:
    y = torch.tensor([0] * (n_major + n_minor) + [1] * (n_major + n_minor))
    g = torch.tensor([0] * n_major + [1] * n_minor + [1] * n_major + [0] * n_minor)
    x = torch.rand(len(y), 3, side, side)
    return ImageSet(
        x, y, g, ("a", "b"), ("color=red", "color=green"), tuple(str(i) for i in range(len(y)))
    )


def test_minority_cells_are_the_rare_subgroup_of_each_class() -> None:
    assert minority_cells(toy_set(), 0.5) == [(0, 1), (1, 0)]
    assert minority_cells(toy_set(n_minor=12), 0.5) == []


def test_route_a_tiny_stable_diffusion_runs_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = tiny_sd_dir(tmp_path)
    params = PatchConfig(
        diffusion_checkpoint=sd,
        params={
            "diffusion": {
                "samples_per_cell": 2,
                "sample_steps": 2,
                "resolution": 32,
                "alpha": 1.5,
                "prompts": {"a|color=green": "a photo of an a on green"},
            }
        },
    )
    ctx = StageContext(run_id="r-sd", stage="synthesize", out_dir=tmp_path / "out", params=params)
    train = toy_set()
    aug = DiffusionAugmenter().synthesize(ctx, torch.nn.Identity(), train)
    assert aug.info["route"] == "pretrained"
    assert aug.extra is not None and aug.extra.x.shape == (4, 3, 16, 16)
    assert aug.extra.y.tolist() == [0, 0, 1, 1] and aug.extra.g.tolist() == [1, 1, 0, 0]
    assert float(aug.extra.x.min()) >= 0 and float(aug.extra.x.max()) <= 1
    assert [p.name for p in aug.previews] == [
        "diffusion_a-color-green.png",
        "diffusion_b-color-red.png",
    ]
    assert all(p.is_file() for p in aug.previews)


@pytest.mark.slow
def test_route_b_conditional_samples_fill_the_minority_cells(tmp_path: Path) -> None:
    from patchd.ml.datasets import load_splits

    train = load_splits(DatasetSpec(kind="colored-digits")).train
    params = PatchConfig(
        budget=BudgetConfig(samples_per_cell=6),
        params={"diffusion": {"steps": 30, "channels": 8, "sample_steps": 3}},
    )
    ctx = StageContext(run_id="r-b", stage="synthesize", out_dir=tmp_path, params=params)
    aug = DiffusionAugmenter().synthesize(ctx, torch.nn.Identity(), train)
    assert aug.info["route"] == "conditional"
    extra = aug.extra
    assert extra is not None and extra.x.shape == (12, *train.x.shape[1:])
    assert extra.group_names == train.group_names and extra.class_names == train.class_names
    cells = sorted(set(zip(extra.y.tolist(), extra.g.tolist(), strict=True)))
    assert cells == minority_cells(train, 0.5) == [(0, 1), (1, 0)]
    assert len(aug.previews) == 2 and all(p.is_file() for p in aug.previews)
