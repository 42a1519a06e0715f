"""A stand-in for the Hugging Face Hub's HTTP API on loopback, for the push test.

It is NOT the Hub: it answers the handful of endpoints ``huggingface_hub`` calls to create a
repository and commit files over plain HTTP LFS (repo create, preupload, LFS batch, upload,
verify, commit), stores what arrives in memory, and records every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` is the endpoint, ``hub.files`` the commits."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.lfs: dict[str, bytes] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:
                body = self._body()
                hub.requests.append(("POST", self.path, dict(self.headers)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if self.path.startswith("/api/repos/create"):
                    info = json.loads(body)
                    repo = f"{info.get('organization')}/{info['name']}"
                    hub.repos[repo] = info
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if self.path.startswith("/api/validate-yaml"):
                    return self._send(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".png")) else "regular",
                            "shouldIgnore": False,
                            "oid": None,
                        }
                        for f in files
                    ]
                    return self._send(200, {"files": modes, "commitOid": "0" * 40})
                if self.path.endswith(".git/info/lfs/objects/batch"):
                    objects = json.loads(body)["objects"]
                    return self._send(
                        200,
                        {
                            "transfer": "basic",
                            "objects": [
                                {
                                    "oid": o["oid"],
                                    "size": o["size"],
                                    "authenticated": True,
                                    "actions": {
                                        "upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"},
                                        "verify": {"href": f"{hub.url}/lfs-verify"},
                                    },
                                }
                                for o in objects
                            ],
                        },
                    )
                if self.path.startswith("/lfs-verify"):
                    oid = json.loads(body)["oid"]
                    return self._send(200 if oid in hub.lfs else 404, {})
                if parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo = f"{parts[2]}/{parts[3]}"
                    stored = hub.files.setdefault(repo, {})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "lfsFile":
                            stored[item["value"]["path"]] = hub.lfs[item["value"]["oid"]]
                    return self._send(
                        200,
                        {
                            "commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}",
                            "commitOid": "1" * 40,
                            "pullRequestUrl": None,
                        },
                    )
                return self._send(404, {"error": f"the stand-in does not serve POST {self.path}"})

            def do_PUT(self) -> None:
                body = self._body()
                hub.requests.append(("PUT", self.path, dict(self.headers)))
                if self.path.startswith("/lfs-upload/"):
                    oid = self.path.rsplit("/", 1)[1]
                    if hashlib.sha256(body).hexdigest() != oid:
                        return self._send(400, {"error": "sha256 mismatch"})
                    hub.lfs[oid] = body
                    return self._send(200, {})
                return self._send(404, {"error": f"the stand-in does not serve PUT {self.path}"})

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path, dict(self.headers)))
                return self._send(404, {"error": f"the stand-in does not serve GET {self.path}"})

        return Handler
