"""A Hugging Face Hub on 127.0.0.1 that serves repositories from local folders, so the real download
code (``huggingface_hub.snapshot_download``, as ``deltatune`` calls it) runs without the network.

It speaks the part of the Hub's HTTP API that ``snapshot_download`` uses, in the releases deltatune
supports (huggingface_hub 0.3x lists files from the repo info's ``siblings``; 1.x/2.x from the
``tree`` listing; both then ``HEAD`` and ``GET`` each file through ``resolve``):

    GET  /api/{models|datasets}/{org}/{name}[/revision/{rev}]     {"id", "sha", "siblings": [{"rfilename"}]}
    GET  /api/{models|datasets}/{org}/{name}/tree/{rev}[/{dir}]   [{"type": "file", "path", "size", "oid"}]
    HEAD /[datasets/]{org}/{name}/resolve/{rev}/{file}            X-Repo-Commit, ETag, Content-Length
    GET  (same)                                                   the bytes

Errors carry the ``X-Error-Code`` header (RepoNotFound / RevisionNotFound / EntryNotFound) from
which huggingface_hub builds its typed exceptions.  Every request is recorded in ``hub.requests``
(method, path) so a test can assert that an offline run made none.

    with FakeHub() as hub:
        hub.add("org/tiny", model_dir)                    # or repo_type="dataset"
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp / "hf")}
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# /api/models/org/name, .../revision/main, .../tree/main, .../tree/main/sub/dir
API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?$")
# /org/name/resolve/main/file, /datasets/org/name/resolve/<sha>/sub/file
RESOLVE = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class Repo:
    """One repository: its files (relative path -> bytes, read once) and a commit sha made from them."""

    def __init__(self, folder: Path):
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes()
                      for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        h = hashlib.sha1()
        for name, data in self.files.items():
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        self.sha = h.hexdigest()  # 40 hex digits, like a git commit

    def info(self, repo_id: str) -> dict:
        return {"id": repo_id, "modelId": repo_id, "sha": self.sha, "private": False, "disabled": False,
                "gated": False, "tags": [], "siblings": [{"rfilename": f} for f in self.files]}

    def tree(self, under: str) -> list[dict]:
        pre = under.strip("/") + "/" if under.strip("/") else ""
        return [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for f, d in self.files.items() if f.startswith(pre)]


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}  # (models|datasets, org/name) -> Repo
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

            def log_message(self, *a):  # no access log on the test's stderr
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, repo_id: str, folder: Path, repo_type: str = "model") -> Repo:
        repo = self.repos[(repo_type + "s", repo_id)] = Repo(folder)
        return repo

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ routing
    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path))
        if m := API.match(path):
            kind, repo_id, what, rev, under = m.groups()
            repo = self._repo(h, kind, repo_id, rev)
            if repo is not None:
                data = repo.tree(under or "") if what == "tree" else repo.info(repo_id)
                self._send(h, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
            return
        if m := RESOLVE.match(path):
            kind, repo_id, rev, name = m.groups()
            repo = self._repo(h, (kind or "models"), repo_id, rev)
            if repo is None:
                return
            if name not in repo.files:
                return self._error(h, 404, "EntryNotFound", f"{name} does not exist on {rev}", body)
            data = repo.files[name]
            etag = f'"{hashlib.sha256(data).hexdigest()}"'  # the blob's name in the local cache
            self._send(h, 200, data, {"X-Repo-Commit": repo.sha, "ETag": etag, "X-Linked-Etag": etag,
                                      "Content-Type": "application/octet-stream"}, body)
            return
        self._error(h, 404, "", f"no route {path}", body)

    def _repo(self, h, kind: str, repo_id: str, rev: str | None) -> Repo | None:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found", h.command == "GET")
        elif rev not in (None, "main", repo.sha):
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", h.command == "GET")
            return None
        return repo

    def _error(self, h, status: int, code: str, message: str, body: bool) -> None:
        headers = {"Content-Type": "application/json", **({"X-Error-Code": code} if code else {})}
        self._send(h, status, json.dumps({"error": message}).encode(), {**headers, "X-Error-Message": message}, body)

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)
