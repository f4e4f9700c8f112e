"""The HTTP service: the query pipeline behind FastAPI, with a search page at ``/``.

Endpoints: ``POST /search`` (JSON: exactly one of ``text``, ``image`` as base64, ``id`` of
an indexed item), ``POST /search/upload`` (multipart image upload), ``POST /search/batch``,
``GET /indexes``, ``GET /items/{id}`` (+ ``/thumbnail``), ``GET /health``, ``GET /ready``,
``GET /metrics`` (Prometheus), ``POST /adapt/reset``. Every error a client can cause is a
4xx with a message naming the input; the pipeline runs on one worker thread
(:mod:`qshift.service.worker`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from qshift.errors import QShiftError
from qshift.service.config import ServiceConfig
from qshift.service.worker import Job, Worker

STATIC = Path(__file__).resolve().parent / "static"
OPTIONAL_KINDS = ("refine", "adapt", "transform")
# per-request options a client may set on the server's stages (nothing that names a file)
REQUEST_OPTIONS = {"refine": {"mode": ("fuse", "replace")}, "transform": {"mode": ("full", "rerank")}}
Scalar = str | int | float | bool


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="A text query.")
    image: str | None = Field(None, description="An image query: the file's bytes, base64-encoded.")
    id: str | None = Field(None, description="Search with an indexed item (its stored embedding).")
    image_url: str | None = Field(None, description="An image to fetch (off unless the server allows it).")
    k: int = Field(10, ge=1, description="Results to return.")
    index: str | None = Field(None, description="Gallery name (GET /indexes); the first one by default.")
    stages: dict[str, bool] | None = Field(None, description="Switch the server's refine / adapt / transform "
                                                             "stages on or off, e.g. {\"adapt\": false}.")
    options: dict[str, dict[str, Scalar]] | None = Field(
        None, description="Per-request options of the server's stages: refine.mode (fuse|replace), "
                          "transform.mode (full|rerank).")
    filter: dict[str, Scalar] | None = Field(None, description="Item metadata that must match, e.g. "
                                                               "{\"folder\": \"images/flat/test\"}.")
    compare: bool = Field(False, description="Also return the zero-shot ranking (no optional stage).")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[SearchRequest] = Field(..., min_length=1)


class Hit(BaseModel):
    id: str
    score: float
    rank: int
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    index: str
    query: dict[str, Any]
    stages: list[str]
    results: list[Hit]
    changed: dict[str, Any] = {}
    timings: dict[str, float] = {}
    baseline: list[Hit] | None = None


class ResetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: str | None = None


def bad(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


class Service:
    """The service's state: encoder, galleries, pipelines (built per request shape), the
    worker and the metrics."""

    def __init__(self, cfg: ServiceConfig) -> None:
        from qshift.encoders import create_encoder
        from qshift.paths import cache_dir
        from qshift.pipeline import parse_pipeline
        from qshift.service.catalog import open_gallery
        from qshift.service.metrics import Metrics
        from qshift.store import EmbeddingStore

        self.cfg = cfg
        self.encoder = create_encoder(cfg.encoder)
        store = EmbeddingStore(cfg.store or cache_dir() / "store")
        self.galleries = {name: open_gallery(name, spec, self.encoder, store, progress=cfg.progress)
                          for name, spec in cfg.galleries.items()}
        self.specs = parse_pipeline(cfg.pipeline)
        self.optional = [s for s in self.specs if s.kind in OPTIONAL_KINDS]
        self.pipelines: dict[tuple, Any] = {}
        self.metrics = Metrics()
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else None
        self.worker = Worker(self.pipeline, cfg.max_batch, cfg.window_ms, on_batch=self.metrics.batch)
        for g in self.galleries.values():  # build the default pipelines now: bad stages fail at start
            self.pipeline(self.key(g.name, "text" if self.encoder_has("text") else "image", None, None))

    def encoder_has(self, modality: str) -> bool:
        return modality in getattr(self.encoder, "modalities", {"text", "image"})

    # -- pipelines ----------------------------------------------------------------------------
    def key(self, gallery: str, modality: str, stages: dict[str, bool] | None,
            options: dict[str, dict[str, Scalar]] | None) -> tuple:
        stages, options = stages or {}, options or {}
        known = {s.kind for s in self.optional}
        for kind in stages:
            if kind not in OPTIONAL_KINDS:
                raise bad(400, f"stages: unknown stage kind {kind!r}; switchable: {', '.join(OPTIONAL_KINDS)}")
            if stages[kind] and kind not in known:
                raise bad(400, f"stages: this server's pipeline has no {kind} stage "
                               f"(it has: {', '.join(sorted(known)) or 'none'})")
        for kind, opts in options.items():
            allowed = REQUEST_OPTIONS.get(kind, {})
            for name, value in opts.items():
                if name not in allowed:
                    raise bad(400, f"options: {kind}.{name} cannot be set per request; settable: "
                                   + (", ".join(f"{k}.{o}" for k, v in REQUEST_OPTIONS.items() for o in v)))
                if value not in allowed[name]:
                    raise bad(400, f"options: {kind}.{name} must be one of {', '.join(allowed[name])}, got {value!r}")
        on = tuple(s.kind for s in self.optional if stages.get(s.kind, True)
                   and not (s.kind == "refine" and modality != "text"))
        opts = tuple(sorted((k, n, v) for k, o in options.items() if k in on for n, v in o.items()))
        return gallery, modality, on, opts

    def pipeline(self, key: tuple) -> Any:
        if key not in self.pipelines:
            from qshift.directions import direction_of
            from qshift.pipeline import Pipeline, PipelineContext

            gallery, modality, on, opts = key
            g = self.galleries[gallery]
            override: dict[str, dict] = {}
            for kind, name, value in opts:
                override.setdefault(kind, {})[name] = value
            config = [{s.kind: {"name": s.name, **s.options, **override.get(s.kind, {})}}
                      for s in self.specs if s.kind not in OPTIONAL_KINDS or s.kind in on]
            ctx = PipelineContext(self.encoder, direction_of(modality, g.modality), index=g.index,
                                  extra={"shared_encoder": True})
            if any(s.kind in ("adapt", "transform") for s in self.specs if s.kind in on):
                ctx.gallery = g.vectors()
            pipe = Pipeline.from_config(config, ctx)
            path = self.state_path(gallery, pipe)
            if pipe.stateful and path is not None and path.is_file():
                pipe.load_state(path)
            self.pipelines[key] = pipe
        return self.pipelines[key]

    def state_path(self, gallery: str, pipe: Any) -> Path | None:
        return None if self.state_dir is None else self.state_dir / f"{gallery}-{pipe.key}.pt"

    def save_states(self) -> list[str]:
        saved = []
        for (gallery, *_), pipe in self.pipelines.items():
            path = self.state_path(gallery, pipe)
            if pipe.stateful and path is not None:
                pipe.save_state(path)
                saved.append(str(path))
        return saved

    def reset(self, gallery: str | None) -> int:
        n = 0
        for (g, *_), pipe in self.pipelines.items():
            if pipe.stateful and gallery in (None, g):
                pipe.reset()
                n += 1
        self.metrics.resets.inc(n)
        return n

    def close(self) -> None:
        self.worker.call(self.save_states)
        self.worker.close()
        for pipe in self.pipelines.values():
            pipe.close()

    # -- requests --------------------------------------------------------------------------------
    def gallery(self, name: str | None) -> Any:
        if name is None:
            return next(iter(self.galleries.values()))
        if name not in self.galleries:
            raise bad(404, f"unknown index {name!r}; known: {', '.join(self.galleries)}")
        return self.galleries[name]

    def decode_image(self, data: bytes, what: str = "image") -> Any:
        from PIL import Image, UnidentifiedImageError

        limit = self.cfg.limits.max_image_pixels
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > limit:
                raise bad(413, f"{what}: {w} × {h} = {w * h:,} pixels exceeds the limit of {limit:,}")
            im.load()
            return im.convert("RGB")
        except HTTPException:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise bad(400, f"{what}: not a readable image ({str(exc)[:200]})") from None

    def fetch_image(self, url: str) -> Any:
        if not self.cfg.allow_image_url:
            raise bad(400, "image_url: fetching images is off on this server; upload the image instead")
        if not url.startswith(("http://", "https://")):
            raise bad(400, f"image_url: only http(s) URLs are fetched, got {url[:100]!r}")
        import httpx

        limit = self.cfg.limits.max_body_bytes
        try:
            with httpx.Client(timeout=10.0, follow_redirects=False) as client, client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise bad(400, f"image_url: {url[:200]} answered {r.status_code}")
                data = b""
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise bad(413, f"image_url: more than {limit:,} bytes")
        except httpx.HTTPError as exc:
            raise bad(400, f"image_url: cannot fetch {url[:200]} ({exc})") from None
        return self.decode_image(data, "image_url")

    def query_of(self, req: SearchRequest, g: Any, upload: Any = None) -> tuple[str, Any, np.ndarray | None, dict]:
        given = [n for n, v in (("text", req.text), ("image", req.image), ("id", req.id), ("image_url", req.image_url))
                 if v is not None]
        if upload is not None:
            given.append("image upload")
        if len(given) != 1:
            raise bad(400, "give exactly one of text, image, id" + (f" (got {', '.join(given)})" if given else ""))
        if req.image_url is not None:
            return "image", self.fetch_image(req.image_url), None, {"kind": "image_url", "url": req.image_url}
        if req.text is not None:
            if len(req.text) > self.cfg.limits.max_text_chars:
                raise bad(400, f"text: {len(req.text):,} characters exceeds the limit of "
                               f"{self.cfg.limits.max_text_chars:,}")
            if not req.text.strip():
                raise bad(400, "text: empty or whitespace-only query")
            return "text", req.text, None, {"kind": "text", "text": req.text}
        if req.id is not None:
            try:
                j, item = g.item(req.id)
            except KeyError:
                raise bad(404, f"id: no item {req.id!r} in index {g.name!r}") from None
            raw = str(g.image_paths[j]) if g.image_paths is not None else item.get("text", req.id)
            return g.modality, raw, g.vectors()[j], {"kind": "id", "id": req.id}
        if upload is not None:
            return "image", upload, None, {"kind": "image"}
        data = req.image
        if data.startswith(("/", "./", "../", "file:", "http:", "https:")) or (len(data) < 512 and "/" in data
                                                                               and "." in data.rsplit("/", 1)[-1]):
            raise bad(400, "image: expected the image's bytes (base64) or an upload, not a path or URL — the "
                           "server never opens a path a client sends")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad(400, "image: not valid base64") from None
        return "image", self.decode_image(raw), None, {"kind": "image"}

    def check(self, req: SearchRequest, g: Any) -> None:
        n = len(g)
        if req.k > min(self.cfg.limits.max_k, n):
            raise bad(400, f"k={req.k} exceeds the limit of {min(self.cfg.limits.max_k, n)} "
                           f"(index {g.name!r} has {n} items, the service allows {self.cfg.limits.max_k})")
        for f in req.filter or {}:
            if f not in g.fields:
                raise bad(400, f"filter: unknown field {f!r}; the items of {g.name!r} have: {', '.join(g.fields)}")

    @staticmethod
    def matches(item: dict, flt: dict) -> bool:
        for f, want in flt.items():
            have = item.get(f)
            if isinstance(have, list) and want not in have or not isinstance(have, list) and have != want:
                return False
        return True

    async def run(self, key: tuple, query: Any, k: int, emb: np.ndarray | None) -> Any:
        try:
            return await asyncio.wrap_future(self.worker.submit(Job(key, query, k, emb)))
        except QShiftError as exc:
            raise bad(400, str(exc)) from None

    async def search_one(self, req: SearchRequest, upload: Any = None) -> SearchResponse:
        t0 = time.perf_counter()
        g = self.gallery(req.index)
        self.check(req, g)
        modality, query, emb, described = self.query_of(req, g, upload)
        if modality == "text" and not self.encoder_has("text") or modality == "image" and not self.encoder_has("image"):
            raise bad(400, f"the encoder {self.encoder.spec!r} does not encode {modality} queries")
        key = self.key(g.name, modality, req.stages, req.options)
        flt, n = req.filter or {}, len(g)
        fetch = req.k if not flt else min(n, req.k * self.cfg.limits.overfetch)
        while True:
            res = await self.run(key, query, fetch, emb)
            hits = [h for h in res.hits if self.matches(g.items[h["index"]], flt)]
            if len(hits) >= req.k or fetch >= n:
                break
            fetch = min(n, fetch * 4)
        out = SearchResponse(index=g.name, query=described, stages=[f"{s.kind}:{s.name}" for s in self.specs
                                                                   if s.kind not in OPTIONAL_KINDS or s.kind in key[2]],
                             results=self.hits(g, hits[: req.k]), changed=self.changed(res.meta),
                             timings={**res.timings, "total": time.perf_counter() - t0})
        if req.compare:
            base = await self.run(self.key(g.name, modality, {k: False for k in OPTIONAL_KINDS}, None), query,
                                  fetch, emb)
            out.baseline = self.hits(g, [h for h in base.hits if self.matches(g.items[h["index"]], flt)][: req.k])
        return out

    @staticmethod
    def changed(meta: dict) -> dict:
        ref = meta.get("refine", {})
        return {k: ref[k] for k in ("repaired", "fusion_weight", "guard", "truncated") if k in ref}

    @staticmethod
    def hits(g: Any, hits: list[dict]) -> list[Hit]:
        return [Hit(id=str(h["id"]), score=h["score"], rank=r + 1, metadata=g.items[h["index"]])
                for r, h in enumerate(hits)]


def create_app(cfg: ServiceConfig) -> FastAPI:
    """The FastAPI app; the service (encoder, galleries, worker) starts with it."""
    from qshift.service.guard import BodyLimit

    svc = Service(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        svc.close()

    app = FastAPI(title="qshift", version=_version(), lifespan=lifespan,
                  description="Robust image–text search: the qshift query pipeline over HTTP.")
    app.state.service = svc
    app.add_middleware(BodyLimit, max_bytes=cfg.limits.max_body_bytes)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def auth(request: Request) -> None:
        if not cfg.token:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise bad(401, "missing bearer token (Authorization: Bearer …)")
        if header != f"Bearer {cfg.token}":
            raise bad(403, "wrong token")

    @app.middleware("http")
    async def count(request: Request, call_next):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        svc.metrics.request(getattr(route, "path", "other"), response.status_code, time.perf_counter() - t0)
        return response

    @app.exception_handler(QShiftError)
    async def qshift_error(request: Request, exc: QShiftError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.post("/search", response_model=SearchResponse, dependencies=[Depends(auth)])
    async def search(req: SearchRequest) -> SearchResponse:
        """Search one query (text, base64 image, or the id of an indexed item)."""
        return await svc.search_one(req)

    @app.post("/search/upload", response_model=SearchResponse, dependencies=[Depends(auth)])
    async def search_upload(image: UploadFile = File(..., description="The query image."),
                            k: int = Form(10, ge=1), index: str | None = Form(None),
                            stages: str | None = Form(None, description="JSON object, as in /search."),
                            options: str | None = Form(None, description="JSON object, as in /search."),
                            filter: str | None = Form(None, description="JSON object, as in /search."),
                            compare: bool = Form(False)) -> SearchResponse:
        """Search with an uploaded image (multipart/form-data)."""
        data = await image.read(cfg.limits.max_body_bytes + 1)
        if len(data) > cfg.limits.max_body_bytes:
            raise bad(413, f"image: larger than {cfg.limits.max_body_bytes:,} bytes")
        fields = {}
        for name, value in (("stages", stages), ("options", options), ("filter", filter)):
            if value:
                try:
                    fields[name] = json.loads(value)
                except ValueError:
                    raise bad(400, f"{name}: not valid JSON") from None
        try:
            req = SearchRequest(k=k, index=index, compare=compare, **fields)
        except ValueError as exc:
            raise bad(422, f"invalid form fields: {str(exc)[:300]}") from None
        return await svc.search_one(req, svc.decode_image(data, f"image {image.filename!r}"))

    @app.post("/search/batch", response_model=list[SearchResponse], dependencies=[Depends(auth)])
    async def search_batch(req: BatchRequest) -> list[SearchResponse]:
        """N queries → N result lists, the same as N calls of /search."""
        if len(req.queries) > cfg.limits.max_batch_queries:
            raise bad(400, f"queries: {len(req.queries)} exceeds the limit of {cfg.limits.max_batch_queries}")
        return list(await asyncio.gather(*(svc.search_one(q) for q in req.queries)))

    @app.get("/indexes", dependencies=[Depends(auth)])
    async def indexes() -> list[dict]:
        """The galleries served, with the pipeline's switchable stages."""
        return [{"name": g.name, "items": len(g), "modality": g.modality, "dim": g.index.dim,
                 "encoder": svc.encoder.fingerprint(), "fields": g.fields, "thumbnails": g.image_paths is not None,
                 "stages": [{"kind": s.kind, "name": s.name} for s in svc.specs]} for g in svc.galleries.values()]

    @app.get("/items/{item_id:path}/thumbnail", responses={200: {"content": {"image/png": {}}}},
             dependencies=[Depends(auth)])
    async def thumbnail(item_id: str, index: str | None = Query(None),
                        side: int = Query(160, ge=16, le=512)) -> Response:
        """A PNG thumbnail of an indexed image (from the server's own files only)."""
        g = svc.gallery(index)
        if g.image_paths is None:
            raise bad(404, f"index {g.name!r} holds no images")
        try:
            return Response(g.thumbnail(item_id, side), media_type="image/png",
                            headers={"Cache-Control": "max-age=3600"})
        except KeyError:
            raise bad(404, f"no item {item_id!r} in index {g.name!r}") from None

    @app.get("/items/{item_id:path}", dependencies=[Depends(auth)])
    async def item(item_id: str, index: str | None = Query(None)) -> dict:
        """An indexed item's metadata (ids may contain '/')."""
        g = svc.gallery(index)
        try:
            return g.item(item_id)[1]
        except KeyError:
            raise bad(404, f"no item {item_id!r} in index {g.name!r}") from None

    @app.post("/adapt/reset", dependencies=[Depends(auth)])
    async def adapt_reset(req: ResetRequest | None = None) -> dict:
        """Forget what online adaptation learnt (of one index, or all)."""
        name = None if req is None else req.index
        if name is not None:
            svc.gallery(name)
        return {"reset": svc.worker.call(lambda: svc.reset(name))}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        alive = svc.worker.thread.is_alive()
        return JSONResponse(status_code=200 if alive else 503,
                            content={"ready": alive, "indexes": {n: len(g) for n, g in svc.galleries.items()}})

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(auth)])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(svc.metrics.text(svc), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _version() -> str:
    import qshift

    return qshift.__version__

