"""A small fake Hugging Face Hub for the tests: model repos held in memory, served over HTTP on localhost
with the endpoints huggingface_hub 2.4 calls for snapshot_download (repo info, tree listing, file
resolve with its headers and Range requests), create_repo, create_branch, list_repo_files and
upload_folder (preupload, LFS batch and upload, NDJSON commit; no Xet, which the tests turn off). Every
request is logged. Point huggingface_hub at `FakeHub.url` through HF_ENDPOINT (or its constants)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")  # stored in LFS, as the Hub's .gitattributes has it


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def oid(path: str, data: bytes) -> str:
    """What the Hub calls a file's id: its sha256 in LFS, its git blob sha1 otherwise."""
    return hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_oid(data)


@dataclass
class Repo:
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        sha = hashlib.sha1(f"{branch} {len(self.commits)} {sorted(files)}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        return revision if revision in self.commits else self.refs.get(revision)


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query
    headers: Message  # (its get() ignores case)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lfs: dict[str, bytes] = {}  # sha256 -> uploaded bytes
        self.cut_once: set[str] = set()  # file paths whose first download breaks off half way
        self.user, self.orgs, self.token_role = "me", ["org"], "write"  # whom the token belongs to

    def add(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Commit `files` (the whole tree) to `branch` of `repo_id`; returns the commit hash."""
        return self.repos.setdefault(repo_id, Repo()).commit(files, branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def downloaded(self) -> list[str]:
        """The repo file paths fetched with GET (the file bodies transferred), in order."""
        return [m.group(1) for r in self.requests if r.method == "GET"
                and (m := re.match(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", r.path))]

    def __enter__(self) -> FakeHub:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [  # method(s), path pattern, FakeHub handler method
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", "model_info"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)", "tree"),
    ("HEAD GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>.+)", "create_branch"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs/(?P<sha>[0-9a-f]{64})", "lfs_upload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
]
_WRITES = {"create_repo", "create_branch", "preupload", "lfs_batch", "commit"}  # (an LFS upload URL is its own key)


class _Error(Exception):
    def __init__(self, status: int, code: str | None = None):
        self.status, self.code = status, code


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._dispatch()

        do_GET = do_POST = do_PUT = do_HEAD

        def _dispatch(self) -> None:
            raw = urlsplit(self.path).path
            hub.requests.append(Request(self.command, unquote(raw), self.headers))
            try:
                for methods, pattern, name in _ROUTES:
                    m = re.fullmatch(pattern, raw)
                    if m and self.command in methods.split():
                        if name in _WRITES and not self.headers.get("authorization", "").startswith("Bearer "):
                            raise _Error(401)
                        args = {k: unquote(v) for k, v in m.groupdict().items()}
                        return getattr(self, name)(**args)
                raise _Error(404)
            except _Error as e:
                self.send_response(e.status)
                if e.code:
                    self.send_header("X-Error-Code", e.code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        # --- helpers
        def _repo(self, repo_id: str) -> Repo:
            if repo_id not in hub.repos:
                raise _Error(404, "RepoNotFound")
            return hub.repos[repo_id]

        def _commit(self, repo: Repo, revision: str) -> str:
            commit = repo.resolve(revision)
            if commit is None:
                raise _Error(404, "RevisionNotFound")
            return commit

        def _json(self, value, status: int = 200) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return out
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        # --- downloads
        def model_info(self, repo: str, rev: str) -> None:
            target = self._repo(repo)
            commit = self._commit(target, rev)
            files = target.commits[commit]
            self._json({"id": repo, "sha": commit, "private": target.private,
                        "siblings": [{"rfilename": p} for p in sorted(files)]})

        def tree(self, repo: str, rev: str) -> None:
            target = self._repo(repo)
            files = target.commits[self._commit(target, rev)]
            entries = []
            for path, data in sorted(files.items()):
                entry = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
                if path.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def resolve(self, repo: str, rev: str, path: str) -> None:
            target = self._repo(repo)
            commit = self._commit(target, rev)
            data = target.commits[commit].get(path)
            if data is None:
                raise _Error(404, "EntryNotFound")
            start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{oid(path, data)}"')
            if path.endswith(LFS_SUFFIXES):
                self.send_header("X-Linked-Etag", f'"{oid(path, data)}"')
                self.send_header("X-Linked-Size", str(len(data)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if self.command == "HEAD":
                return
            if path in hub.cut_once and not start:  # the connection breaks half way through the body
                hub.cut_once.discard(path)
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
            self.wfile.write(data[start:])

        # --- uploads
        def whoami(self) -> None:
            if not self.headers.get("authorization", "").startswith("Bearer "):
                raise _Error(401)
            self._json({"type": "user", "name": hub.user, "orgs": [{"name": org} for org in hub.orgs],
                        "auth": {"accessToken": {"role": hub.token_role}}})

        def create_repo(self) -> None:
            payload = json.loads(self._body())
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                raise _Error(409)
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            self._json({"url": f"{hub.url}/{repo_id}"})

        def create_branch(self, repo: str, branch: str) -> None:
            target = self._repo(repo)
            if branch in target.refs:
                raise _Error(409)
            if "main" in target.refs:
                target.refs[branch] = target.refs["main"]
            else:  # an empty repo: the branch starts empty
                target.commit({}, branch)
            self._json({})

        def preupload(self, repo: str, rev: str) -> None:
            target = self._repo(repo)
            present = target.commits.get(target.resolve(rev), {})
            files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                      "shouldIgnore": False,
                      "oid": oid(f["path"], present[f["path"]]) if f["path"] in present else None}
                     for f in json.loads(self._body())["files"]]
            self._json({"files": files})

        def lfs_batch(self, repo: str) -> None:
            self._repo(repo)
            objects = [{"oid": o["oid"], "size": o["size"]} for o in json.loads(self._body())["objects"]]
            for o in objects:
                if o["oid"] not in hub.lfs:  # (no actions: the Hub has these bytes already)
                    o["actions"] = {"upload": {"href": f"{hub.url}/lfs/{o['oid']}"}}
            self._json({"transfer": "basic", "objects": objects})

        def lfs_upload(self, sha: str) -> None:
            data = self._body()
            if hashlib.sha256(data).hexdigest() != sha:
                raise _Error(400)
            hub.lfs[sha] = data
            self._json({})

        def commit(self, repo: str, rev: str) -> None:
            target = self._repo(repo)
            files = dict(target.commits.get(target.resolve(rev), {}))
            for line in self._body().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        raise _Error(422)
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
            sha = target.commit(files, rev)
            self._json({"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def validate_yaml(self) -> None:
            self._body()
            self._json({"errors": [], "warnings": []})

    return Handler
