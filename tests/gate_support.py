"""Helpers for the gate tests: constructed evaluations, fake finished runs, in-process Services."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patchd.config import Config, build_config
from patchd.evaluation import PairedEvaluation, paired
from patchd.promotion.gate import GateInput


def gate_input(
    n_per: Sequence[int], inc_acc: Sequence[float], cand_acc: Sequence[float], seed: int = 0
) -> GateInput:
    """Cells with exact accuracies (deterministic counts), paired outcomes shuffled."""
    ev = evaluation(n_per, inc_acc, cand_acc, seed=seed)
    names = tuple(c.key for c in ev.incumbent.cells)
    return GateInput(names, ev.cell, ev.incumbent_correct, ev.candidate_correct)


def evaluation(
    n_per: Sequence[int],
    inc_acc: Sequence[float],
    cand_acc: Sequence[float],
    seed: int = 0,
    class_names: Sequence[str] = ("top", "other"),
    group_names: Sequence[str] = ("color=red", "color=green"),
) -> PairedEvaluation:
    rng = np.random.default_rng(seed)
    cell, inc, cand = [], [], []
    for k, (n, a, b) in enumerate(zip(n_per, inc_acc, cand_acc, strict=True)):
        ia = np.zeros(n, bool)
        ia[: round(a * n)] = True
        ca = np.zeros(n, bool)
        ca[: round(b * n)] = True
        cell += [k] * n
        inc += list(rng.permutation(ia))
        cand += list(rng.permutation(ca))
    return paired(
        np.array(inc),
        np.array(cand),
        np.array(cell),
        class_names,
        group_names,
        confidence=0.95,
        n_min=1,
    )


def safetensors_bytes(values: Sequence[float], name: str = "linear.weight") -> bytes:
    """A valid safetensors file with one float32 tensor (no torch needed)."""
    data = np.asarray(values, dtype="<f4").tobytes()
    header = {name: {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def write_weights(path: Path, seed: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes([seed, seed + 1.0, seed + 2.0])
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def fake_run(
    artifacts: Path,
    run_id: str,
    ev: PairedEvaluation,
    weights_seed: float,
    png: bytes | None = None,
) -> str:
    """A finished run's artifacts: train/model.safetensors (+manifest), evaluate/evaluation.json."""
    rdir = artifacts / "runs" / run_id
    sha = write_weights(rdir / "train" / "model.safetensors", weights_seed)
    (rdir / "train" / "manifest.json").write_text(
        json.dumps(
            {
                "schema": 1,
                "stage": "train",
                "run_id": run_id,
                "files": {"model.safetensors": sha},
                "result": {},
            }
        )
    )
    (rdir / "evaluate").mkdir(parents=True, exist_ok=True)
    (rdir / "evaluate" / "evaluation.json").write_text(ev.to_json())
    if png is not None:
        (rdir / "mine").mkdir(parents=True, exist_ok=True)
        (rdir / "mine" / "failure_report.png").write_bytes(png)
        (rdir / "mine" / "mining.json").write_text(
            json.dumps(
                {
                    "modes": [
                        {
                            "cls": 0,
                            "class_name": "top",
                            "description": "color=red (82% of errors)",
                            "strength": 0.91,
                            "n_wrong": 41,
                            "n_total": 50,
                        }
                    ]
                }
            )
        )
        (rdir / "synthesize" / "previews").mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (rdir / "synthesize" / "previews" / f"top_red_to_green_{i}.png").write_bytes(png)
    return sha


def passing() -> PairedEvaluation:
    return evaluation([200, 200, 200, 200], [0.95, 0.30, 0.92, 0.95], [0.93, 0.80, 0.92, 0.94])


def failing() -> PairedEvaluation:
    return evaluation([200, 200, 200, 200], [0.95, 0.30, 0.92, 0.95], [0.70, 0.80, 0.70, 0.72])


def make_config(tmp: Path, store: dict[str, object] | None = None, **gate: object) -> Config:
    """A one-model config under ``tmp``; ``store``: the ``store:`` section (default SQLite)."""
    data = {"state_dir": str(tmp / "state"), "model": {"name": "m"}, "gate": gate}
    return build_config({**data, "store": store or {}})


def png_bytes(width: int = 96, height: int = 64) -> bytes:
    """A small RGB PNG (gradient) written with zlib only."""
    import zlib

    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in (x * 255 // width, y * 255 // height, 120))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
