"""The demo's model server: a FastAPI app serving the registry's production model.

It is what a team's own server looks like with patchd attached: ``ProductionModel`` loads the
production weights (sha256-verified) and hot-reloads on promotion; ``PatchdMiddleware`` ships every
prediction to ``patchd serve`` off the request path.

    python -m patchd.demo.model_server -c patchd.yaml --port 8080 --patchd-url http://127.0.0.1:8321
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from patchd.config import Config, load_config
from patchd.ml.datasets import image_size
from patchd.plugins.serving.asgi import PatchdMiddleware
from patchd.plugins.serving.client import PatchdLogger
from patchd.plugins.serving.loader import ProductionModel


class PredictRequest(BaseModel):
    uri: str  # file:// URI of a PNG inside the configured allowed roots


def load_image(uri: str, roots: list[Path], size: int) -> Any:
    """PNG at a file URI inside ``roots`` → float tensor [1, 3, size, size] in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    path = Path(urlsplit(uri).path).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in roots):
        raise HTTPException(400, f"{uri} is outside the allowed roots")
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def create_app(config: Config, patchd_url: str, token: str | None) -> FastAPI:
    import torch

    torch.set_num_threads(1)
    prod = ProductionModel(
        config.registry_root,
        config.model.name,
        config.model.factory,
        dict(config.model.factory_kwargs),
    )
    prod.load()
    prod.start_watching(interval=0.5)
    size = image_size(config.data.train)
    roots = list(config.sources.allowed_roots)
    app = FastAPI(title="demo model server")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"model": config.model.name, "sha256": prod.digest, "reloads": prod.reloads}

    @app.post("/predict")
    def predict(req: PredictRequest) -> dict[str, Any]:
        x = load_image(req.uri, roots, size)
        with prod.lock:
            module, digest = prod.module, prod.digest
        with torch.no_grad():
            probs = torch.softmax(module(x), dim=1)[0]
        return {
            "pred": int(probs.argmax()),
            "probs": [round(float(p), 5) for p in probs],
            "model_version": f"sha256:{digest}",
        }

    logger = PatchdLogger(patchd_url, token=token, flush_interval_s=0.1)
    app.add_middleware(
        PatchdMiddleware, logger=logger, model=config.model.name, paths=("/predict",)
    )
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--patchd-url", default="http://127.0.0.1:8321")
    args = parser.parse_args()
    config = load_config(args.config, os.environ)
    app = create_app(config, args.patchd_url, os.environ.get("PATCHD_TOKEN"))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
