"""Checkpoint catalogue, cache and downloader against a real loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from FoBSegmentLib import checkpoints as ck
from FoBSegmentLib.errors import CancelledError, CheckpointError, DownloadError, FoBInputError

SMALL_CHUNK = 256 * 1024


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint of the tiny SAM: (path, sha256, size)."""
    import torch

    from FoBSegmentLib.backbones.sam import build_tiny_sam

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny_sam.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    data = path.read_bytes()
    return path, hashlib.sha256(data).hexdigest(), len(data)


class _Server:
    def __init__(self, files: dict):
        self.files = files
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                name = self.path.lstrip("/")
                if name == "truncated.pth":
                    body = outer.files["tiny_sam.pth"]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if name not in outer.files:
                    self.send_error(404, "not here")
                    return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Quiet(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # clients that hang up on purpose (cancel, size check) are expected

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, name: str) -> int:
        return sum(1 for r in self.requests if r.lstrip("/") == name)


@pytest.fixture(scope="session")
def server(tiny_ckpt):
    srv = _Server({"tiny_sam.pth": tiny_ckpt[0].read_bytes()})
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def tiny_entry(tiny_ckpt, monkeypatch):
    """A catalogue entry for the tiny checkpoint (Meta-style URL so the mirror variable applies)."""
    _, sha, size = tiny_ckpt
    info = ck.CheckpointInfo(name="sam_tiny", filename="tiny_sam.pth", url=ck.SAM_BASE_URL + "tiny_sam.pth",
                             size=size, sha256=sha, variant="vit_b")
    monkeypatch.setitem(ck.CATALOGUE, "sam_tiny", info)
    monkeypatch.delenv(ck.ENV_SAM_BASE_URL, raising=False)
    return info


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_ensure_checkpoint_downloads_verifies_and_reports_progress(server, tiny_ckpt, tiny_entry, tmp_path):
    _, sha, size = tiny_ckpt
    calls = []
    path = ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=server.base + "tiny_sam.pth",
                                progress=lambda done, total: calls.append((done, total)))
    assert path == tmp_path / "checkpoints" / "tiny_sam.pth"
    assert ck.sha256_file(path) == sha
    assert _listing(path.parent) == ["tiny_sam.pth", "tiny_sam.pth" + ck.SIDECAR_SUFFIX]
    assert ck.read_sidecar(path) == sha
    assert len(calls) >= 2, "expected several chunks"
    done = [d for d, _ in calls]
    assert all(b > a for a, b in zip(done, done[1:]))
    assert done[-1] == size
    assert {t for _, t in calls} == {size}


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "c" / "x.pth"
    with pytest.raises(CheckpointError) as ei:
        ck.download(server.base + "tiny_sam.pth", dest, expected_sha256="0" * 64, chunk_size=SMALL_CHUNK)
    assert not isinstance(ei.value, DownloadError)
    msg = str(ei.value)
    assert "checksum" in msg and "--checkpoint" in msg and "etry" in msg
    assert _listing(dest.parent) == []


def test_catalogue_size_mismatch_fails_without_partial_file(server, tmp_path, monkeypatch):
    # the real sam_vit_b entry, pointed at a file that is not it
    monkeypatch.delenv(ck.ENV_SAM_BASE_URL, raising=False)
    with pytest.raises(CheckpointError, match="offers .* bytes but the checkpoint has 375042383 bytes"):
        ck.ensure_checkpoint("sam_vit_b", cache_dir=tmp_path, url=server.base + "tiny_sam.pth")
    assert _listing(tmp_path / "checkpoints") == []


def test_interrupted_transfer_raises_download_error(server, tmp_path):
    dest = tmp_path / "c" / "x.pth"
    url = server.base + "truncated.pth"
    with pytest.raises(DownloadError) as ei:
        ck.download(url, dest, chunk_size=SMALL_CHUNK)
    msg = str(ei.value)
    assert url in msg and "--checkpoint" in msg and "local checkpoint file" in msg
    assert "firewall" in msg and "prox" in msg
    assert _listing(dest.parent) == []


def test_http_error_and_refused_connection_raise_download_error(server, tmp_path):
    dest = tmp_path / "c" / "x.pth"
    with pytest.raises(DownloadError, match="404"):
        ck.download(server.base + "missing.pth", dest)
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(DownloadError):
        ck.download(f"http://127.0.0.1:{port}/x.pth", dest, timeout=5)
    assert _listing(dest.parent) == []


def test_cancel_after_first_chunk(server, tmp_path):
    dest = tmp_path / "c" / "x.pth"
    calls = []
    with pytest.raises(CancelledError):
        ck.download(server.base + "tiny_sam.pth", dest, chunk_size=SMALL_CHUNK,
                    progress=lambda d, t: calls.append(d), is_cancelled=lambda: len(calls) >= 1)
    assert calls == [SMALL_CHUNK]
    assert _listing(dest.parent) == []


def test_cached_good_file_is_not_downloaded_again(server, tiny_ckpt, tiny_entry, tmp_path):
    url = server.base + "tiny_sam.pth"
    path = ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=url)
    n = server.count("tiny_sam.pth")
    assert ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=url) == path
    # without the sidecar the file is hashed once more, still without a request
    (path.parent / (path.name + ck.SIDECAR_SUFFIX)).unlink()
    assert ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=url) == path
    assert server.count("tiny_sam.pth") == n
    assert ck.read_sidecar(path) == tiny_ckpt[1]


def test_cached_file_with_wrong_checksum_is_replaced(server, tiny_ckpt, tiny_entry, tmp_path):
    _, sha, size = tiny_ckpt
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    bad = folder / "tiny_sam.pth"
    bad.write_bytes(b"\0" * size)  # right size, wrong content
    os.utime(bad, ns=(1_000_000_000, 1_000_000_000))
    # a stale sidecar (different mtime) claiming the good digest must not be trusted
    (folder / ("tiny_sam.pth" + ck.SIDECAR_SUFFIX)).write_text(f"{sha} {size} 5\n")
    n = server.count("tiny_sam.pth")
    path = ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=server.base + "tiny_sam.pth")
    assert server.count("tiny_sam.pth") == n + 1
    assert ck.sha256_file(path) == sha
    assert not any(".part-" in p for p in _listing(folder))


def test_file_url(tiny_ckpt, tmp_path):
    src, sha, size = tiny_ckpt
    calls = []
    dest = tmp_path / "c" / "copy.pth"
    digest = ck.download(src.as_uri(), dest, expected_sha256=sha, expected_size=size, chunk_size=SMALL_CHUNK,
                         progress=lambda d, t: calls.append((d, t)))
    assert digest == sha and ck.sha256_file(dest) == sha
    assert calls[-1] == (size, size) and len(calls) > 1
    assert _listing(dest.parent) == ["copy.pth"]


def test_mirror_base_url_env(server, tiny_ckpt, tiny_entry, tmp_path, monkeypatch):
    assert ck.resolve_url(tiny_entry) == ck.SAM_BASE_URL + "tiny_sam.pth"
    monkeypatch.setenv(ck.ENV_SAM_BASE_URL, server.base.rstrip("/"))
    assert ck.resolve_url(tiny_entry) == server.base + "tiny_sam.pth"
    n = server.count("tiny_sam.pth")
    path = ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path)
    assert server.count("tiny_sam.pth") == n + 1
    assert ck.sha256_file(path) == tiny_ckpt[1]


def test_cache_dir_env(server, tiny_entry, tmp_path, monkeypatch):
    monkeypatch.delenv(ck.ENV_CACHE_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ck.default_cache_dir() == tmp_path / "xdg" / "fobsegment"
    monkeypatch.setenv(ck.ENV_CACHE_DIR, str(tmp_path / "mine"))
    assert ck.default_cache_dir() == tmp_path / "mine"
    assert ck.checkpoint_dir() == tmp_path / "mine" / "checkpoints"
    path = ck.ensure_checkpoint("sam_tiny", url=server.base + "tiny_sam.pth")
    assert path == tmp_path / "mine" / "checkpoints" / "tiny_sam.pth" and path.is_file()
    assert not (tmp_path / "xdg").exists()


def test_cached_status(tmp_path):
    status = ck.cached_status(tmp_path)
    assert set(status) == {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"}
    assert not any(status.values())
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with open(folder / "sam_vit_b_01ec64.pth", "wb") as f:
        f.truncate(375_042_383)  # sparse: right size
    (folder / "sam_vit_l_0b3195.pth").write_bytes(b"short")  # wrong size
    (folder / "medsam_vit_b.pth").write_bytes(b"x")  # size unknown
    assert ck.cached_status(tmp_path) == {"sam_vit_b": True, "sam_vit_l": False, "sam_vit_h": False,
                                          "medsam_vit_b": True}


def test_catalogue_entries():
    b = ck.CATALOGUE["sam_vit_b"]
    assert b.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert b.size == 375_042_383 and b.sha256.startswith("ec2df627")
    assert ck.CATALOGUE["sam_vit_h"].size == 2_564_550_879
    m = ck.CATALOGUE["medsam_vit_b"]
    assert m.url is None and m.sha256 is None and m.box_trained and m.pixel_norm == "unit"


def test_medsam_without_local_file_explains_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="--checkpoint"):
        ck.ensure_checkpoint("medsam_vit_b", cache_dir=tmp_path)
    with pytest.raises(FoBInputError, match="Unknown checkpoint"):
        ck.ensure_checkpoint("sam_vit_x", cache_dir=tmp_path)


def test_verify_local_checkpoint(tiny_ckpt, tmp_path):
    with pytest.raises(FoBInputError, match="does not exist"):
        ck.verify_local_checkpoint(tmp_path / "nope.pth", "sam_vit_b")
    with pytest.raises(CheckpointError, match="not the official 'sam_vit_b'"):
        ck.verify_local_checkpoint(tiny_ckpt[0], "sam_vit_b")
    # a right-sized file with the wrong content is rejected by its SHA-256
    fake = tmp_path / "fake.pth"
    with open(fake, "wb") as f:
        f.truncate(375_042_383)
    with pytest.raises(CheckpointError):
        ck.verify_local_checkpoint(fake, "sam_vit_b")
    # no published digest for MedSAM: an existing file is accepted (loading checks it)
    assert ck.verify_local_checkpoint(tiny_ckpt[0], "medsam_vit_b") == tiny_ckpt[0]


def test_sidecar_avoids_rehashing(server, tiny_entry, tmp_path, monkeypatch):
    url = server.base + "tiny_sam.pth"
    path = ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=url)

    def no_hash(*a, **k):
        raise AssertionError("the verified file was hashed again")

    monkeypatch.setattr(ck, "sha256_file", no_hash)
    assert ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=url) == path
    assert ck.file_sha256(path) == tiny_entry.sha256
    # touching the file invalidates the sidecar: it must be hashed again
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    with pytest.raises(AssertionError, match="hashed again"):
        ck.ensure_checkpoint("sam_tiny", cache_dir=tmp_path, url=url)
