"""The node daemon (``hearth agent``): model workers, the mesh and the API in one supervised process.

The lifecycle follows uvicorn's ``Server.serve()``: startup (config, state directory, hardware, model
choice, workers, mesh, API socket), a main loop that waits on an ``asyncio.Event`` set by SIGTERM or
SIGINT, and a staged shutdown with a timeout (stop taking requests and let streams finish, leave the mesh,
stop the workers), after which the previous signal handlers are restored. systemd hears READY=1 once the
API listens (``/health`` says 503 until the model is loaded), STATUS= lines as things change, WATCHDOG=1
pings, and STOPPING=1.

A model the node should serve that is a catalogue entry missing from the store does not stop the agent:
once the API is up it is fetched in the background (a household peer first, then the catalogue's
sources; hearth.serving.acquire), /health says 503 "loading" with the progress line (or "error" with
the reason while it waits to retry), and the worker starts when the file is in. Meanwhile the biggest
stored model that fits (say the one bundled on the stick) stands in, so a node set up without internet
still answers; it is stopped once the chosen model is in, before it loads unless memory holds both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .config import Config
from .errors import HearthError
from .serving.local import Pool
from .serving.router import Router
from .serving.types import Router as RouterProtocol
from .serving.types import Upstream

log = logging.getLogger("hearth.agent")


AUTO_POOL_S = 10.0
POOL_SETTLE_S = 2.0
"""A node's first pool waits until the household's offers have been the same this long (see PoolManager)."""
"""How often a node on ``model.name: auto`` weighs the household's offers for its profile's preferred model."""


class StartupError(HearthError):
    """The agent cannot start (port taken, state directory not writable...)."""


# --- systemd ------------------------------------------------------------------------------------------


class Notifier:
    """sd_notify through systemd-python when installed, else straight to $NOTIFY_SOCKET, else nothing."""

    def __init__(self) -> None:
        self._notify: Any = None
        try:
            from systemd import daemon as sd_daemon  # type: ignore[import-not-found]

            self._notify = sd_daemon.notify
        except ImportError:
            self._notify = None
        self.socket_path = os.environ.get("NOTIFY_SOCKET", "")

    @property
    def enabled(self) -> bool:
        """True when systemd listens (Type=notify)."""
        return bool(self.socket_path)

    def __call__(self, *fields: str) -> None:
        """Send one notification, e.g. ``notify("READY=1", "STATUS=serving")``."""
        if not self.socket_path:
            return
        message = "\n".join(fields)
        if self._notify is not None:
            with contextlib.suppress(Exception):
                self._notify(message)
            return
        addr = self.socket_path
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract socket namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode(), addr)
        except OSError as e:
            log.debug("sd_notify failed: %s", e)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is set."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6


def setup_logging(level: str = "info") -> None:
    """Plain lines on stderr; under journald (JOURNAL_STREAM) no timestamps and <N> priority prefixes."""

    class _Journal(logging.Formatter):
        _PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

        def format(self, record: logging.LogRecord) -> str:
            prio = self._PRIO.get(record.levelno, 6)
            return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())

    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_Journal("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print a line per token stream; our API logs what matters.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


# --- model choice ---------------------------------------------------------------------------------------


def resolve_model(config: Config, report: Any = None) -> tuple[str, Path, dict[str, Any]] | None:
    """(name, file, load options) for the model this node serves, or None for ``model.name: none``.

    A path to a GGUF file is served as is. Otherwise the profile selection (hearth.select) picks the
    model, context, threads and offload for this hardware (*report*), and the store finds its file.
    """
    name = config.model.name.strip() or "auto"
    options = _base_options(config)
    if name == "none":
        return None
    as_path = Path(name).expanduser()
    if ("/" in name or name.endswith(".gguf")) and as_path.is_file():
        return as_path.stem, as_path.resolve(), options
    try:
        from . import select
    except ImportError:
        select = None  # type: ignore[assignment]
    if select is not None and report is not None:
        choice = select.select(report, config)
        if choice is None:
            return None
        log.info("model: %s", choice.reason)
        options.update(context=choice.context, threads=choice.threads, gpu_layers=choice.gpu_layers,
                       slots=config.model.slots or choice.slots)
        return choice.model.name, find_model_file(config, choice.model.name), options
    if name == "auto":
        files = _store_files(config)
        if len(files) != 1:
            raise StartupError("model.name is 'auto' but no profile chose a model"
                               + (f" and the store has {len(files)} models" if files else " and the store is empty"),
                               hint="set model.name in hearth.yaml, or 'hearth models import FILE'")
        return files[0].stem, files[0], options
    return name, find_model_file(config, name), options


def find_model_file(config: Config, name: str) -> Path:
    """The GGUF file for *name*: a path, a file in the store, or a catalogue name the store resolves."""
    try:
        from .models.store import Store
    except ImportError:  # the store is optional for a bare serving node
        Store = None  # type: ignore[assignment,misc]
    if Store is not None:
        return Store.from_config(config).resolve(name)
    as_path = Path(name).expanduser()
    if as_path.is_file():
        return as_path.resolve()
    for candidate in (config.models_dir / name, config.models_dir / f"{name}.gguf"):
        if candidate.is_file():
            return candidate
    raise StartupError(f"model '{name}' is not in the store ({config.models_dir})",
                       hint=f"'hearth models pull {name}' or 'hearth models import FILE'")


def _store_files(config: Config) -> list[Path]:
    try:
        return sorted(p for p in config.models_dir.glob("*.gguf") if p.is_file())
    except OSError:
        return []


def _base_options(config: Config) -> dict[str, Any]:
    return {"context": config.model.context, "threads": config.model.threads, "slots": config.model.slots,
            "gpu_layers": config.model.gpu_layers, "chat_format": config.model.chat_format}


def plan_download(config: Config, report: Any = None) -> tuple[str, dict[str, Any], int | None] | None:
    """(catalogue name, load options, size) when the model this node should serve is a catalogue entry
    that is not in the store yet; None when there is nothing to fetch (or nothing the catalogue knows)."""
    try:
        from .models.catalogue import load as load_catalogue
        from .models.store import Store
    except ImportError:
        return None
    catalogue = load_catalogue()
    options = _base_options(config)
    name = config.model.name.strip() or "auto"
    if report is not None:
        from . import select

        choice = select.select(report, config)
        if choice is None:
            return None
        options.update(context=choice.context, threads=choice.threads, gpu_layers=choice.gpu_layers,
                       slots=config.model.slots or choice.slots)
        name = choice.model.name
    entry = catalogue.get(name)
    if entry is None or Store.from_config(config, catalogue).find(entry.name) is not None:
        return None
    if not options.get("chat_format") and entry.chat_format:
        options["chat_format"] = entry.chat_format
    return entry.name, options, entry.size_bytes


def _in_catalogue(name: str) -> bool:
    """Whether *name* is a catalogue model (one the node can fetch)."""
    try:
        from .models.catalogue import load as load_catalogue
    except ImportError:
        return False
    return load_catalogue().get(name) is not None


def _available_memory() -> int:
    """MemAvailable in bytes (0 when unknown, which counts as tight)."""
    from .hardware.cpu import parse_meminfo

    try:
        return parse_meminfo(Path("/proc/meminfo").read_text())[1]
    except OSError:
        return 0


def fallback_from_store(config: Config, report: Any) -> tuple[str, Path, dict[str, Any]] | None:
    """While the chosen model is not here yet: the stored model that stands in (hearth.select.stand_in)
    with its load options, or None."""
    if report is None:
        return None
    try:
        from . import select
    except ImportError:
        return None
    found = select.stand_in(report, config)
    if found is None:
        return None
    stored, choice = found
    options = _base_options(config)
    options.update(context=choice.context, threads=choice.threads, gpu_layers=choice.gpu_layers,
                   slots=config.model.slots or choice.slots)
    return stored.name, stored.path, options


def llama_devices_in_subprocess(timeout: float = 60.0) -> list[dict[str, Any]]:
    """llama.cpp's devices, asked in a child process (hearth.llamacpp.facts_in_subprocess)."""
    from . import llamacpp

    return list(llamacpp.facts_in_subprocess(timeout)["devices"])


def probe_hardware() -> Any:
    """The hardware report (hearth.hardware), or None when that part is not installed."""
    try:
        from . import hardware
    except ImportError:
        return None
    try:
        return hardware.probe(llama_devices=llama_devices_in_subprocess)
    except Exception as e:  # a probe failure is a warning: a model named in the config still serves
        log.warning("hardware probe failed: %s", e)
        return None


class _MemoryOnly:
    """A stand-in hardware report with only the available RAM (the probe failed or is not installed)."""

    def __init__(self, available: int) -> None:
        self.memory_available = available
        self.llama_cpp = None


# --- the node -------------------------------------------------------------------------------------------


class Node:
    """The running node as the API sees it (``hearth.api.runtime.Runtime``): config, router, health."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.state.dir
        self.routing = Router()
        self.router: RouterProtocol = self.routing
        self.extra_routers: list[Any] = []
        self.run_dir = Path(os.environ.get("RUNTIME_DIRECTORY") or self.state_dir / "run")
        self.pool = Pool(self.run_dir, queue_depth=config.api.queue_depth)
        self.mesh: Any = None
        self.report: Any = None
        """The hardware report (hearth.hardware.Report) once probed."""
        self._probe: asyncio.Task[Any] | None = None
        self.warnings: list[str] = []
        self.error: str | None = None
        self.started = time.time()
        self.pending: tuple[str, dict[str, Any], int | None] | None = None
        """(catalogue name, load options, size) of a model to fetch once the API is up."""
        self.acquisition: Any = None
        """The background fetch of that model (hearth.serving.acquire.Acquisition) while it runs."""
        self.stand_in: tuple[str, str] | None = None
        """(model name, its warning) of a stored model served until the pending one has arrived."""
        self._switching: asyncio.Future[None] | None = None
        self.rpc: Any = None
        """This node's rpc-server (hearth.pool.rpcserver.RpcServer) while it offers memory to the pool."""
        self.pool_devices: tuple[Any, ...] = ()
        """What it offers (hearth.pool.capacity.Device), after its own model and the reserve."""
        self.pooling: Any = None
        """The models it runs across the pool (hearth.pool.manager.PoolManager), once there are any."""
        self.pool_wanted: list[tuple[str, Path, dict[str, Any]]] = []
        """(name, file, options) of the models to run across the pool, found at start."""
        self.auto_pool: Any = None
        """The model the profile prefers that this node runs across the pool (hearth.select.PoolPick), once
        the household's offers hold it (``pool.auto``)."""
        self.pool_acquisition: Any = None
        """The fetch of that model while it is not in the store."""
        self._auto_pooling: asyncio.Task[None] | None = None
        self.pool_fetch: tuple[str, dict[str, Any]] | None = None
        """(catalogue name, options) of a named model too big for this node, to fetch for the pool."""
        self.alone_failed = False
        """No model fits this node by itself (``error`` says so): a model run across the pool lifts that."""

    async def start_models(self) -> None:
        """Probe the hardware, choose the model and start its worker (loading goes on in the background)."""
        name = self.config.model.name.strip()
        direct = name == "none" or (("/" in name or name.endswith(".gguf")) and Path(name).expanduser().is_file())
        probing = asyncio.get_running_loop().create_task(asyncio.to_thread(probe_hardware), name="probe")
        self._probe = probing  # a strong reference until it is done
        if not direct:
            self.report = await probing
        else:
            # The model is named by its file: serve it now, keep the report for /hearth/v1/hardware and
            # the offload check when it comes.
            probing.add_done_callback(self._got_report)
        self._want_pooled()
        try:
            chosen = await asyncio.to_thread(resolve_model, self.config, self.report)
        except HearthError as e:
            if self._pool_instead(e):
                return
            if not await self._plan_fetch(e):
                self.error = e.message + (f" ({e.hint})" if e.hint else "")
                log.error("%s", self.error)
                self.alone_failed = type(e).__name__ == "NothingFits"
            return
        if chosen is None:
            log.info("model.name is 'none': this node serves no model itself")
            return
        self._serve(*chosen)

    def _want_pooled(self) -> None:
        """The models ``pool.serve`` names, with their files (a model not in the store is a warning)."""
        for name in self.config.pool.serve:
            try:
                path = find_model_file(self.config, name)
            except HearthError as e:
                self.warnings.append(f"pool: {e.message}" + (f" ({e.hint})" if e.hint else ""))
                continue
            self.pool_wanted.append((Path(path).stem if "/" in name else name, Path(path), self._pool_options()))

    def _pool_instead(self, error: HearthError) -> bool:
        """The model this node should serve is too big for it: run it across the pool instead when the pool
        is on and the file is here (this node, the pool's head, loads it and sends the members their layers)."""
        try:
            from .select import ModelTooBig
        except ImportError:
            return False
        name = self.config.model.name.strip()
        if not isinstance(error, ModelTooBig) or not self.config.pool.enabled or not self.config.mesh.enabled:
            return False
        try:
            path = find_model_file(self.config, name)
        except HearthError as e:
            if _in_catalogue(name):
                self.pool_fetch = (name, self._pool_options())  # once the mesh is up (start_pooling)
                # Chosen in the wizard from the household's offers, say: fetch it, and meanwhile serve the
                # biggest stored model that fits, as a node does while its own model downloads.
                log.info("model: %s; fetching it to run across the household pool", error.message)
                fallback = fallback_from_store(self.config, self.report)
                if fallback is not None:
                    stored, stored_path, options = fallback
                    warning = f"serving {stored} from the store until {name} has arrived for the household pool"
                    self.warnings.append(warning)
                    self._serve(stored, stored_path, options)
                return True
            self.error = f"{error.message}; to run it across the household pool it must be in the store: {e.message}"
            log.error("%s", self.error)
            return True
        log.info("model: %s; running it across the household pool", error.message)
        if all(n != name for n, _, _ in self.pool_wanted):
            self.pool_wanted.append((name, Path(path), self._pool_options()))
        return True

    def _pool_options(self) -> dict[str, Any]:
        options = _base_options(self.config)
        options.update(context=self.config.model.context or 4096, slots=self.config.model.slots or 1)
        return options

    async def _plan_fetch(self, missing: HearthError) -> bool:
        """The chosen model is not in the store: plan its download (or, for ``auto``, serve a stored model
        that fits now). False when *missing* is some other problem."""
        try:
            from .models.errors import ModelNotInStore
        except ImportError:
            return False
        if not isinstance(missing, ModelNotInStore):
            return False
        try:
            plan = await asyncio.to_thread(plan_download, self.config, self.report)
        except HearthError as e:
            log.warning("cannot plan a download: %s", e.message)
            return False
        if plan is None:
            return False
        name = plan[0]
        log.info("%s is not in the store: fetching it once the API is up", name)
        self.pending = plan
        fallback = await asyncio.to_thread(fallback_from_store, self.config, self.report)
        if fallback is not None:
            stored, path, options = fallback
            warning = f"serving {stored} from the store until {name} has arrived"
            self.stand_in = (stored, warning)
            self.warnings.append(warning)
            log.warning("%s", warning)
            self._serve(stored, path, options)
        return True

    async def retire_stand_in(self, incoming: Path) -> bool:
        """Stop the stand-in model now unless memory holds it and *incoming* together; True if stopped."""
        if self.stand_in is None:
            return False
        if _available_memory() >= incoming.stat().st_size * 1.2 + (1 << 30):
            return False
        await self._drop_stand_in()
        return True

    async def _drop_stand_in_once_loaded(self, name: str, timeout: float = 600.0) -> None:
        upstream = self.pool.upstreams.get(name)
        deadline = time.monotonic() + timeout
        while upstream is not None and upstream.worker.state not in ("ready", "failed") \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await self._drop_stand_in()

    async def _drop_stand_in(self) -> None:
        if self.stand_in is None:
            return
        name, warning = self.stand_in
        self.stand_in = None
        if warning in self.warnings:
            self.warnings.remove(warning)
        upstream = self.pool.upstreams.get(name)
        if upstream is not None:
            self.routing.remove_upstream(upstream)
            await self.pool.remove(name)
        log.info("stopped the stand-in model %s", name)

    async def pull(self, name: str) -> AsyncIterator[dict[str, Any]]:
        """Fetch catalogue model *name* into the store (Ollama's /api/pull) and serve it, yielding
        Ollama-style progress ({"status", "total", "completed"}); raises HearthError when it cannot."""
        from .models.catalogue import load as load_catalogue
        from .models.store import Store
        from .serving.acquire import _default_fetch

        entry = load_catalogue().get(name)
        if entry is None:
            raise HearthError(f"model '{name}' is not in Hearth's catalogue",
                              hint="'hearth models list' shows what can be pulled")
        yield {"status": "pulling manifest"}
        if name in self.pool.upstreams:
            yield {"status": "success"}
            return
        store = Store.from_config(self.config)
        digest = f"sha256:{entry.sha256}" if getattr(entry, "sha256", None) else f"hearth:{entry.file}"
        progress = {"completed": 0, "total": entry.size_bytes or 0}

        def report(done: int, total: int | None, rate: float) -> None:
            progress["completed"] = done
            if total:
                progress["total"] = total

        if store.find(entry.name) is None:
            stop = threading.Event()
            fetch = asyncio.ensure_future(asyncio.to_thread(_default_fetch, self.config, entry.name, report,
                                                            stop.is_set, lambda via: None))
            try:
                while not fetch.done():
                    yield {"status": f"pulling {entry.file}", "digest": digest, **progress}
                    await asyncio.wait({fetch}, timeout=0.5)
                fetch.result()
            except HearthError:
                raise
            except OSError as e:
                raise HearthError(f"cannot pull {name}: {e.strerror or e}") from None
            finally:
                stop.set()
            yield {"status": f"pulling {entry.file}", "digest": digest, **progress}
        yield {"status": "verifying sha256 digest"}
        chosen = await asyncio.to_thread(resolve_model, self.config.replace(**{"model.name": entry.name}), self.report)
        if chosen is None:
            raise HearthError(f"{name} is in the store but this node cannot serve it")
        self._serve(*chosen)
        yield {"status": "writing manifest"}
        yield {"status": "success"}

    def _serve(self, name: str, path: Path, options: dict[str, Any]) -> None:
        log.info("serving %s from %s", name, path)
        upstream = self.pool.add(name, path, **options)
        self.routing.add_upstream(upstream)

    def start_acquisition(self) -> None:
        """Fetch the pending model in the background (peer first, then the catalogue's sources)."""
        if self.pending is None or self.acquisition is not None:
            return
        from .serving.acquire import Acquisition

        name, options, size = self.pending

        async def ready(path: Path) -> None:
            # Choose again now that the file is here: its own metadata replaces the catalogue's figures.
            try:
                chosen = await asyncio.to_thread(resolve_model, self.config, self.report)
            except HearthError as e:
                log.warning("after the download: %s; serving with the planned settings", e.message)
                chosen = None
            stopped = await self.retire_stand_in(path)
            if chosen is not None and chosen[0] == name:
                self._serve(*chosen)
            else:
                self._serve(name, path, options)
            self.pending = None
            if not stopped and self.stand_in is not None:
                # Both fit: the stand-in answers until the new model has loaded.
                self._switching = asyncio.ensure_future(self._drop_stand_in_once_loaded(name))

        self.acquisition = Acquisition(self.config, name, ready, size_hint=size)
        self.acquisition.start()

    def _got_report(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.report = task.result()

    def check_offload(self) -> None:
        """Say loudly when a usable GPU sits idle while a loaded model runs on the CPU."""
        try:
            from .hardware.offload import offload_warning
        except ImportError:
            return
        for up in self.pool.upstreams.values():
            if self.report is None or up.worker.state != "ready":
                continue
            warning = offload_warning(self.report, up.worker.info.get("offload"))
            if warning and warning not in self.warnings:
                self.warnings.append(warning)
                log.warning("%s", warning)

    async def start_pool_server(self) -> None:
        """Offer what memory this node can spare to the household pool: measure, then start rpc-server."""
        if not self.config.pool.enabled or not self.config.mesh.enabled:
            return
        try:
            from .pool.capacity import measure_bandwidth, offer_devices
            from .pool.rpcserver import RpcServer
        except ImportError:
            return
        if self.report is None and self._probe is not None:
            with contextlib.suppress(Exception):
                self.report = await self._probe
        need, device = await asyncio.to_thread(self._own_need)
        bandwidth = await asyncio.to_thread(measure_bandwidth)
        report = self.report or _MemoryOnly(_available_memory())
        self.pool_devices = offer_devices(self.config, report, need, device, bandwidth)
        if not self.pool_devices:
            log.info("pool: this node offers no memory (its own model and pool.reserve_mib take it all)")
            return
        ram = sum(d.bytes for d in self.pool_devices if d.kind == "ram")
        self.rpc = RpcServer(self.config.pool.rpc_port, [d.name for d in self.pool_devices],
                             state_dir=self.state_dir, threads=self.config.pool.threads, ram_limit=ram,
                             on_ready=self._expose_rpc, nice=self.config.pool.nice,
                             stores=(self.config.models_dir,))
        self.rpc.start()
        log.info("pool: offering %s (%.1f GB/s measured)", ", ".join(
            f"{d.bytes / (1 << 30):.1f} GiB {d.kind} on {d.name}" for d in self.pool_devices), bandwidth)

    def _own_need(self) -> tuple[int, str]:
        """Bytes this node's own model needs (hearth.select's estimate and margin) and where ('cpu', 'gpu'...)."""
        if self.config.model.name.strip() == "none":
            return 0, "cpu"
        if self.report is not None:
            with contextlib.suppress(Exception):
                from . import select

                choice = select.select(self.report, self.config)
                if choice is not None:
                    return choice.estimate.total, choice.device
        for up in self.pool.upstreams.values():
            with contextlib.suppress(OSError):
                return up.worker.spec.model_path.stat().st_size + (1 << 30), "cpu"
        return 0, "cpu"

    def _expose_rpc(self) -> None:
        channel = getattr(self.mesh, "channel", None)
        if channel is not None and self.rpc is not None:
            channel.expose("rpc", self.rpc.port)

    def pool_state(self) -> dict[str, Any]:
        """What this node publishes under 'pool' in its mesh state (hearth.pool.capacity.Offer)."""
        from .pool.capacity import Offer

        node = self.mesh.node if self.mesh is not None else "local"
        name = self.mesh.name if self.mesh is not None else node
        ready = self.rpc is not None and self.rpc.ready.is_set()
        serving = self.pooling.heading() if self.pooling is not None else ()
        members = self.pooling.members() if self.pooling is not None else ()
        return Offer(node, name, tuple(self.pool_devices), ready, tuple(serving), tuple(members)).to_dict()

    def pool_offers(self) -> list[Any]:
        """Every offer the pool may use now: this node's and each live peer's."""
        from .pool.capacity import Offer

        offers = []
        own = Offer.from_dict(self.pool_state())
        if own is not None and own.devices:
            offers.append(own)
        if self.mesh is not None:
            for peer in list(self.mesh.peers.values()):
                offer = Offer.from_dict(peer.state.get("pool")) if peer.alive else None
                if offer is not None and offer.node == peer.node and offer.devices:
                    offers.append(offer)
        return offers

    async def connect_member(self, node: str) -> Any:
        """A loopback endpoint for *node*'s rpc-server: this node's own, or a forward through the channel."""
        from .pool.manager import LocalEndpoint, PoolUnavailable

        own = self.mesh.node if self.mesh is not None else "local"
        if node == own and self.rpc is not None:
            return LocalEndpoint(self.rpc.address)
        channel = getattr(self.mesh, "channel", None)
        if channel is None:
            raise PoolUnavailable("the mesh's encrypted channel is not running (ggml's RPC never travels in "
                                  "the clear)")
        return await channel.forward(node, "rpc")

    def start_pooling(self) -> None:
        """Expose this node's rpc-server to the household through the channel, and run the wanted models
        across the pool (each forms as soon as the household offers enough)."""
        self._expose_rpc()
        if self.pool_fetch is not None and self.mesh is not None:
            self._fetch_for_pool(*self.pool_fetch)
        if not self.pool_wanted or self.mesh is None:
            if self.pool_wanted:
                self.warnings.append("pool: the mesh is off, so no model can run across the household pool")
            return
        for name, path, options in self.pool_wanted:
            self._pool_manager().keep(name, path, **options)

    def _pool_manager(self) -> Any:
        if self.pooling is None:
            from .pool.manager import PoolManager

            self.pooling = PoolManager(self.pool, self.routing, self.pool_offers, self.connect_member,
                                       self_node=self.mesh.node if self.mesh is not None else "local",
                                       settle_s=POOL_SETTLE_S)
        return self.pooling

    def start_auto_pool(self, every: float = AUTO_POOL_S) -> None:
        """With ``model.name: auto`` and ``pool.auto``: watch the household's offers for the moment they hold
        the model this node's profile prefers but that does not fit it alone, then run that across the pool."""
        name = self.config.model.name.strip() or "auto"
        if name != "auto" or not (self.config.pool.enabled and self.config.pool.auto) or self.mesh is None:
            return
        self._auto_pooling = asyncio.get_running_loop().create_task(self._auto_pool(every), name="auto-pool")

    async def _auto_pool(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if self.auto_pool is not None:
                await self._yield_auto_pool()
                continue
            if self.report is None or self.pending is not None:
                continue  # the own model comes first: its download ends before a pooled one starts
            try:
                pick = await asyncio.to_thread(self.pool_pick, self.pool_offers())
            except Exception as e:  # a bad peer state or a catalogue problem must not end the watch
                log.warning("pool: cannot weigh the household's offers: %s", e)
                continue
            if pick is not None:
                self._run_pick(pick)

    async def _yield_auto_pool(self) -> None:
        """Two nodes that chose the same model in the same round (a household powered on together) both
        head a pool for it; once each sees the other's offer, the one with the higher node id drops its pool
        and the mesh routes the model to the other. A model a peer already headed was never picked
        (hearth.select.pool_pick)."""
        name = self.auto_pool.model.name
        own = self.mesh.node if self.mesh is not None else "local"
        keeper = next((o for o in self.pool_offers() if o.node != own and o.node < own and name in o.serving), None)
        if keeper is None:
            return
        log.info("pool: %s also runs %s across the pool; leaving it to that node", keeper.name, name)
        if self.pooling is not None:
            await self.pooling.drop(name)
        self.auto_pool = None

    def pool_pick(self, offers: list[Any]) -> Any:
        """The preferred model to run across the pool given *offers* (hearth.select.pool_pick), or None."""
        from . import select

        try:
            alone = select.select(self.report, self.config)
        except HearthError:
            alone = None  # nothing fits this node: any preferred model the pool holds is better than none
        from .pool.capacity import unclaimed

        own = self.mesh.node if self.mesh is not None else "local"
        return select.pool_pick(self.report, unclaimed(offers, own), alone, self.config, self_node=own)

    def _run_pick(self, pick: Any) -> None:
        """Run *pick* across the pool: now when its file is in the store, else once it is fetched."""
        self.auto_pool = pick
        name = pick.model.name
        options = self._pool_options()
        options.update(context=pick.context, slots=1)
        log.info("model: %s; running it across the household pool", pick.reason)
        if self.alone_failed and self.error:
            # The node serves after all (loading until the pool has formed): a fact to show, no longer an error.
            self.warnings.append(f"{self.error}; {name} runs across the household pool instead")
            self.error, self.alone_failed = None, False
        try:
            path = find_model_file(self.config, name)
        except HearthError as e:
            if not self._fetch_for_pool(name, options, auto=True):
                log.warning("pool: cannot run %s across the pool: %s", name, e.message)
            return
        self._pool_manager().keep(name, path, **options)

    def _fetch_for_pool(self, name: str, options: dict[str, Any], auto: bool = False) -> bool:
        """Fetch catalogue model *name* (a peer first, then the catalogue's sources), then run it across the
        pool (for an *auto* pick: unless it was left to a peer meanwhile); False when the catalogue does not
        know it."""
        try:
            from .models.catalogue import load as load_catalogue
            from .serving.acquire import Acquisition
        except ImportError:
            return False
        entry = load_catalogue().get(name)
        if entry is None or self.pool_acquisition is not None:
            return False

        async def ready(path: Path) -> None:
            if auto and (self.auto_pool is None or self.auto_pool.model.name != entry.name):
                log.info("pool: %s is in the store now; a peer runs it across the pool", entry.name)
                return
            self._pool_manager().keep(entry.name, path, **options)

        log.info("pool: %s is not in the store: fetching it", entry.name)
        self.pool_acquisition = Acquisition(self.config, entry.name, ready, size_hint=entry.size_bytes or None)
        self.pool_acquisition.start()
        return True

    async def start_mesh(self) -> None:
        """Join the household mesh when it is enabled and set up; otherwise say why not."""
        if not self.config.mesh.enabled:
            return
        try:
            from .mesh.service import MeshService
        except ImportError:
            return
        try:
            mesh = MeshService(self.config, router=self.routing, local_upstreams=self.local_upstreams,
                               pool_state=self.pool_state)
            self.extra_routers.append(mesh.api_router())
            # Verified update files, read-only, for household peers (hearth.update.serve).
            from .update.serve import make_router as update_router
            self.extra_routers.append(update_router(mesh.verifier, self.config.state.dir))
            await mesh.start()
        except HearthError as e:
            self.warnings.append(f"mesh off: {e.message}")
            log.warning("mesh off: %s%s", e.message, f" (hint: {e.hint})" if e.hint else "")
            return
        self.mesh = mesh

    def local_upstreams(self) -> list[Upstream]:
        """This node's workers as upstreams."""
        return list(self.pool.upstreams.values())

    def health(self) -> dict[str, Any]:
        """loading while no model is ready, ready once one is, error when none can load."""
        models: dict[str, Any] = {}
        for name, up in self.pool.upstreams.items():
            w = up.worker
            load = up.load()
            models[name] = {"state": w.state, "error": w.error, "restarts": w.restarts, "pid": w.pid,
                            "queued": load.queued, "capacity": load.capacity,
                            "slots": w.info.get("slots", up.slots), "context": w.info.get("context_length"),
                            "tools": w.info.get("tools"),
                            "tokens_per_second": round(load.tokens_per_second, 1),
                            "offload": w.info.get("offload")}
            members = getattr(up, "members", ())  # a model run across the household pool (hearth.pool)
            if members:
                models[name]["pool"] = list(members)
        states = [m["state"] for m in models.values()]
        if self.error:
            status = "error"
        elif not states:
            status = "ready"  # serves through peers only
        elif "ready" in states:
            status = "ready"
        elif all(s == "failed" for s in states) and all(m["restarts"] >= 3 for m in models.values()):
            status = "error"
        else:
            status = "loading"
        warnings = list(self.warnings) + ([self.error] if self.error else [])
        warnings += [f"model {n}: {m['error']}" for n, m in models.items() if m["error"] and m["state"] != "ready"]
        download: dict[str, Any] | None = None
        if self.acquisition is not None and self.acquisition.state != "done":
            download = self.acquisition.to_dict()
        elif self.pending is not None and self.acquisition is None:  # the API is not up yet
            download = {"model": self.pending[0], "state": "waiting", "line": f"downloading {self.pending[0]}: starting"}
        if download is not None:
            warnings.append(download["line"])
            if "ready" not in states and not self.error:
                status = "error" if download["state"] in ("retrying", "failed") else "loading"
        body = {"status": status, "models": models, "warnings": warnings,
                "uptime_s": round(time.time() - self.started, 1),
                "peers": len(self.mesh.peers) if self.mesh is not None else 0}
        if download is not None:
            body["download"] = download
        if self.pool_acquisition is not None and self.pool_acquisition.state != "done":
            warnings.append(f"pool: {self.pool_acquisition.line()}")
        if self.rpc is not None or self.pooling is not None:
            pooled = self.pooling.status() if self.pooling is not None else {}
            warnings += [f"pool: {n} waits: {p['reason']}" for n, p in pooled.items() if p["state"] == "waiting"]
            body["pool"] = {"offer": self.pool_state(), "rpc_server": self.rpc.state if self.rpc else "off",
                            "models": pooled}
        return body

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for /metrics, summed over this node's models."""
        ups = list(self.pool.upstreams.values())
        return {
            "models_loaded": float(sum(u.worker.state == "ready" for u in ups)),
            "queue_depth": float(sum(u.load().queued for u in ups)),
            "queue_capacity": float(sum(u.capacity for u in ups)),
            "worker_restarts_total": float(sum(u.worker.restarts for u in ups)),
            "worker_errors_total": float(sum(u.errors for u in ups)),
            "generated_tokens_total": float(sum(u.tokens_generated for u in ups)),
            "tokens_per_second": float(sum(u.tokens_per_second for u in ups)),
            "router_failovers_total": float(self.routing.failovers),
            "peers": float(len(self.mesh.peers) if self.mesh is not None else 0),
        }

    async def stop(self, timeout: float) -> None:
        """Stop a model download (its partial stays for the next start), leave the mesh, stop the workers."""
        if self._switching is not None:
            self._switching.cancel()
        if self.acquisition is not None:
            await self.acquisition.stop()
        if self._auto_pooling is not None:
            self._auto_pooling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._auto_pooling
        if self.pool_acquisition is not None:
            await self.pool_acquisition.stop()
        if self.pooling is not None:
            await self.pooling.stop()
        if self.rpc is not None:
            await self.rpc.stop(timeout)
        if self.mesh is not None:
            try:
                await asyncio.wait_for(self.mesh.stop(), timeout)
            except Exception as e:
                log.warning("mesh stop: %s", e)
        await self.pool.stop(timeout)


# --- the lifecycle --------------------------------------------------------------------------------------


class Agent:
    """Startup, main loop and staged shutdown of a node, uvicorn-style."""

    def __init__(self, config: Config, shutdown_timeout: float = 10.0) -> None:
        self.config = config
        self.shutdown_timeout = shutdown_timeout
        self.node = Node(config)
        self.notify = Notifier()
        self.should_exit = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: Any = None

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)  # a strong reference: the loop keeps only weak ones
        task.add_done_callback(self._tasks.discard)

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT; 0 on a clean stop."""
        restore = self._install_signal_handlers()
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()
            restore()
        return 0

    async def startup(self) -> None:
        """State directory, workers, mesh, then the API socket; READY=1 once it listens."""
        import uvicorn

        from .api.app import create_app

        self.notify("STATUS=starting")
        try:
            self.config.state.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"cannot create the state directory {self.config.state.dir}: {e}",
                               hint="run as root or set state.dir in hearth.yaml") from None
        await self.node.start_models()
        await self.node.start_pool_server()
        await self.node.start_mesh()
        self.node.start_pooling()
        self.node.start_auto_pool()
        with contextlib.suppress(ImportError):
            from .hardware.api import router as hardware_router

            self.node.extra_routers.append(hardware_router)
        app = create_app(self.node)
        sock = self._bind()
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="auto",
                                timeout_graceful_shutdown=max(1, int(self.shutdown_timeout)), ws="none")
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # signals are ours
        self._server = server
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="api")
        self._tasks.add(serving)
        while not server.started:
            if serving.done():
                raise StartupError("the API server failed to start", hint="see the log above")
            await asyncio.sleep(0.01)
        host, port = self.config.api.host, self.config.api.port
        log.info("API listening on http://%s:%d", host, port)
        loading = ", loading the model" if self.node.pool.upstreams else ""
        if self.node.pending is not None:
            loading = f", downloading {self.node.pending[0]}"
        self.notify("READY=1", f"STATUS=API on :{port}{loading}")
        self.node.start_acquisition()
        self._spawn(self._report_readiness(), "readiness")
        interval = self.notify.watchdog_interval()
        if interval:
            self._spawn(self._watchdog(interval), "watchdog")

    def _bind(self) -> socket.socket:
        host, port = self.config.api.host, self.config.api.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}",
                               hint="another program uses the port; set api.port in hearth.yaml") from None
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    async def main_loop(self) -> None:
        """Wait for a stop signal (or the API server ending on its own)."""
        stop = asyncio.get_running_loop().create_task(self.should_exit.wait())
        api = next(t for t in self._tasks if t.get_name() == "api")
        await asyncio.wait({stop, api}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()

    async def shutdown(self) -> None:
        """Staged: stop accepting and drain the API, leave the mesh, stop workers; bounded by the timeout."""
        self.notify("STOPPING=1", "STATUS=stopping")
        log.info("shutting down")
        if self._server is not None:
            self._server.should_exit = True
            api = [t for t in self._tasks if t.get_name() == "api"]
            if api:
                try:
                    await asyncio.wait_for(asyncio.gather(*api, return_exceptions=True), self.shutdown_timeout + 2)
                except TimeoutError:
                    log.warning("API did not stop in time")
        await self.node.stop(timeout=min(5.0, self.shutdown_timeout))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("stopped")

    def _install_signal_handlers(self) -> Any:
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        hits = {"n": 0}

        def on_signal(sig: int) -> None:
            hits["n"] += 1
            log.info("received %s", signal.Signals(sig).name)
            self.should_exit.set()
            if hits["n"] > 1 and self._server is not None:
                self._server.force_exit = True  # a second signal: stop waiting for streams

        for sig in previous:
            loop.add_signal_handler(sig, on_signal, sig)

        def restore() -> None:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

        return restore

    async def _report_readiness(self) -> None:
        last = None
        while True:
            h = self.node.health()
            download = (h.get("download") or {}).get("line")
            summary = (h["status"], tuple(sorted((n, m["state"]) for n, m in h["models"].items())), download)
            if summary != last:
                last = summary
                states = ", ".join(f"{n} {m['state']}" for n, m in h["models"].items()) or "no local model"
                if download:
                    states = download if not h["models"] else f"{states}; {download}"
                self.notify(f"STATUS={h['status']}: {states}")
                if h["status"] == "ready":
                    log.info("ready: %s", states)
                    self.node.check_offload()
            await asyncio.sleep(0.5)

    async def _watchdog(self, interval: float) -> None:
        # The ping comes from the event loop: a blocked loop (the thing the watchdog exists to catch)
        # stops it.
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def run(config: Config, shutdown_timeout: float = 10.0) -> int:
    """Run the agent in this process until it is told to stop; returns the exit code."""
    setup_logging(config.log.level)
    return asyncio.run(Agent(config, shutdown_timeout).serve())
