"""The console's Starlette application: pages, JSON views, server-sent events, media, ``/metrics``.

Every response carries a strict Content-Security-Policy (scripts, styles and images from this origin
only, no inline script) and ``nosniff``. Everything but the login page and the static assets (the page
skeleton, its script and the chart library, none of which holds data) needs a session cookie or the
password as a bearer token: decrypted data never leaves the backend without authentication. Pages are
static files; device-supplied text reaches the browser only as JSON values that the script puts into
``textContent``. Media files are served only when verified, with an allow-listed content type.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.console.auth import COOKIE, SESSION_SECONDS, ConsoleAuth
from backend.console.devices import device_rows
from backend.console.feed import ConsoleFeed, decode_telemetry
from backend.media import safe_name
from backend.metrics import CONTENT_TYPE, BackendMetrics
from sealmq.topics import valid_device_id

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# what a device may have sent that we show inline; anything else is a download (and never text/html)
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/apng", "video/mp4",
                          "video/webm"})
_TID = re.compile(r"^[0-9a-f]{2,64}$")
PUBLIC = ("/login", "/static/")


@dataclass
class ConsoleContext:
    service: Any  # backend.service.BackendService
    feed: ConsoleFeed
    metrics: BackendMetrics
    auth: ConsoleAuth
    secure_cookie: bool = False
    broker_view: str = ""  # why the broker view is off ("" when on)
    poll_interval: float = 0.25  # how often a server-sent-event stream looks for new events


class SecurityMiddleware:
    """Headers on every response, and the authentication gate in front of everything not public."""

    def __init__(self, app: ASGIApp, ctx: ConsoleContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = {b"content-security-policy": CSP.encode(), b"x-content-type-options": b"nosniff",
                         b"referrer-policy": b"no-referrer", b"x-frame-options": b"DENY",
                         b"cross-origin-opener-policy": b"same-origin",
                         b"cache-control": b"no-store"}
                headers += [(k, v) for k, v in extra.items() if k not in names]
                message["headers"] = headers
            await send(message)

        if not path.startswith(PUBLIC) and not authenticated(Request(scope), self.ctx.auth):
            if path == "/":  # a browser: to the login page; anything else gets a plain refusal
                response: Response = RedirectResponse("/login", status_code=303)
            else:
                response = JSONResponse({"error": "authentication required"}, status_code=401,
                                        headers={"WWW-Authenticate": 'Bearer realm="sealmq console"'})
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def authenticated(request: Request, auth: ConsoleAuth) -> bool:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return auth.check_password(header[7:].strip())
    return auth.check_session(request.cookies.get(COOKIE))


def create_app(ctx: ConsoleContext) -> Starlette:
    async def login_page(request: Request) -> Response:
        return FileResponse(STATIC / "login.html", media_type="text/html; charset=utf-8")

    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > 4096:
            return Response("too large", status_code=413)
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
        password = (form.get("password") or [""])[0]
        # scrypt runs off the event loop: a login must not stall the live streams
        if not await asyncio.to_thread(ctx.auth.check_password, password):
            await asyncio.sleep(0.5)  # slows guessing further
            return RedirectResponse("/login?failed=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, ctx.auth.new_session(), max_age=SESSION_SECONDS, path="/", httponly=True,
                            samesite="strict", secure=ctx.secure_cookie)
        return response

    async def logout(request: Request) -> Response:
        ctx.auth.end_session(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def devices(request: Request) -> Response:
        rows = await asyncio.to_thread(device_rows, ctx.service, ctx.feed)
        return JSONResponse({"devices": rows, "broker_view": ctx.broker_view})

    async def telemetry(request: Request) -> Response:
        device = request.query_params.get("device")
        if device is None:
            return JSONResponse({"latest": ctx.feed.latest_values()})
        if not valid_device_id(device):
            return JSONResponse({"error": "bad device id"}, status_code=400)
        limit = _int(request.query_params.get("limit"), 200, 1, 2000)
        rows = await asyncio.to_thread(ctx.service.storage.recent_messages, device, "telemetry", limit)
        return JSONResponse({"device": device,
                             "points": [{"t": m.received_at, "values": decode_telemetry(m.payload)} for m in rows]})

    async def media(request: Request) -> Response:
        rows = await asyncio.to_thread(ctx.service.storage.media)
        return JSONResponse({"media": [{
            "device": r.device_id, "name": r.name, "content_type": r.content_type, "size": r.size,
            "sha256": r.sha256, "signature_verified": r.signature_verified, "received_at": r.received_at,
            "transfer": r.transfer_id, "inline": r.content_type in INLINE_TYPES,
            "url": f"/media/{r.device_id}/{r.transfer_id}",
        } for r in reversed(rows)]})

    async def media_file(request: Request) -> Response:
        device, tid = request.path_params["device"], request.path_params["tid"]
        if not valid_device_id(device) or not _TID.match(tid):
            return JSONResponse({"error": "not found"}, status_code=404)
        rows = await asyncio.to_thread(ctx.service.storage.media)
        record = next((r for r in rows if r.device_id == device and r.transfer_id == tid), None)
        root = (Path(ctx.service.settings.data_dir) / "media").resolve()
        if record is None or not record.signature_verified:
            return JSONResponse({"error": "not found"}, status_code=404)
        path = (Path(ctx.service.settings.data_dir) / record.stored_path).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return JSONResponse({"error": "not found"}, status_code=404)
        inline = record.content_type in INLINE_TYPES
        media_type = record.content_type if inline else "application/octet-stream"
        disposition = "inline" if inline else "attachment"
        return FileResponse(path, media_type=media_type, headers={
            "Content-Disposition": f'{disposition}; filename="{safe_name(record.name)}"',
            # a file from a device is never a document of this origin
            "Content-Security-Policy": "default-src 'none'; sandbox",
        })

    async def audit(request: Request) -> Response:
        q = request.query_params
        limit = _int(q.get("limit"), 200, 1, 1000)
        return JSONResponse({"audit": ctx.feed.audit_entries(event=q.get("event") or None,
                                                             device=q.get("device") or None, limit=limit)})

    async def broker(request: Request) -> Response:
        limit = _int(request.query_params.get("limit"), 100, 1, 300)
        return JSONResponse({"broker": ctx.feed.broker_entries(limit), "broker_view": ctx.broker_view})

    async def events(request: Request) -> Response:
        cursor = _int(request.query_params.get("cursor"), ctx.feed.cursor, 0, 1 << 62)

        async def stream() -> AsyncIterator[str]:
            nonlocal cursor
            yield f"event: hello\ndata: {json.dumps({'cursor': cursor})}\n\n"
            idle = 0.0
            # a session that ends (sign-out, expiry) ends its streams too
            while not await request.is_disconnected() and authenticated(request, ctx.auth):
                cursor, new = ctx.feed.events_since(cursor)
                for seq, kind, data in new:
                    yield f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
                idle = 0.0 if new else idle + ctx.poll_interval
                if idle >= 15:  # a comment keeps proxies from closing a quiet stream
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(ctx.poll_interval)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def metrics(request: Request) -> Response:
        return Response(await asyncio.to_thread(ctx.metrics.exposition), media_type=CONTENT_TYPE)

    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", index),
        Route("/api/devices", devices),
        Route("/api/telemetry", telemetry),
        Route("/api/media", media),
        Route("/api/audit", audit),
        Route("/api/broker", broker),
        Route("/api/events", events),
        Route("/media/{device}/{tid}", media_file),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SecurityMiddleware, ctx=ctx)
    return app


def _int(text: str | None, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(text))) if text is not None else default
    except ValueError:
        return default
