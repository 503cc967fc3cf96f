"""A tiny stand-in for the Hugging Face Hub file endpoints, on 127.0.0.1, for tests.

Serves HEAD/GET ``/{repo}/resolve/{revision}/{filename}`` (with ``Range: bytes=a-b``, as header
reads use) and the file list ``/api/models/{repo}/tree/{revision}`` from ``files`` =
{(repo, revision-or-sha, filename): bytes}; ``revisions`` maps branch names to commit shas.
Modes per filename via ``faults``: "truncate" (Content-Length larger than the body),
"hangup" (closes the connection mid-body), "stall" (half the body, then silence), "drip" (one
byte every ``drip_seconds``), a number (answer with that HTTP status); 401 for ``private`` repos.
``hang=True``: accept every connection and never answer.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse


class HubStub:
    def __init__(self, files, revisions, faults=None, private=(), hang=False, drip_seconds=4.0):
        self.files, self.revisions, self.faults, self.private = files, revisions, faults or {}, set(private)
        self.hang, self.drip_seconds = hang, drip_seconds
        self.requests: list[str] = []
        self.closing = threading.Event()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                stub._answer(self, body=False)

            def do_GET(self):
                stub._answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.timeout = 5
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def _error(self, h, status, code, body=True):
        payload = b'{"error": "x"}'
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    def _answer(self, h, body: bool):
        self.requests.append(f"{h.command} {h.path}")
        if self.hang:
            self.closing.wait(120)
            h.close_connection = True
            return
        parts = urllib.parse.unquote(h.path.split("?")[0]).lstrip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            return self._tree(h, "/".join(parts[2:4]), parts[5])
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "RepoNotFound")
        repo, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo in self.private:
            return self._error(h, 401, "RepoNotFound")
        if not any(k[0] == repo for k in self.files):
            return self._error(h, 404, "RepoNotFound")
        sha = self.revisions.get((repo, rev), rev)
        if not any(k[0] == repo and k[1] == sha for k in self.files):
            return self._error(h, 404, "RevisionNotFound")
        data = self.files.get((repo, sha, filename))
        if data is None:
            return self._error(h, 404, "EntryNotFound")
        fault = self.faults.get(filename)
        if isinstance(fault, int):
            return self._error(h, fault, "ServerError")
        rng = h.headers.get("Range")
        if rng:  # header reads: faults only hit whole-file downloads
            a, b = rng.split("=")[1].split("-")
            data, fault = data[int(a): int(b) + 1], None
            self.requests[-1] += f" {rng}"
        h.send_response(206 if rng else 200)
        h.send_header("X-Repo-Commit", sha)
        h.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        h.send_header("Content-Length", str(len(data) + (1000 if fault == "truncate" else 0)))
        h.send_header("Content-Type", "application/octet-stream")
        if fault in ("truncate", "hangup", "stall", "drip"):
            h.send_header("Connection", "close")
        h.end_headers()
        if not body:
            return
        if fault in ("stall", "drip"):
            h.close_connection = True
            step = len(data) // 2 if fault == "stall" else 1
            for i in range(0, len(data), step):
                try:
                    h.wfile.write(data[i: i + step])
                    h.wfile.flush()
                except OSError:
                    return
                if self.closing.wait(self.drip_seconds if fault == "drip" else 120):
                    return
            return
        if fault == "hangup":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data)
        if fault == "truncate":
            h.close_connection = True

    def _tree(self, h, repo, rev):
        sha = self.revisions.get((repo, rev), rev)
        if repo in self.private or not any(k[0] == repo for k in self.files):
            return self._error(h, 401 if repo in self.private else 404, "RepoNotFound")
        entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                   for (r, s, name), data in sorted(self.files.items()) if r == repo and s == sha]
        if not entries:
            return self._error(h, 404, "RevisionNotFound")
        payload = json.dumps(entries).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)
