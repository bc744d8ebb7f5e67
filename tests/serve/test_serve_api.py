"""The service over real HTTP: answers equal Tagger.predict, every bad input gets its 4xx/5xx and a
JSON error, and a good request right after each one is still answered correctly."""

import concurrent.futures
import functools
import io
import json
import re
import socket
import struct
import time
import zlib

import httpx
import numpy as np
import openapi_spec_validator
import pytest
from PIL import Image

from nxtp_jax.inference.tagger import Tagger
from conftest import VOCAB


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> Tagger:
    return Tagger.load(tiny_ckpt)


@pytest.fixture(scope="module")
def expected(reference, serve_images):
    """(image index, k) -> Tagger.predict's labels, computed in this process."""
    return functools.cache(lambda i, k: reference.predict([serve_images[i]], num_labels=k)[0])


def assert_same_labels(got: dict, want: list, min_prob: float = 0.0) -> None:
    want = [(label, p) for label, p in want if p >= min_prob]
    assert [x["label"] for x in got["labels"]] == [label for label, _ in want]
    np.testing.assert_allclose([x["prob"] for x in got["labels"]], [p for _, p in want], rtol=1e-4)


def post_image(url: str, path, *, endpoint: str = "/v1/tag", **params) -> httpx.Response:
    return httpx.post(f"{url}{endpoint}", params=params, content=path.read_bytes(),
                      headers={"Content-Type": "image/png"}, timeout=60)


def check_good(url, serve_images, expected, i=0, k=3) -> None:
    res = post_image(url, serve_images[i], num_labels=k)
    assert res.status_code == 200, res.text
    assert_same_labels(res.json(), expected(i, k))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data: a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_health_ready_info(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").status_code == 200
    info = httpx.get(f"{server}/v1/info").json()
    assert info == {"vocabs": [], "max_num_labels": 8, "default_num_labels": 8, "num_layers": 2, "num_heads": 4,
                    "image_size": 32}


@pytest.mark.parametrize("k", [3, 8])
def test_raw_body_matches_tagger_predict(server, serve_images, expected, k):
    for i in range(3):
        res = post_image(server, serve_images[i], num_labels=k)
        assert res.status_code == 200, res.text
        assert_same_labels(res.json(), expected(i, k))


def test_multipart_form_matches_tagger_predict(server, serve_images, expected):
    files = {"image": ("x.png", serve_images[1].read_bytes(), "image/png")}
    res = httpx.post(f"{server}/v1/tag", files=files, data={"num_labels": "3"})
    assert res.status_code == 200, res.text
    assert_same_labels(res.json(), expected(1, 3))


def test_default_num_labels_is_ten_or_the_servers_cap(server, serve_images, expected):
    res = post_image(server, serve_images[2])  # 10 is above this server's cap of 8
    assert res.status_code == 200, res.text
    assert_same_labels(res.json(), expected(2, 8))


def test_min_prob_drops_labels_below_it(server, serve_images, expected):
    want = expected(0, 8)
    threshold = (want[0][1] + want[1][1]) / 2  # between the best and the second label
    res = post_image(server, serve_images[0], num_labels=8, min_prob=threshold)
    assert res.status_code == 200
    assert_same_labels(res.json(), want, min_prob=threshold)
    assert len(res.json()["labels"]) == 1


def test_vocab_answers_equal_constrained_tagger_predict(servers, serve_images, reference):
    url = servers["slow"]  # the server with --vocab=words:FILE
    want = reference.predict(serve_images[:2], num_labels=3, vocab=list(VOCAB))
    answers = [post_image(url, serve_images[i], num_labels=3, vocab="words") for i in range(2)]  # one at a time: --max_queue=1
    for res, w in zip(answers, want):
        assert res.status_code == 200, res.text
        assert res.json()["labels"] and all(x["label"] in VOCAB for x in res.json()["labels"])
        assert_same_labels(res.json(), w)


def test_attention_grid(server, serve_images, reference):
    res = post_image(server, serve_images[0], endpoint="/v1/attention", layer=1, head=3)
    assert res.status_code == 200, res.text
    body = res.json()
    assert (body["num_layers"], body["num_heads"], body["layer"], body["head"]) == (2, 4, 1, 3)
    maps = reference.attention_maps(serve_images[0])  # [L, H, N, N]
    want = maps[1, 3].mean(axis=0).reshape(4, 4)
    np.testing.assert_allclose(body["grid"], want, rtol=1e-4, atol=1e-7)


def _bad_requests(serve_images):
    image = serve_images[0].read_bytes()
    raw = {"Content-Type": "image/png"}
    yield "body above max_body_mb", dict(content=b"\x89PNG" + bytes(1_200_000), headers=raw), 413, "body"
    yield "chunked body above max_body_mb", dict(content=iter([bytes(400_000)] * 3), headers=raw), 413, "body"
    yield "pixel count above max_pixels", dict(content=png(np.zeros((1000, 1100, 3), np.uint8)), headers=raw), 413, "pixels"
    yield "header of a decompression bomb", dict(content=png_header(100_000, 100_000), headers=raw), 413, "bomb"
    yield "empty body", dict(content=b"", headers=raw), 400, "empty"
    yield "truncated png", dict(content=image[: len(image) // 2], headers=raw), 400, "decode"
    yield "text bytes", dict(content=b"this is not an image", headers=raw), 400, "image"
    yield "text content type", dict(content=image, headers={"Content-Type": "text/plain"}), 415, "Content-Type"
    yield "no content type", dict(content=image, headers={"Content-Type": ""}), 415, "Content-Type"
    yield "multipart without image", dict(files={"picture": ("x.png", image, "image/png")}), 400, "'image'"
    for value in ("0", "-2", "9", "ten"):
        yield f"num_labels={value}", dict(content=image, headers=raw, params={"num_labels": value}), 400, "num_labels"
    for value in ("-0.1", "1.5", "nan", "high"):
        yield f"min_prob={value}", dict(content=image, headers=raw, params={"min_prob": value}), 400, "min_prob"
    yield "unknown vocab", dict(content=image, headers=raw, params={"vocab": "birds"}), 400, "birds"


def test_every_bad_input_gets_a_json_error_and_the_next_good_request_is_answered(server, serve_images, expected):
    check_good(server, serve_images, expected)
    for name, kwargs, status, words in _bad_requests(serve_images):
        res = httpx.post(f"{server}/v1/tag", timeout=60, **kwargs)
        assert res.status_code == status, f"{name}: {res.status_code} {res.text}"
        assert list(res.json()) == ["error"] and words in res.json()["error"], f"{name}: {res.text}"
        check_good(server, serve_images, expected, i=len(name) % 3)


def test_bad_attention_params_and_unknown_routes(server, serve_images, expected):
    for params in ({"layer": 2}, {"head": 4}, {"head": "x"}):
        res = post_image(server, serve_images[0], endpoint="/v1/attention", **params)
        assert res.status_code == 400 and ("layer" in res.json()["error"] or "head" in res.json()["error"])
    res = httpx.get(f"{server}/v1/tag")
    assert res.status_code == 405 and "error" in res.json()
    res = httpx.get(f"{server}/v2/tag")
    assert res.status_code == 404 and "/v2/tag" in res.json()["error"]
    check_good(server, serve_images, expected)


def test_32_concurrent_clients_are_batched_without_changing_answers(server, serve_images, expected):
    compiled = metric(server, "nxtp_jit_compilations_total")
    batches, images = metric(server, "nxtp_batch_size_count"), metric(server, "nxtp_batch_size_sum")
    jobs = [(i % len(serve_images), (3, 8)[i % 2]) for i in range(32)]

    def call(job):
        i, k = job
        return post_image(server, serve_images[i], num_labels=k)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, jobs))
    for (i, k), res in zip(jobs, answers):
        assert res.status_code == 200, res.text
        assert_same_labels(res.json(), expected(i, k))
    new_batches = metric(server, "nxtp_batch_size_count") - batches
    assert metric(server, "nxtp_batch_size_sum") - images == 32
    # Batches of at most --max_batch=4 (the exact batches are tests/serve/test_batcher.py's):
    # at least 8 device calls, and fewer than 32, so some requests shared one.
    assert metric(server, 'nxtp_batch_size_bucket{le="4.0"}') - batches == new_batches
    assert 8 <= new_batches < 32
    assert metric(server, "nxtp_jit_compilations_total") == compiled  # nothing compiled while serving
    assert metric(server, 'nxtp_requests_total{endpoint="tag",status="200"}') >= 32


def test_full_queue_answers_503_with_retry_after(servers, serve_images, expected):
    url = servers["slow"]  # a batch waits 1.5 s for company; at most 1 image waits
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: post_image(url, serve_images[i], num_labels=3), range(4)))
    assert sorted(r.status_code for r in answers) == [200, 503, 503, 503]
    for i, res in enumerate(answers):
        if res.status_code == 503:
            assert res.headers["Retry-After"] == "1" and "the queue is full" in res.json()["error"]
        else:
            assert_same_labels(res.json(), expected(i, 3))
    check_good(url, serve_images, expected)


def test_a_stalled_upload_times_out_with_504(servers, serve_images, expected):
    url = servers["slow"]  # --timeout_s=4
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/tag HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n\x89PNG")
        reply = b""
        while b"}" not in reply:
            chunk = s.recv(4096)
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504")
    assert "timed out" in json.loads(body)["error"]
    check_good(url, serve_images, expected)


def test_attention_waits_in_the_same_queue_as_tag(servers, serve_images, expected):
    url = servers["slow"]  # at most 1 image waits; a batch waits 1.5 s for company
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_image, url, serve_images[0], num_labels=3)
        time.sleep(0.5)  # the tag image is waiting
        second = pool.submit(post_image, url, serve_images[1], endpoint="/v1/attention")
        first, second = first.result(), second.result()
    assert first.status_code == 200, first.text
    assert second.status_code == 503 and "the queue is full" in second.json()["error"]
    check_good(url, serve_images, expected)


@pytest.mark.parametrize("query, form, name", [
    ("num_labels=3&num_labels=5", {}, "'num_labels' is given more than once"),
    ("vocab=a&vocab=b", {}, "'vocab' is given more than once"),
    ("min_prob=0.1&min_prob=0.1", {}, "'min_prob' is given more than once"),
    ("num_labels=3", {"num_labels": "3"}, "'num_labels' is given in the query and in the form"),
])
def test_a_repeated_parameter_is_refused(server, serve_images, query, form, name):
    image = serve_images[0].read_bytes()
    if form:
        res = httpx.post(f"{server}/v1/tag?{query}", files={"image": ("x.png", image, "image/png")}, data=form)
    else:
        res = httpx.post(f"{server}/v1/tag?{query}", content=image, headers={"Content-Type": "image/png"})
    assert res.status_code == 400 and name in res.json()["error"], res.text


def test_several_images_in_one_request_are_answered_in_order(server, serve_images, expected):
    order = [2, 0, 1]
    files = [("image", (f"{i}.png", serve_images[i].read_bytes(), "image/png")) for i in order]
    res = httpx.post(f"{server}/v1/tag", files=files, data={"num_labels": "3"}, timeout=60)
    assert res.status_code == 200, res.text
    assert list(res.json()) == ["results"] and len(res.json()["results"]) == 3
    for i, answer in zip(order, res.json()["results"]):
        assert_same_labels(answer, expected(i, 3))


def test_limits_per_image_and_per_request_with_several_images(server, serve_images):
    good = serve_images[0].read_bytes()
    big = png(np.zeros((1000, 1100, 3), np.uint8))  # above --max_pixels=1000000
    cases = [
        ([good] * 4, 400, "at most 3 image(s) per request"),  # --max_images=3
        ([good, b"not an image", good], 400, "image 2 of 3: image does not decode"),
        ([good, good, big], 413, "image 3 of 3: image too large"),
        ([good, bytes(600_000), bytes(600_000)], 413, "above the limit of 1048576 bytes"),  # --max_body_mb=1 in all
    ]
    for images, status, words in cases:
        files = [("image", (f"{n}.png", data, "image/png")) for n, data in enumerate(images)]
        res = httpx.post(f"{server}/v1/tag", files=files, timeout=60)
        assert res.status_code == status and words in res.json()["error"], res.text
    res = httpx.post(f"{server}/v1/attention", files=[("image", ("a.png", good, "image/png"))] * 2)
    assert res.status_code == 400 and "at most 1 image(s)" in res.json()["error"]


def test_openapi_description_is_valid_and_lists_every_route(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    openapi_spec_validator.validate(spec)  # raises on an invalid OpenAPI 3.1 document
    assert spec["openapi"] == "3.1.0"
    routes = {("/v1/tag", "post"), ("/v1/attention", "post"), ("/v1/info", "get"), ("/healthz", "get"),
              ("/readyz", "get"), ("/metrics", "get"), ("/openapi.json", "get"), ("/", "get"), ("/static/page.js", "get"),
              ("/static/page.css", "get")}
    assert {(path, method) for path, ops in spec["paths"].items() for method in ops} == routes
    for path, method in routes:  # each one answers as described
        res = httpx.request(method.upper(), f"{server}{path}")
        assert str(res.status_code) in spec["paths"][path][method]["responses"], (path, res.status_code)
    tag = spec["paths"]["/v1/tag"]["post"]
    params = {p["name"]: p for p in tag["parameters"]}
    assert set(params) == {"num_labels", "min_prob", "vocab"} and all(p["in"] == "query" for p in params.values())
    assert params["num_labels"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 8, "default": 8}
    assert set(tag["requestBody"]["content"]) == {"image/*", "multipart/form-data"}
    assert {"400", "413", "415", "503", "504"} <= set(tag["responses"])
    assert spec["paths"]["/v1/attention"]["post"]["parameters"][0]["schema"]["maximum"] == 1  # 2 layers
