"""A node for the namespace tests and the benchmark until (or unless) the daemon runs the mesh itself.

Runs the same parts the agent runs (the serving pool and router, the API app, the mesh service and its
/mesh/v1 routes) from one config file: ``python tests/netns/meshnode.py --config FILE``. model.name is a
GGUF file in the store (served under its stem) or 'none'.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import uvicorn

from hearth import config as config_mod
from hearth.api.app import create_app
from hearth.mesh.service import MeshService
from hearth.serving.pool import Pool
from hearth.serving.router import Router


async def main() -> None:
    """Run until SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    cfg = config_mod.load(args.config)
    logging.basicConfig(level=cfg.log.level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    router = Router()
    pool = Pool(cfg.state.dir / "run", queue_depth=cfg.api.queue_depth)
    (cfg.state.dir / "run").mkdir(parents=True, exist_ok=True)
    if cfg.model.name not in ("none", "auto", ""):
        path = cfg.models_dir / cfg.model.name
        up = pool.add(Path(cfg.model.name).stem, path, context=cfg.model.context or 2048, threads=cfg.model.threads,
                      chat_format=cfg.model.chat_format)
        await up.worker.wait_ready(120)
        router.add_upstream(up)
    mesh = MeshService(cfg, router)
    runtime = SimpleNamespace(config=cfg, router=router, state_dir=cfg.state.dir, extra_routers=[mesh.api_router()],
                              health=lambda: {"status": "ready", "models": {}}, metrics=lambda: {})
    app = create_app(runtime)  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.api.host, port=cfg.api.port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    serving = asyncio.create_task(server.serve())  # uvicorn turns SIGTERM/SIGINT into a clean exit
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    await mesh.start()  # announce only once the API answers
    try:
        await serving
    finally:
        await mesh.stop()
        await pool.stop()


if __name__ == "__main__":
    asyncio.run(main())
