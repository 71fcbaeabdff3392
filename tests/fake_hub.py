"""A loopback stand-in for the Hugging Face Hub API, enough for ``huggingface_hub`` 2.4 to create a repo, a branch
and one commit (regular files inline, binary files through the LFS batch API + PUT), recording what arrives.

It answers what ``HfApi.create_repo``, ``create_branch`` and ``create_commit`` send: ``/api/repos/create``,
``/api/models/<repo>/branch/<name>``, ``/api/validate-yaml``, ``/api/models/<repo>/preupload/<rev>``,
``/<repo>.git/info/lfs/objects/batch`` (+ the PUT and verify it hands out) and ``/api/models/<repo>/commit/<rev>``.
Any other request is answered 404 and kept in ``unexpected``. Xet is not spoken: clients must set
``HF_HUB_DISABLE_XET=1`` so LFS files go through the legacy LFS path.

Example:
    >>> with FakeHub(token="hf_test") as hub:  # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# What the Hub's default .gitattributes stores with LFS (the real Hub also sends files > 10 MB there).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx_data", ".tflite", ".gguf", ".model")
LFS_SIZE = 10 * 1024 * 1024
RELATIONS = ("adapter", "merge", "quantized", "finetune")


class FakeHub:
    """Threaded HTTP server on 127.0.0.1 holding repos, branches, LFS objects and the commits it received."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------------------------------------ routes
    def handle(self, method: str, path: str, query: dict[str, list[str]], headers, body: bytes) -> tuple[int, Any]:
        with self.lock:
            self.requests.append((method, path))
        if path == "/api/agent-harnesses":  # huggingface_hub's best-effort agent registry fetch; not part of a push
            return 404, {"error": "not served here"}
        if method == "PUT" and path.startswith("/lfs-upload/"):
            return self._lfs_put(path.rsplit("/", 1)[1], body)  # a pre-signed storage URL: no Hub token
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        content_type = headers.get("content-type") or ""
        payload = json.loads(body) if body and "json" in content_type and "ndjson" not in content_type else None
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(payload)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(payload)
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path):
            return self._create_branch(match.group(1), unquote(match.group(2)))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            return self._preupload(match.group(1), unquote(match.group(2)), payload)
        if match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(match.group(1), payload)
        if re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/verify", path):
            return (200, {}) if payload["oid"] in self.lfs_objects else (404, {"error": "object not uploaded"})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            create_pr = query.get("create_pr") == ["1"]
            return self._commit(match.group(1), unquote(match.group(2)), body, create_pr)
        with self.lock:
            self.unexpected.append((method, path))
        return 404, {"error": f"no route {method} {path}"}

    def _create_repo(self, payload: dict) -> tuple[int, Any]:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            # The Hub starts every repo with an initial commit holding .gitattributes.
            self.repos[repo_id] = {"private": payload.get("visibility") == "private",
                                   "branches": {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _create_branch(self, repo_id: str, branch: str) -> tuple[int, Any]:
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}
            if branch in repo["branches"]:
                return 409, {"error": "Reference already exists"}
            repo["branches"][branch] = dict(repo["branches"]["main"])
        return 200, {}

    @staticmethod
    def _validate_yaml(payload: dict) -> tuple[int, Any]:
        match = re.match(r"^---\n(.*?)\n---", payload["content"], re.DOTALL)
        metadata = yaml.safe_load(match.group(1)) if match else {}
        errors = []
        relation = (metadata or {}).get("base_model_relation")
        if relation is not None and relation not in RELATIONS:
            errors.append({"message": f'"base_model_relation" must be one of {list(RELATIONS)}'})
        if relation is not None and not (metadata or {}).get("base_model"):
            errors.append({"message": '"base_model_relation" needs "base_model"'})
        return (400 if errors else 200), {"errors": errors, "warnings": []}

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [
            {"path": f["path"], "shouldIgnore": False, "oid": None,
             "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] > LFS_SIZE else "regular"}
            for f in payload["files"]
        ]
        return 200, {"files": files, "commitOid": "0" * 40}

    def _lfs_batch(self, repo_id: str, payload: dict) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return 404, {"message": "Repository not found"}
        objects = [
            {"oid": o["oid"], "size": o["size"], "authenticated": True,
             "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"},
                         "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"}}}
            for o in payload["objects"]
        ]
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_put(self, oid: str, body: bytes) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 of the body does not match the oid"}
        with self.lock:
            self.lfs_objects[oid] = body
        return 200, {}

    def _commit(self, repo_id: str, revision: str, body: bytes, create_pr: bool) -> tuple[int, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files: dict[str, bytes] = {}
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}
            if revision not in repo["branches"]:
                return 404, {"error": f"Invalid rev id: {revision}"}
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.lfs_objects:
                        return 400, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}
                    files[value["path"]] = self.lfs_objects[value["oid"]]
                elif line["key"] != "header":
                    return 400, {"error": f"unsupported operation {line['key']}"}
            oid = hashlib.sha1(body).hexdigest()
            pr_number = sum(c["create_pr"] for c in self.commits) + 1 if create_pr else None
            self.commits.append({"repo_id": repo_id, "revision": revision, "summary": header["summary"],
                                 "description": header.get("description", ""), "files": files, "oid": oid,
                                 "create_pr": create_pr})
            if not create_pr:
                repo["branches"][revision].update(files)
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": f"{self.url}/{repo_id}/discussions/{pr_number}" if create_pr else None}


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            chunk = handler.rfile.read(size)
            handler.rfile.readline()  # the CRLF after each chunk
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk)
    return handler.rfile.read(int(handler.headers.get("content-length") or 0))


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            body = _read_body(self)
            try:
                status, payload = hub.handle(self.command, url.path, parse_qs(url.query), self.headers, body)
            except Exception as exc:  # noqa: BLE001 - surface fake-server bugs as a readable HTTP error in the test
                status, payload = 500, {"error": f"fake hub failed: {exc!r}"}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args) -> None:  # keep test output clean
            pass

    return Handler
