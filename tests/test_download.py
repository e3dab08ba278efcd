"""`download` against a local imitation of the hub's file-resolve endpoint (no network needed).

huggingface_hub 2.4.0's hf_hub_download does `HEAD /datasets/{repo}/resolve/{revision}/{path}`
(it needs X-Repo-Commit, ETag and Content-Length) and then `GET` on the same URL.
"""
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from data.download import DownloadError, parse_manifest
from data.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]
REPO = "willdepueoai/parameter-golf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DS = "datasets/datasets/fineweb10B_sp1024"


def shard_bytes(tmp_path, n, seed):
    path = tmp_path / f"s{seed}.bin"
    write_shard(path, np.random.default_rng(seed).integers(0, 1024, n))
    return path.read_bytes()


class Hub:
    """Serves `files` (repo path -> bytes) for REPO and records every request; stops itself."""

    def __init__(self, files, lifetime=60.0):
        self.files, self.requests = files, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body_wanted):
                hub.requests.append((self.command, urllib.parse.unquote(self.path)))
                prefix = f"/datasets/{REPO}/resolve/"
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                data = None
                if path.startswith(prefix):
                    data = hub.files.get(path[len(prefix):].split("/", 1)[1])
                elif path == "/":
                    data = b"hub"
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if body_wanted:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self.timer = threading.Timer(lifetime, self.server.shutdown)  # bounded even if a test hangs
        self.timer.daemon = True
        self.timer.start()

    def fetched(self, method="GET"):
        """Repo paths requested with `method` (the probe and other paths left out)."""
        prefix = f"/datasets/{REPO}/resolve/main/"
        return sorted(p[len(prefix):] for m, p in self.requests if m == method and p.startswith(prefix))

    def stop(self):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path):
    shards = {f"{DS}/fineweb_val_000000.bin": shard_bytes(tmp_path, 300, 0)}
    for i in range(4):
        shards[f"{DS}/fineweb_train_{i:06d}.bin"] = shard_bytes(tmp_path, 200 + i, i + 1)
    files = dict(shards)
    files["datasets/tokenizers/fineweb_1024_bpe.model"] = b"model bytes"
    files["datasets/datasets/fineweb10B_sp4096/fineweb_train_000000.bin"] = shard_bytes(tmp_path, 50, 9)
    listed = [k for k in files if not k.endswith("fineweb_train_000003.bin")]  # on the hub, not listed
    manifest = {"files": [{"path": k.removeprefix("datasets/"), "size": len(files[k])} for k in listed]}
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    h = Hub(files)
    yield h
    h.stop()


def run_cli(endpoint, out, *args, env_extra=None):
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(out / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    env.update(env_extra or {})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "data", "download", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


def test_manifest_decides_and_train_shards_limit(hub, tmp_path):
    out = tmp_path / "out"
    proc, _ = run_cli(hub.url, out, "--train-shards", "1")
    assert proc.returncode == 0, proc.stderr
    ds = out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model bytes"
    assert (ds / "fineweb_val_000000.bin").read_bytes() == hub.files[f"{DS}/fineweb_val_000000.bin"]
    assert hub.fetched() == sorted(["datasets/manifest.json", f"{DS}/fineweb_train_000000.bin",
                                    f"{DS}/fineweb_val_000000.bin", "datasets/tokenizers/fineweb_1024_bpe.model"])
    assert not (out / "datasets" / ".hf_download").exists()  # staging cleaned up
    assert not (out / "datasets" / "fineweb10B_sp4096").exists()


def test_all_listed_train_shards_by_default(hub, tmp_path):
    proc, _ = run_cli(hub.url, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "out" / "datasets" / "fineweb10B_sp1024").iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin",
                     "fineweb_val_000000.bin"]  # train_000003 is not in the manifest


def test_present_files_are_not_requested_again(hub, tmp_path):
    out = tmp_path / "out"
    ds = out / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    (ds / "fineweb_val_000000.bin").write_bytes(hub.files[f"{DS}/fineweb_val_000000.bin"])
    (ds / "fineweb_train_000000.bin").write_bytes(b"partial")  # wrong size: fetched again
    proc, _ = run_cli(hub.url, out, "--train-shards", "1")
    assert proc.returncode == 0, proc.stderr
    requested = hub.fetched("GET") + hub.fetched("HEAD")
    assert f"{DS}/fineweb_val_000000.bin" not in requested
    assert f"{DS}/fineweb_train_000000.bin" in hub.fetched("GET")
    assert (ds / "fineweb_train_000000.bin").read_bytes() == hub.files[f"{DS}/fineweb_train_000000.bin"]
    # A second run fetches nothing but the manifest.
    hub.requests.clear()
    proc, _ = run_cli(hub.url, out, "--train-shards", "1")
    assert proc.returncode == 0 and hub.fetched() == ["datasets/manifest.json"]


def test_unreachable_endpoint_fails_fast(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, seconds = run_cli(f"http://127.0.0.1:{port}", tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Hugging Face hub" in lines[0] and str(port) in lines[0]
    assert seconds < 2.0


def test_silent_endpoint_fails_fast(tmp_path):
    """A server that accepts connections but never answers (a stuck proxy, a black hole)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        proc, seconds = run_cli(f"http://127.0.0.1:{s.getsockname()[1]}", tmp_path, "--probe-timeout", "1")
    assert proc.returncode == 1 and "cannot reach the Hugging Face hub" in proc.stderr
    assert seconds < 2.0


def test_offline_mode_is_a_clear_error(tmp_path):
    proc, seconds = run_cli("http://127.0.0.1:9", tmp_path, env_extra={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "HF_HUB_OFFLINE" in proc.stderr and seconds < 2.0


def test_manifest_shapes():
    assert parse_manifest({"files": [{"path": "a/b.bin", "size": 3}, "c.model"]}) == [("a/b.bin", 3), ("c.model", None)]
    assert parse_manifest([{"rfilename": "/x.bin", "bytes": 5}]) == [("x.bin", 5)]
    official = {"datasets": [{"name": "fineweb10B_sp1024", "stats": {"files_train": 2, "files_val": 1}}],
                "tokenizers": [{"name": "sp1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}]}
    assert [p for p, _ in parse_manifest(official)] == [
        "datasets/fineweb10B_sp1024/fineweb_train_000000.bin", "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin", "tokenizers/fineweb_1024_bpe.model"]
    with pytest.raises(DownloadError, match="no path"):
        parse_manifest({"files": [{"size": 3}]})
    with pytest.raises(DownloadError, match="list of file entries"):
        parse_manifest({"files": "nope"})
