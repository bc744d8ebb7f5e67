"""A local stand-in for the Hugging Face Hub and a plain file host, on 127.0.0.1.

It answers as huggingface_hub expects (`HF_ENDPOINT=http://127.0.0.1:PORT`):
`HEAD`/`GET /{owner}/{name}/resolve/{revision}/{file}` with `X-Repo-Commit`, `ETag` (an LFS
file's sha256, else the git blob sha1; `X-Linked-Etag` and `X-Linked-Size` for LFS files),
`Content-Length` and `Range`; a gated repo answers 401 with `X-Error-Code: GatedRepo`; any
`/api/...` probe gets 404. Other paths are plain files (OpenAI's CLIP host). Every request
is logged, and a file can be cut once mid-body, as a dropped connection would.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import threading

COMMIT = hashlib.sha1(b"fake hub commit").hexdigest()
LFS_SUFFIXES = (".pth", ".pt", ".model", ".bin", ".safetensors")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], bytes] = {}  # (owner/name, file) -> bytes
        self.plain: dict[str, bytes] = {}  # URL path -> bytes
        self.gated: set[str] = set()
        self.cut_once: set[str] = set()  # request paths whose next full GET stops halfway
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[str]:
        """Paths of the GETs of files (not HEADs, not probes)."""
        return [p for m, p, _ in self.log if m == "GET" and not p.startswith("/api/")]

    def _answer(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        self.log.append((h.command, path, h.headers.get("Range")))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        headers: dict[str, str] = {}
        if path.startswith("/api/"):
            return self._status(h, 404, {"X-Error-Code": "EntryNotFound"})
        if m:
            repo, revision, file = m.groups()
            if repo in self.gated:
                return self._status(h, 401, {"X-Error-Code": "GatedRepo",
                                             "X-Error-Message": f"Access to model {repo} is restricted."})
            if revision not in ("main", COMMIT):
                return self._status(h, 404, {"X-Error-Code": "RevisionNotFound"})
            if (repo, file) not in self.repos:
                return self._status(h, 404, {"X-Error-Code": "EntryNotFound"})
            data = self.repos[repo, file]
            headers["X-Repo-Commit"] = COMMIT
            if file.endswith(LFS_SUFFIXES):
                etag = hashlib.sha256(data).hexdigest()
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            else:
                etag = git_blob_sha1(data)
            headers["ETag"] = f'"{etag}"'
        elif path in self.plain:
            data = self.plain[path]
        else:
            return self._status(h, 404, {})
        start = 0
        if (r := h.headers.get("Range")) and (rm := re.fullmatch(r"bytes=(\d+)-", r)):
            start = int(rm.group(1))
        h.send_response(206 if start else 200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if not body:
            return
        if not start and path in self.cut_once:
            self.cut_once.discard(path)
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data[start:])

    @staticmethod
    def _status(h: http.server.BaseHTTPRequestHandler, code: int, headers: dict[str, str]) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()
