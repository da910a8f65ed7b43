"""A loopback fake of the Hugging Face Hub HTTP API, enough for ``huggingface_hub`` downloads and uploads.

It serves model repos from local folders (or from files pushed to it) on 127.0.0.1 through the
endpoints ``HfApi(endpoint=hub.url)`` uses: repo info, tree, paths-info, HEAD/GET ``resolve`` with
``Range``, repo creation, preupload and NDJSON commits. Errors carry ``X-Error-Code`` so the client
raises its usual exceptions. Repo ids must be ``org/name``; revisions are ``main`` or a commit sha.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass(frozen=True)
class FakeFile:
    """One file of a commit: its bytes (or the local file holding them) and Hub metadata."""

    source: Path | bytes
    size: int
    sha256: str
    git_oid: str
    lfs: bool  # weights are LFS files on the Hub: their ETag and metadata carry the sha256

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    def read(self, start: int = 0, stop: int | None = None) -> bytes:
        stop = self.size if stop is None else stop
        if isinstance(self.source, bytes):
            return self.source[start:stop]
        # Read the file as it is now: tests may alter it after its metadata was computed.
        with open(self.source, "rb") as f:
            f.seek(start)
            return f.read(stop - start)


def _fake_file(path: str, source: Path | bytes) -> FakeFile:
    data = source.read_bytes() if isinstance(source, Path) else source
    git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return FakeFile(source, len(data), hashlib.sha256(data).hexdigest(), git_oid, path.endswith(_LFS_SUFFIXES))


def _commit_sha(files: dict[str, FakeFile], parent: str | None) -> str:
    digest = hashlib.sha1((parent or "").encode())
    for path in sorted(files):
        digest.update(f"{path}\0{files[path].sha256}\n".encode())
    return digest.hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    gated: bool = False
    commits: dict[str, dict[str, FakeFile]] = field(default_factory=dict)
    main: str = ""

    def commit(self, files: dict[str, FakeFile]) -> str:
        sha = _commit_sha(files, self.main or None)
        self.commits[sha] = files
        self.main = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        return self.main if revision == "main" else (revision if revision in self.commits else None)


@dataclass(frozen=True)
class FakeRequest:
    """One request as the fake Hub saw it; ``time`` is ``time.monotonic()`` on arrival."""

    method: str
    path: str
    range: str | None
    time: float
    authorized: bool


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 acting as the Hub; use ``HfApi(endpoint=hub.url)``.

    Knobs: ``truncate_once`` (file names whose first un-ranged GET sends half the body and drops the
    connection), ``stall`` (file name -> how many un-ranged GETs of it send half the body and then hang
    until the hub closes), ``gated=True`` in :meth:`add_repo` (401 ``GatedRepo`` without an ``Authorization``
    header), ``bandwidth`` (bytes per second shared by all file bodies, like one network link; None:
    unthrottled). ``requests`` logs every request in arrival order.
    """

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[FakeRequest] = []
        self.truncate_once: set[str] = set()
        self.bandwidth: float | None = None
        self._link_free = 0.0  # when the throttled link has sent everything queued so far
        self.stall: dict[str, int] = {}
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="fake-hub", daemon=True)
        self._thread.start()

    def add_repo(self, repo_id: str, folder: Path, *, gated: bool = False) -> str:
        """Serve the files of ``folder`` as a new commit on ``main`` of ``repo_id``; returns the commit sha.

        Files are read from disk on every request, so changing one afterwards makes the served bytes
        disagree with the advertised sha256 (a corrupted upload, as far as clients can tell), in every
        commit made from that folder. Give each new commit its own folder.
        """
        folder = Path(folder)
        files = {
            p.relative_to(folder).as_posix(): _fake_file(p.relative_to(folder).as_posix(), p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        }
        with self._lock:
            repo = self.repos.setdefault(repo_id, FakeRepo(repo_id))
            repo.gated = gated
            return repo.commit(files)

    def send_body(self, wfile, data: bytes) -> None:
        """Write a file body, paced to ``bandwidth`` when that is set."""
        if not self.bandwidth:
            wfile.write(data)
            return
        step = 256 * 1024
        for i in range(0, len(data), step):
            chunk = data[i:i + step]
            with self._lock:
                self._link_free = max(self._link_free, time.monotonic()) + len(chunk) / self.bandwidth
                due = self._link_free
            time.sleep(max(0.0, due - time.monotonic()))
            wfile.write(chunk)

    def add_dataset(self, repo_id: str, folder: Path) -> str:
        """Serve the files of ``folder`` as a dataset repo (``repo_type="dataset"``); returns the commit sha."""
        return self.add_repo(_DATASETS + repo_id, folder)

    def uploaded(self, repo_id: str) -> dict[str, bytes]:
        """The files on ``main`` of ``repo_id`` (for example after ``upload_folder``), as bytes."""
        repo = self.repos[repo_id]
        return {path: f.read() for path, f in repo.commits[repo.main].items()}

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


_DATASETS = "datasets/"  # dataset repos are kept under this key prefix


def _dataset(route):
    """The same route for a dataset repo."""
    return lambda m, body: route({**m, "repo": _DATASETS + m["repo"]}, body)


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        self.status, self.code, self.message = status, code, message


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub
    hub: FakeHub

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    # -- plumbing ------------------------------------------------------------------------------

    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        path = url.path
        with self.hub._lock:
            self.hub.requests.append(FakeRequest(self.command, path, self.headers.get("Range"), time.monotonic(),
                                                 "Authorization" in self.headers))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else b""
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda m, b: self._json({"errors": [], "warnings": []})),
            ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", self._model_info),
            ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("POST", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", rf"/api/datasets/{_REPO}(?:/revision/(?P<rev>[^/]+))?", _dataset(self._model_info)),
            ("HEAD", rf"/datasets/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", _dataset(self._resolve)),
            ("GET", rf"/datasets/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", _dataset(self._resolve)),
        ]
        try:
            for method, pattern, route in routes:
                match = re.fullmatch(pattern, path)
                if match and method == self.command:
                    groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return route(groups, body)
            raise _Error(404, None, f"no route for {self.command} {path}")
        except _Error as err:
            self._send(err.status, json.dumps({"error": err.message}).encode(), "application/json",
                       {"X-Error-Code": err.code, "X-Error-Message": err.message} if err.code else {})

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, doc) -> None:
        self._send(200, json.dumps(doc).encode(), "application/json")

    def _repo(self, repo_id: str, revision: str = "main") -> tuple[FakeRepo, str]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _Error(404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.gated and "Authorization" not in self.headers:
            raise _Error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated")
        sha = repo.resolve(revision)
        if sha is None:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, sha

    # -- read side -----------------------------------------------------------------------------

    @staticmethod
    def _entry(path: str, f: FakeFile) -> dict:
        entry = {"type": "file", "path": path, "size": f.size, "oid": f.git_oid}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        return entry

    def _model_info(self, m: dict, body: bytes) -> None:
        repo, sha = self._repo(m["repo"], m.get("rev", "main"))
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, f in sorted(repo.commits[sha].items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sibling)
        self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": False,
                    "gated": "auto" if repo.gated else False, "disabled": False, "siblings": siblings})

    def _tree(self, m: dict, body: bytes) -> None:
        repo, sha = self._repo(m["repo"], m["rev"])
        prefix = m.get("sub", "").strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path, f in sorted(repo.commits[sha].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    oid = hashlib.sha1(folder.encode()).hexdigest()
                    entries.append({"type": "directory", "path": folder, "oid": oid})
            if recursive or len(parts) == 1:
                entries.append(self._entry(path, f))
        if prefix and not entries:
            raise _Error(404, "EntryNotFound", f"{prefix} does not exist on {m['rev']}")
        self._json(entries)

    def _paths_info(self, m: dict, body: bytes) -> None:
        repo, sha = self._repo(m["repo"], m["rev"])
        form = parse_qs(body.decode())
        paths = form.get("paths", []) or json.loads(body or b"{}").get("paths", [])
        files = repo.commits[sha]
        self._json([self._entry(p, files[p]) for p in paths if p in files])

    def _resolve(self, m: dict, body: bytes) -> None:
        repo, sha = self._repo(m["repo"], m["rev"])
        f = repo.commits[sha].get(m["file"])
        if f is None:
            raise _Error(404, "EntryNotFound", f"{m['file']} does not exist on {m['rev']}")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        start, stop, status = 0, f.size, 200
        if (spec := self.headers.get("Range")) is not None:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", spec.strip())
            if match is None or int(match[1]) >= f.size:
                raise _Error(416, None, f"bad range {spec!r} for a {f.size}-byte file")
            start, stop, status = int(match[1]), min(int(match[2] or f.size - 1) + 1, f.size), 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{f.size}"
        data = f.read(start, stop) if self.command == "GET" else b""
        if self.command == "GET" and spec is None and self.hub.stall.get(m["file"], 0) > 0:
            self.hub.stall[m["file"]] -= 1
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.hub._closing.wait(120)
            self.close_connection = True
            return
        if self.command == "GET" and spec is None and m["file"] in self.hub.truncate_once:
            self.hub.truncate_once.discard(m["file"])
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(f.size)}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) if self.command == "GET" else stop - start))
        self.end_headers()
        if self.command == "GET":
            self.hub.send_body(self.wfile, data)

    # -- write side ----------------------------------------------------------------------------

    def _create_repo(self, m: dict, body: bytes) -> None:
        doc = json.loads(body or b"{}")
        repo_id = f"{doc['organization']}/{doc['name']}" if doc.get("organization") else doc["name"]
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                self._send(409, json.dumps({"error": "You already created this model repo", "url": url}).encode(),
                           "application/json")
                return
            self.hub.repos[repo_id] = repo = FakeRepo(repo_id)
            repo.commit({})
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, m: dict, body: bytes) -> None:
        self._repo(m["repo"], m["rev"])
        files = json.loads(body or b"{}").get("files", [])
        # "regular" makes the client send contents inline in the commit: no LFS or xet upload.
        self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                              for f in files]})

    def _commit(self, m: dict, body: bytes) -> None:
        repo, sha = self._repo(m["repo"], m["rev"])
        files = dict(repo.commits[sha])
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = _fake_file(value["path"], base64.b64decode(value["content"]))
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key in ("lfsFile", "copyFile"):
                raise _Error(400, None, f"the fake Hub does not support {key} operations")
        with self.hub._lock:
            new_sha = repo.commit(files)
        self._json({"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{new_sha}", "commitOid": new_sha,
                    "success": True, "pullRequestUrl": None})
