"""The HTTP service: endpoints, the pipeline behind them, online TTA state, limits and
hostile input (4xx, never 500), the OpenAPI schema under schemathesis, and the page in a
real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_collection

ENC = "openclip:qshift-tiny-vit"
PIPELINE = [{"refine": {"spell": {"vocabulary": ["a red square", "a green circle", "a blue square",
                                                 "one circle that is red"]}, "cache": False, "min_cos": 0.0}},
            {"adapt": {"method": "tent", "lr": 0.01}}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    coll = make_image_collection(root / "shapes")
    return coll, root


def _app(served, **kw):
    from qshift.service import Limits, ServiceConfig, create_app

    coll, root = served
    warnings.filterwarnings("ignore", message=".*has no checkpoint.*")
    cfg = ServiceConfig({"shapes": str(coll)}, ENC, kw.pop("pipeline", PIPELINE), store=str(root / "store"),
                        limits=kw.pop("limits", Limits()), **kw)
    return create_app(cfg)


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    with TestClient(_app(served)) as c:
        yield c


def _png(size=(40, 36), color=(220, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_health_ready_indexes(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["indexes"] == {"shapes": 12}
    (g,) = client.get("/indexes").json()
    assert g["items"] == 12 and g["modality"] == "image" and g["thumbnails"]
    assert [s["kind"] for s in g["stages"]] == ["refine", "encode", "adapt", "rank"]
    assert {"captions", "folder", "id", "image"} <= set(g["fields"])


def test_text_search_runs_the_pipeline(client):
    r = client.post("/search", json={"text": "a rde sqaure", "k": 5, "compare": True})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["changed"]["repaired"] == "a red square"
    assert [h["rank"] for h in res["results"]] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in res["results"]]
    assert scores == sorted(scores, reverse=True)
    assert res["stages"] == ["refine:spell", "encode:frozen", "adapt:tent", "rank:index"]
    assert {"refine:spell", "adapt:tent", "rank:index", "total"} <= set(res["timings"])
    assert len(res["baseline"]) == 5 and res["results"][0]["metadata"]["captions"]
    off = client.post("/search", json={"text": "a rde sqaure", "k": 5, "stages": {"refine": False, "adapt": False}})
    assert off.json()["stages"] == ["encode:frozen", "rank:index"] and off.json()["changed"] == {}
    assert [h["id"] for h in off.json()["results"]] == [h["id"] for h in res["baseline"]]


def test_batch_equals_single_calls_and_ties_are_ordered(client):
    qs = [{"text": t, "k": 4, "stages": {"adapt": False}} for t in ("a red square", "a grene circle", "blue")]
    batch = client.post("/search/batch", json={"queries": qs}).json()
    singles = [client.post("/search", json=q).json() for q in qs]
    assert [[h["id"] for h in b["results"]] for b in batch] == [[h["id"] for h in s["results"]] for s in singles]
    # scores agree to float rounding (a batch of three runs other GEMM kernels than one query)
    assert np.allclose([[h["score"] for h in b["results"]] for b in batch],
                       [[h["score"] for h in s["results"]] for s in singles], atol=1e-5)


def test_filters_over_fetch_until_k_survive(client):
    res = client.post("/search", json={"text": "a red square", "k": 3, "filter": {"image": "blue_circle_1.png"},
                                       "stages": {"adapt": False}}).json()
    assert [h["metadata"]["image"] for h in res["results"]] == ["blue_circle_1.png"]
    res = client.post("/search", json={"text": "a red square", "k": 4, "filter": {"captions": "a green circle"},
                                       "stages": {"adapt": False}}).json()
    assert len(res["results"]) == 2 and all("a green circle" in h["metadata"]["captions"] for h in res["results"])


def test_id_and_image_queries(client):
    res = client.post("/search", json={"id": "red_circle_1.png", "k": 3, "stages": {"adapt": False}}).json()
    assert res["results"][0]["id"] == "red_circle_1.png" and res["query"] == {"kind": "id", "id": "red_circle_1.png"}
    img = base64.b64encode(_png()).decode()
    r = client.post("/search", json={"image": img, "k": 2})
    assert r.status_code == 200 and r.json()["stages"][0] == "encode:frozen"  # refine skips image queries
    up = client.post("/search/upload", files={"image": ("q.png", _png(), "image/png")}, data={"k": "2"})
    assert up.status_code == 200, up.text and len(up.json()["results"]) == 2
    t = client.get("/items/red_circle_1.png/thumbnail")
    assert t.status_code == 200 and t.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(t.content)).size[0] <= 160
    assert client.get("/items/red_circle_1.png").json()["captions"][0] == "a red circle"


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (8000, 7000)).save(buf, format="PNG")  # 56 MP, a few kB on disk
    return buf.getvalue()


@pytest.mark.parametrize("request_, status, message", [
    (("post", "/search", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}), 422, "JSON"),
    (("post", "/search", {"content": b"text=hi", "headers": {"Content-Type": "text/plain"}}), 422, ""),
    (("post", "/search", {"json": {"text": "x" * 100_000}}), 400, "exceeds the limit of 2,000"),
    (("post", "/search", {"json": {"text": "hi", "k": 0}}), 422, "greater than or equal to 1"),
    (("post", "/search", {"json": {"text": "hi", "k": 10**6}}), 400, "k=1000000 exceeds the limit of 12"),
    (("post", "/search", {"json": {"text": "hi", "index": "nope"}}), 404, "unknown index 'nope'"),
    (("post", "/search", {"json": {"text": "hi", "stages": {"transfrom": True}}}), 400, "unknown stage kind"),
    (("post", "/search", {"json": {"text": "hi", "stages": {"transform": True}}}), 400, "has no transform stage"),
    (("post", "/search", {"json": {"text": "hi", "filter": {"colour": "red"}}}), 400, "unknown field 'colour'"),
    (("post", "/search", {"json": {"text": "hi", "options": {"refine": {"cache": "/tmp/x"}}}}), 400,
     "cannot be set per request"),
    (("post", "/search", {"json": {"image": "/etc/passwd"}}), 400, "never opens a path"),
    (("post", "/search", {"json": {"image": "../../secret.png"}}), 400, "never opens a path"),
    (("post", "/search", {"json": {"image": "!!!not base64!!!"}}), 400, "not valid base64"),
    (("post", "/search", {"json": {"image": base64.b64encode(b"GIF89a broken").decode()}}), 400, "not a readable"),
    (("post", "/search", {"json": {"image_url": "http://127.0.0.1:1/x.png"}}), 400, "fetching images is off"),
    (("post", "/search", {"json": {"text": "a", "id": "red_circle_1.png"}}), 400, "exactly one of"),
    (("post", "/search", {"json": {}}), 400, "exactly one of"),
    (("post", "/search", {"json": {"text": "   "}}), 400, "empty or whitespace"),
    (("post", "/search", {"json": {"id": "nope.png"}}), 404, "no item 'nope.png'"),
    (("post", "/search", {"json": {"text": "hi", "surprise": 1}}), 422, "Extra inputs"),
    (("post", "/search/upload", {"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\n\x00\x00", "image/png")}}), 400,
     "not a readable image"),
    (("post", "/search/upload", {"files": {"image": ("x.png", _png()[:60], "image/png")}}), 400, "not a readable"),
    (("post", "/search/upload", {"files": {"image": ("big.png", _huge_png(), "image/png")}}), 413,
     "exceeds the limit of 16,777,216"),
    (("post", "/search/upload", {"data": {"image": "/etc/passwd"}}), 422, ""),
    (("post", "/search/upload", {"files": {"image": ("x.png", _png(), "image/png")}, "data": {"stages": "{"}}),
     400, "stages: not valid JSON"),
    (("post", "/search/batch", {"json": {"queries": []}}), 422, ""),
    (("get", "/items/nope.png", {}), 404, "no item"),
    (("get", "/items/red_circle_1.png/thumbnail?side=5000", {}), 422, ""),
    (("post", "/adapt/reset", {"json": {"index": "nope"}}), 404, "unknown index"),
])
def test_hostile_input_is_a_clear_4xx(client, request_, status, message):
    method, path, kw = request_
    r = getattr(client, method)(path, **kw)
    assert r.status_code == status, r.text
    assert message in r.text


def test_body_size_limit(served):
    from fastapi.testclient import TestClient

    from qshift.service import Limits

    with TestClient(_app(served, pipeline=None, limits=Limits(max_body_bytes=2000))) as c:
        r = c.post("/search", json={"text": "a" * 5000})
        assert r.status_code == 413 and "exceeds the limit of 2,000" in r.text
        assert c.post("/search", json={"text": "a red square"}).status_code == 200


def test_bearer_token(served):
    from fastapi.testclient import TestClient

    with TestClient(_app(served, pipeline=None, token="s3cret")) as c:
        assert c.get("/health").status_code == 200  # liveness stays open
        assert c.post("/search", json={"text": "hi"}).status_code == 401
        assert c.post("/search", json={"text": "hi"}, headers={"Authorization": "Bearer nope"}).status_code == 403
        ok = c.post("/search", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and c.get("/metrics").status_code == 401


def test_online_tta_single_writer_state_saved_and_reset(served, tmp_path):
    """Concurrent requests go through one worker: every adaptation batch is counted once,
    the state survives a restart, and /adapt/reset forgets it."""
    from fastapi.testclient import TestClient

    def adapter(c):
        (pipe,) = [p for p in c.app.state.service.pipelines.values() if p.stateful]
        return pipe.stages[2].adapter

    def adapted_batches(c):
        return adapter(c).stats["batches"], c.app.state.service.worker.batches

    with TestClient(_app(served, state_dir=str(tmp_path), max_batch=8, window_ms=20)) as c:
        texts = [f"a {c_} {s}" for c_ in ("red", "green", "blue") for s in ("square", "circle")] * 8
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda t: c.post("/search", json={"text": t, "k": 3}).status_code, texts))
        assert codes == [200] * len(texts)
        n, worker_batches = adapted_batches(c)
        assert 6 <= n <= len(texts) and n == worker_batches  # micro-batched; no batch lost or run twice
        text = c.get("/metrics").text
        assert "qshift_requests_total" in text and 'qshift_stage_seconds_bucket{le="0.001",stage="adapt:tent"}' \
            in text and "qshift_adapt_batches_total" in text
    (state,) = list(tmp_path.glob("shapes-*.pt"))
    with TestClient(_app(served, state_dir=str(tmp_path))) as c:
        c.post("/search", json={"text": "a red square", "k": 3})
        assert adapted_batches(c)[0] == n + 1  # resumed from the saved state
        import torch

        a = adapter(c)
        assert any(not torch.equal(p, p0) for p, p0 in zip(a.state_dict()["params"], a._initial))
        assert c.post("/adapt/reset", json={}).json() == {"reset": 1}
        assert all(torch.equal(p, p0) for p, p0 in zip(a.state_dict()["params"], a._initial))  # back to frozen
        assert "qshift_adapt_resets_total 1.0" in c.get("/metrics").text
    assert state.is_file()


def test_openapi_under_schemathesis(served):
    """Generated requests against every endpoint of the OpenAPI schema: no server error."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = _app(served, pipeline=None)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, statuses = [], []
    from fastapi.testclient import TestClient

    with TestClient(app):
        ops = [op.ok() for op in schema.get_all_operations()]
        for operation in ops:
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy())
            def run(case):
                r = case.call()
                statuses.append(r.status_code)
                if r.status_code >= 500:
                    failures.append((case.method, case.path, r.status_code, r.text[:200]))

            run()
    assert not failures, failures[:5]
    assert len(ops) >= 10 and len(statuses) >= 10 * len(ops) and any(s < 300 for s in statuses)


def test_upload_fuzz_with_broken_files(client):
    from hypothesis import HealthCheck, given, settings, strategies as st

    good = _png()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(st.binary(max_size=2000), st.integers(0, len(good)).map(lambda n: good[:n]),
                     st.binary(min_size=1, max_size=50).map(lambda b: good[:30] + b + good[40:])))
    def run(data):
        r = client.post("/search/upload", files={"image": ("f.png", data, "image/png")}, data={"k": "2"})
        assert r.status_code in (200, 400, 413), (r.status_code, r.text[:200])

    run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed "
                    "(`make test` installs it with apt-get when it can)")
def test_the_page_in_a_real_browser(served):
    import uvicorn
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_app(served), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    shot = Path("runs/artifacts/service-page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                              "--disable-background-networking", "--disable-component-update",
                                              "--disable-sync"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#q", "a rde sqaure")
            page.click("#go")
            page.wait_for_selector("#results .hit img")
            assert page.locator("#results .hit").count() == 12
            assert "repaired query: “a red square”" in page.inner_text("#repaired")
            assert page.is_visible("#without")  # before/after side by side
            assert "q=a+rde+sqaure" in page.url
            page.uncheck("input[data-kind=adapt]")
            page.wait_for_function("() => location.search.includes('off=adapt')")
            page.wait_for_function("() => document.querySelector('#status').textContent.includes('encode:frozen')"
                                   " && !document.querySelector('#status').textContent.includes('adapt:tent')")
            page.screenshot(path=str(shot), full_page=True)
            # the URL carries the search: opening it again shows the same results
            page2 = browser.new_page()
            page2.goto(page.url)
            page2.wait_for_selector("#results .hit")
            assert not page2.is_checked("input[data-kind=adapt]")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert shot.stat().st_size > 10_000
