"""The household page's HTTP side: the built page at ``/``, its assets, and the JSON endpoints under
``/page/v1/`` it calls.

Who may do what:
- the admin endpoints (household, models, keys) need a session from signing in with the admin password,
  except from this machine itself when ``api.open_loopback`` is on (as the API lets loopback in without a key),
  asked for by a loopback name (so DNS rebinding cannot borrow that door);
- chat needs the same, unless ``page.household_chat`` lets the whole LAN chat without signing in;
- every change (POST, DELETE) also needs the session's CSRF token in ``X-Hearth-CSRF``, and any request
  a browser marks as cross-site (``Sec-Fetch-Site``, or an ``Origin`` that is not this host) is refused.

The session cookie is HttpOnly and SameSite=Strict; sign-in failures are rate-limited per address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from starlette.responses import FileResponse, JSONResponse, Response

from ..api.errors import ApiError
from ..api.guard import is_loopback
from ..api.keys import ApiKeyError
from ..api.state import api_state
from ..errors import HearthError
from . import signin, views

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
"""The built page (ci/page writes it; the package ships it)."""
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
CSRF_HEADER = "x-hearth-csrf"
SECURITY_HEADERS = {
    # Everything the page needs comes from the node itself: no CDN, no inline script, no framing.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


class PageState:
    """Sessions, the sign-in limiter and pulls started from the page: one per app."""

    def __init__(self) -> None:
        self.sessions = signin.Sessions()
        self.limiter = signin.LoginLimiter()
        self.loopback_csrf = secrets.token_urlsafe(24)
        """The CSRF token for loopback callers who need no session (a page open on the node itself)."""
        self.pulls: dict[str, dict[str, Any]] = {}
        self.tasks: set[asyncio.Task[None]] = set()


def _page(request: Request) -> PageState:
    app_state = request.app.state
    page = getattr(app_state, "hearth_page", None)
    if page is None:
        page = app_state.hearth_page = PageState()
    return page  # type: ignore[no-any-return]


def _address(request: Request) -> str:
    return request.client.host if request.client else "?"


def _cross_site(request: Request) -> bool:
    """Whether the browser says this request comes from another site (another origin than this host)."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


def _loopback_host(request: Request) -> bool:
    """Whether the browser asked for this node by a loopback name. A page on some other site whose name was
    re-pointed at 127.0.0.1 (DNS rebinding) reaches the node as that name, and must not get loopback's
    open door."""
    host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Caller:
    """Who is asking: signed in, on loopback (open), or neither; and the CSRF token they must echo."""

    def __init__(self, request: Request) -> None:
        page = _page(request)
        config = api_state(request).runtime.config
        self.session = page.sessions.get(request.cookies.get(signin.COOKIE))
        self.loopback = bool(config.api.open_loopback and is_loopback(request.scope.get("client"))
                             and _loopback_host(request))
        self.admin = self.session is not None or self.loopback
        self.household_chat = bool(config.page.household_chat)
        self.csrf = self.session.csrf if self.session is not None else (page.loopback_csrf if self.loopback else None)


def _refuse_cross_site_and_forgery(request: Request, caller: Caller) -> None:
    if _cross_site(request):
        raise ApiError(403, "cross-site request refused: use the household page on this node itself")
    if request.method in _UNSAFE:
        sent = request.headers.get(CSRF_HEADER, "")
        if caller.csrf is None or not secrets.compare_digest(sent.encode(), caller.csrf.encode()):
            raise ApiError(403, "missing or wrong CSRF token: reload the page and try again")


async def admin(request: Request) -> Caller:
    """Dependency: a signed-in admin (or a loopback caller while api.open_loopback is on)."""
    caller = Caller(request)
    if not caller.admin:
        raise ApiError(401, "sign in with the admin password first")
    _refuse_cross_site_and_forgery(request, caller)
    return caller


async def chatter(request: Request) -> Caller:
    """Dependency: someone who may chat (an admin, or anyone when page.household_chat is on)."""
    caller = Caller(request)
    if not (caller.admin or caller.household_chat):
        raise ApiError(401, "sign in to chat (or turn on page.household_chat to let the household chat without it)")
    if _cross_site(request):
        raise ApiError(403, "cross-site request refused: use the household page on this node itself")
    if caller.admin:
        _refuse_cross_site_and_forgery(request, caller)
    return caller


Admin = Annotated[Caller, Depends(admin)]
Chatter = Annotated[Caller, Depends(chatter)]

router = APIRouter(tags=["page"], include_in_schema=False)


# --- the page itself ------------------------------------------------------------------------------------


def _static(request: Request, name: str, media_type: str) -> Response:
    path = STATIC / name
    if not path.is_file():
        return Response("The household page was not built into this agent: run 'bash ci/page' and reinstall.\n",
                        status_code=503, media_type="text/plain")
    headers = dict(SECURITY_HEADERS)
    headers["Cache-Control"] = "no-cache"  # small files; an upgraded node serves the new page at once
    headers["Vary"] = "Accept-Encoding"
    gz = path.with_name(name + ".gz")
    if "gzip" in request.headers.get("accept-encoding", "") and gz.is_file():
        headers["Content-Encoding"] = "gzip"
        return FileResponse(gz, media_type=media_type, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)


@router.get("/")
async def index(request: Request) -> Response:
    """The household page."""
    return _static(request, "index.html", "text/html; charset=utf-8")


@router.get("/assets/{name}")
async def asset(name: str, request: Request) -> Response:
    """The page's script and style sheet (only those two names)."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, f"no such asset: {name}")
    return _static(request, name, media_type)


# --- signing in -----------------------------------------------------------------------------------------


@router.get("/page/v1/session")
async def session(request: Request) -> JSONResponse:
    """Whether this browser is signed in, may administer or chat, and its CSRF token."""
    caller = Caller(request)
    st = api_state(request)
    has_password = await asyncio.to_thread(signin.load_password_hash, st.runtime.state_dir) is not None
    return JSONResponse({"signed_in": caller.session is not None, "admin": caller.admin,
                         "loopback": caller.loopback, "chat": caller.admin or caller.household_chat,
                         "csrf": caller.csrf if caller.admin else None, "password_set": has_password,
                         "node": views.node_name(st.runtime)}, headers={"Cache-Control": "no-store"})


@router.post("/page/v1/login")
async def login(request: Request) -> JSONResponse:
    """Sign in with the admin password: sets the session cookie (HttpOnly, SameSite=Strict)."""
    if _cross_site(request):
        raise ApiError(403, "cross-site request refused: use the household page on this node itself")
    page = _page(request)
    address = _address(request)
    wait = page.limiter.retry_after(address)
    if wait:
        raise ApiError(429, f"too many wrong passwords: try again in {wait} s", retry_after=wait)
    try:
        body = json.loads(await request.body())
        password = body["password"]
        if not isinstance(password, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "send {\"password\": \"...\"}", param="password") from None
    state_dir = api_state(request).runtime.state_dir
    hashed = await asyncio.to_thread(signin.load_password_hash, state_dir)
    if hashed is None:
        raise ApiError(409, "no admin password is set on this node: set one with the wizard "
                            "(or 'hearth setup'), or use the page on the node itself")
    if not await asyncio.to_thread(signin.check_password, password, hashed):
        page.limiter.failed(address)
        log.warning("page: wrong admin password from %s", address)
        raise ApiError(401, "wrong password")
    page.limiter.succeeded(address)
    page.sessions.drop(request.cookies.get(signin.COOKIE))
    token, sess = page.sessions.create()
    log.info("page: admin signed in from %s", address)
    resp = JSONResponse({"signed_in": True, "csrf": sess.csrf}, headers={"Cache-Control": "no-store"})
    resp.set_cookie(signin.COOKIE, token, max_age=int(signin.SESSION_SECONDS), path="/", httponly=True,
                    samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.post("/page/v1/logout")
async def logout(request: Request, caller: Admin) -> JSONResponse:
    """Sign this browser out."""
    _page(request).sessions.drop(request.cookies.get(signin.COOKIE))
    resp = JSONResponse({"signed_in": False})
    resp.delete_cookie(signin.COOKIE, path="/", httponly=True, samesite="strict")
    return resp


# --- chat -----------------------------------------------------------------------------------------------


@router.get("/page/v1/models")
async def models(request: Request, caller: Chatter) -> JSONResponse:
    """The models the household serves, each with the nodes it runs on."""
    return JSONResponse({"models": views.chat_models(api_state(request).runtime)})


@router.post("/page/v1/chat")
async def chat(request: Request, caller: Chatter) -> Response:
    """A chat completion, exactly as /v1/chat/completions answers it (the page streams it)."""
    from ..api.app import validation_to_api_error
    from ..api.schemas import ChatCompletionRequest
    from ..api.v1 import chat_completions

    try:
        body = ChatCompletionRequest.model_validate_json(await request.body())
    except ValueError as e:
        errors = getattr(e, "errors", None)
        raise validation_to_api_error(errors() if callable(errors) else []) from None
    return await chat_completions(body, request)


# --- the household --------------------------------------------------------------------------------------


@router.get("/page/v1/household")
async def household(request: Request, caller: Admin) -> JSONResponse:
    """Every node with its hardware, models, load, tokens/s and last seen; downloads; the join code."""
    return JSONResponse(await views.household(api_state(request).runtime, _page(request).pulls, request.url.hostname))


# --- models ---------------------------------------------------------------------------------------------


@router.get("/page/v1/catalogue")
async def catalogue(request: Request, caller: Admin) -> JSONResponse:
    """The catalogue with what fits this node and why, and pulls in progress."""
    runtime = api_state(request).runtime
    report = await views.own_hardware(runtime)
    try:
        data = await asyncio.to_thread(views.catalogue, runtime, report)
    except HearthError as e:
        raise ApiError(500, e.message) from None
    data["downloads"] = views.downloads(runtime, _page(request).pulls)
    return JSONResponse(data)


@router.post("/page/v1/pull")
async def pull(request: Request, caller: Admin) -> JSONResponse:
    """Start fetching a catalogue model into the store (then serving it); progress shows in /page/v1/catalogue."""
    try:
        name = json.loads(await request.body())["model"]
        if not isinstance(name, str) or not name:
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "send {\"model\": \"<catalogue name>\"}", param="model") from None
    runtime = api_state(request).runtime
    puller = getattr(runtime, "pull", None)
    if puller is None:
        raise ApiError(400, "this node cannot pull models", param="model")
    page = _page(request)
    if page.pulls.get(name, {}).get("state") == "running":
        return JSONResponse({"model": name, "state": "running"}, status_code=202)
    from ..models.catalogue import load as load_catalogue

    if load_catalogue().get(name) is None:
        raise ApiError(404, f"model '{name}' is not in the catalogue", param="model")
    entry = page.pulls[name] = {"state": "running", "status": "starting", "completed": 0, "total": None,
                                "started": time.time()}

    async def run() -> None:
        try:
            async for event in puller(name):
                entry["status"] = event.get("status", entry["status"])
                if "completed" in event:
                    entry["completed"] = event["completed"]
                if event.get("total"):
                    entry["total"] = event["total"]
            entry["state"] = "done"
        except HearthError as e:
            entry["state"], entry["status"] = "failed", e.message + (f" ({e.hint})" if e.hint else "")
        except Exception as e:  # the page shows it; the agent goes on
            log.exception("page: pull of %s failed", name)
            entry["state"], entry["status"] = "failed", f"{type(e).__name__}: {e}"
        entry["ended"] = time.time()

    task = asyncio.get_running_loop().create_task(run(), name=f"page pull {name}")
    page.tasks.add(task)  # a strong reference: the loop keeps only weak ones
    task.add_done_callback(page.tasks.discard)
    return JSONResponse({"model": name, "state": "running"}, status_code=202)


@router.delete("/page/v1/models/{name}")
async def remove(name: str, request: Request, caller: Admin) -> JSONResponse:
    """Remove a model from this node's store (not one this node is serving)."""
    from ..models.store import Store

    runtime = api_state(request).runtime
    if any(m["name"] == name for m in views._local_models(runtime)):
        raise ApiError(409, f"{name} is loaded on this node: serve another model first (model.name)")
    store = Store.from_config(runtime.config)
    try:
        removed = await asyncio.to_thread(store.remove, name)
    except HearthError as e:
        raise ApiError(404, e.message) from None
    return JSONResponse({"removed": [p.name for p in removed]})


# --- API keys -------------------------------------------------------------------------------------------


@router.get("/page/v1/keys")
async def keys(request: Request, caller: Admin) -> JSONResponse:
    """The node's API keys, masked."""
    try:
        listed = await asyncio.to_thread(api_state(request).keys.load)
    except ApiKeyError as e:
        raise ApiError(500, e.message) from None
    return JSONResponse({"keys": [{"name": k.name, "shown": k.shown, "created": k.created} for k in listed]})


@router.post("/page/v1/keys")
async def create_key(request: Request, caller: Admin) -> JSONResponse:
    """A new API key: the only time its secret is shown."""
    try:
        name = json.loads(await request.body())["name"]
        if not isinstance(name, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "send {\"name\": \"...\"}", param="name") from None
    try:
        key = await asyncio.to_thread(api_state(request).keys.create, name)
    except ApiKeyError as e:
        raise ApiError(400, e.message + (f" ({e.hint})" if e.hint else ""), param="name") from None
    log.info("page: API key '%s' created", name)
    return JSONResponse({"name": key.name, "key": key.key, "created": key.created}, status_code=201,
                        headers={"Cache-Control": "no-store"})


@router.delete("/page/v1/keys/{name}")
async def revoke_key(name: str, request: Request, caller: Admin) -> JSONResponse:
    """Revoke an API key."""
    try:
        await asyncio.to_thread(api_state(request).keys.revoke, name)
    except ApiKeyError as e:
        raise ApiError(404, e.message) from None
    log.info("page: API key '%s' revoked", name)
    return JSONResponse({"revoked": name})


ADMIN_ENDPOINTS = (("GET", "/page/v1/household"), ("GET", "/page/v1/catalogue"), ("POST", "/page/v1/pull"),
                   ("DELETE", "/page/v1/models/x"), ("GET", "/page/v1/keys"), ("POST", "/page/v1/keys"),
                   ("DELETE", "/page/v1/keys/x"), ("POST", "/page/v1/logout"))
"""Every endpoint that needs a session (the security tests walk this list and the router's own)."""
