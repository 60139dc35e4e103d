"""URL lists fetched with img2dataset (vlalign.data.download) from a real HTTP server on the
loopback address serving the synthetic world's images, plus a 404, a corrupt image and a URL
slower than the timeout."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Image as HFImage
from datasets import load_from_disk

from vlalign.config import ConfigError, load_yaml, validate_config
from vlalign.data.download import DownloadError, download_dataset, failure_reason
from vlalign.data.world import generate_world
from vlalign.results.db import ingest, query

pytest.importorskip("img2dataset", reason="img2dataset (the download extra) is not installed")

N_GOOD = 6
SLOW_S = 4.0  # the slow handler's sleep, well over the test timeout
TIMEOUT_S = 1.0


class _Server:
    """A threading HTTP server on 127.0.0.1: /img/<i>.png, /corrupt.png, /slow.png; else 404."""

    def __init__(self, images: list[bytes]) -> None:
        self.images = images
        self.hits: Counter[str] = Counter()
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with lock:
                    server.hits[self.path] += 1
                if self.path.startswith("/img/"):
                    body = server.images[int(self.path[5:].split(".")[0])]
                elif self.path == "/corrupt.png":
                    body = b"\x89PNG\r\n\x1a\n" + b"not an image" * 8
                elif self.path == "/slow.png":
                    time.sleep(SLOW_S)
                    body = server.images[0]
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except BrokenPipeError:  # the client gave up (the slow URL, after its timeout)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # the slow handler must not hold up the shutdown
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def world() -> tuple[list[bytes], list[str]]:
    ds = generate_world(None, splits={"train": N_GOOD, "val": 1, "test": 1}, seed=0)["train"]
    ds = ds.cast_column("image", HFImage(decode=False))
    return [r["image"]["bytes"] for r in ds], [r["captions"][0] for r in ds]


@pytest.fixture
def server(world):
    srv = _Server(world[0])
    yield srv
    srv.close()


def _tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["url\tcaption"] + [f"{u}\t{c}" for u, c in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pixels(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _spec(url_list: Path, **download) -> dict:
    return {"source": f"urls:{url_list}",
            "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25},
            "download": {"timeout": TIMEOUT_S, "preflight_timeout": 1.0, "threads": 4,
                         **download}}


def test_download_end_to_end(tmp_path: Path, server: _Server, world) -> None:
    images, captions = world
    rows = [(f"{server.url}/img/{i}.png", captions[i]) for i in range(N_GOOD)]
    # rows 6..9: a 404, a corrupt image, one slower than the timeout, an empty caption
    rows += [(f"{server.url}/missing.png", "gone"), (f"{server.url}/corrupt.png", "broken"),
             (f"{server.url}/slow.png", "too slow"), (f"{server.url}/img/0.png", " ")]
    url_list = _tsv(tmp_path / "urls.tsv", rows)
    out = tmp_path / "data" / "cc"
    t0 = time.monotonic()
    stats = download_dataset("cc", _spec(url_list, shard_size=4), out, tmp_path / "work")
    assert time.monotonic() - t0 < SLOW_S + 20  # the slow URL did not hold the job

    dsd = load_from_disk(str(out))
    assert sorted(dsd) == ["test", "train", "val"]
    got = {}
    for split, ds in dsd.items():
        for r in ds.cast_column("image", HFImage(decode=False)):
            assert r["split"] == split
            got[int(r["image_id"])] = r
    assert sorted(got) == list(range(N_GOOD))  # exactly the good rows
    for i, r in got.items():
        assert r["captions"] == [captions[i]]
        served = images[i]
        assert hashlib.sha256(r["image"]["bytes"]).hexdigest() == hashlib.sha256(served).hexdigest()
        assert np.array_equal(_pixels(r["image"]["bytes"]), _pixels(served))
        meta = json.loads(r["meta"])
        assert meta["url"] == f"{server.url}/img/{i}.png"
        assert meta["sha256"] == hashlib.sha256(served).hexdigest()
    assert len({hashlib.sha256(r["image"]["bytes"]).digest() for r in got.values()}) == N_GOOD

    on_disk = json.loads((out / "download_stats.json").read_text())
    assert on_disk == stats
    assert stats["rows"] == 10 and stats["succeeded"] == N_GOOD and stats["failed"] == 4
    assert stats["failures"] == {"decode_error": 1, "http_404": 1, "missing_caption": 1,
                                 "timeout": 1}
    assert stats["splits"] == {s: len(ds) for s, ds in dsd.items()}
    assert stats["shards"] == {"total": 3, "fetched": 3, "reused": 0}
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert [(f["row"], f["reason"]) for f in failures] == [
        (6, "http_404"), (7, "decode_error"), (8, "timeout"), (9, "missing_caption")]
    assert "404" in failures[0]["message"]
    # the row without a caption was never requested: /img/0.png was fetched once, for row 0
    assert server.hits[f"/img/{0}.png"] == 1

    # the counts in the results database (the aggregate rule ingests data/*/download_stats.json)
    ingest(tmp_path, tmp_path / "results.duckdb")
    db = query(tmp_path / "results.duckdb", "SELECT * FROM download_stats")
    assert set(db["dataset"]) == {"cc"} and set(db["url_list"]) == {str(url_list)}
    assert dict(zip(db["metric"], db["value"])) == {
        "rows": 10, "succeeded": N_GOOD, "failed": 4, "failed.decode_error": 1,
        "failed.http_404": 1, "failed.missing_caption": 1, "failed.timeout": 1,
        **{f"split.{s}": len(ds) for s, ds in dsd.items()}}


def test_interrupted_download_resumes_without_refetching(tmp_path: Path, server: _Server, world,
                                                         monkeypatch) -> None:
    from img2dataset.downloader import Downloader

    images, captions = world
    url_list = _tsv(tmp_path / "urls.tsv",
                    [(f"{server.url}/img/{i}.png", captions[i]) for i in range(N_GOOD)])
    spec, out, work = _spec(url_list, shard_size=2), tmp_path / "data" / "cc", tmp_path / "work"

    real_call, calls = Downloader.__call__, []

    def killed_on_second_shard(self, row):
        calls.append(row[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a killed job: shard 0 done, the others not started
        return real_call(self, row)

    monkeypatch.setattr(Downloader, "__call__", killed_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        download_dataset("cc", spec, out, work)
    assert not out.exists()  # no half-written output
    first = dict(server.hits)
    assert first == {"/img/0.png": 1, "/img/1.png": 1}

    monkeypatch.setattr(Downloader, "__call__", real_call)
    stats = download_dataset("cc", spec, out, work)
    assert stats["shards"] == {"total": 3, "fetched": 2, "reused": 1}
    assert dict(server.hits) == {f"/img/{i}.png": 1 for i in range(N_GOOD)}  # none refetched
    assert stats["succeeded"] == N_GOOD and stats["failures"] == {}
    assert sum(len(ds) for ds in load_from_disk(str(out)).values()) == N_GOOD
    assert sorted(p.name for p in work.iterdir()) == ["request.json", "shards", "urls.parquet"]

    # a finished work dir: a rebuild of the output fetches nothing at all
    again = download_dataset("cc", spec, tmp_path / "data" / "cc2", work)
    assert again["shards"] == {"total": 3, "fetched": 0, "reused": 3}
    assert sum(server.hits.values()) == N_GOOD


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def blackhole():
    """A host whose connects hang, as an unroutable one: a listening socket with a full accept
    queue drops new SYNs (an address like 10.255.255.1 is answered by this sandbox's network)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    filler = socket.create_connection(s.getsockname(), timeout=1)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    filler.close()
    s.close()


@pytest.mark.parametrize("kind", ["closed-port", "unresolvable", "blackholed"])
def test_no_network_fails_fast_with_a_clear_message(tmp_path: Path, kind: str,
                                                    request) -> None:
    host = {"closed-port": lambda: f"127.0.0.1:{_closed_port()}",
            "unresolvable": lambda: "images.example.invalid",
            "blackholed": lambda: request.getfixturevalue("blackhole")}[kind]()
    url_list = _tsv(tmp_path / "urls.tsv", [(f"http://{host}/{i}.jpg", f"c{i}") for i in range(3)])
    out = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=r"cannot reach any host .*urls\.tsv.*network"):
        download_dataset("cc", _spec(url_list), out, tmp_path / "work")  # preflight_timeout 1 s
    assert time.monotonic() - t0 < 4
    assert not out.exists()


def test_all_rows_failing_is_an_error_naming_the_file(tmp_path: Path, server: _Server) -> None:
    url_list = _tsv(tmp_path / "urls.tsv", [(f"{server.url}/nope{i}.png", "x") for i in range(3)])
    with pytest.raises(DownloadError,
                       match=r"urls\.tsv could be fetched: all 3 rows failed.*'http_404': 3"):
        download_dataset("cc", _spec(url_list), tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists()


def test_missing_img2dataset_is_an_error_naming_the_file(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "img2dataset.downloader", None)  # import raises ImportError
    url_list = _tsv(tmp_path / "urls.tsv", [(f"{server.url}/nope.png", "x")])
    missing = r"dataset 'cc' \(URL list .*urls\.tsv\): fetching it needs img2dataset"
    with pytest.raises(DownloadError, match=missing):
        download_dataset("cc", _spec(url_list), tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists()


def test_headerless_tsv_and_parquet_url_lists(tmp_path: Path, server: _Server, world) -> None:
    images, captions = world
    # Conceptual Captions' layout: caption <TAB> url, no header row
    cc = tmp_path / "cc.tsv"
    cc.write_text("".join(f"{captions[i]}\t{server.url}/img/{i}.png\n" for i in range(2)))
    stats = download_dataset("cc", _spec(cc, header=False, names=["caption", "url"]),
                             tmp_path / "a", tmp_path / "wa")
    assert stats["succeeded"] == 2 and stats["rows"] == 2
    # LAION-style parquet with other column names
    laion = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": [f"{server.url}/img/{i}.png" for i in (2, 3)],
                             "TEXT": [captions[2], captions[3]], "similarity": [0.3, 0.4]}),
                   laion)
    stats = download_dataset("laion", _spec(laion, url_column="URL", caption_column="TEXT"),
                             tmp_path / "b", tmp_path / "wb")
    assert stats["succeeded"] == 2
    caps = {c for ds in load_from_disk(str(tmp_path / "b")).values() for r in ds
            for c in r["captions"]}
    assert caps == {captions[2], captions[3]}


def test_bad_url_lists_and_options_are_named(tmp_path: Path) -> None:
    url_list = _tsv(tmp_path / "urls.tsv", [("http://127.0.0.1:1/a.jpg", "a")])
    with pytest.raises(DownloadError, match=r"no column 'link' \(download.url_column\)"):
        download_dataset("cc", _spec(url_list, url_column="link"), tmp_path / "o", tmp_path / "w")
    with pytest.raises(DownloadError, match=r"unknown download option\(s\) \['timeuot'\]"):
        download_dataset("cc", _spec(url_list, timeuot=3), tmp_path / "o", tmp_path / "w")
    with pytest.raises(DownloadError, match=r"nothere.tsv does not exist"):
        download_dataset("cc", _spec(tmp_path / "nothere.tsv"), tmp_path / "o", tmp_path / "w")


def test_failure_reasons_of_urllib_messages() -> None:
    assert failure_reason("HTTP Error 403: Forbidden") == "http_403"
    assert failure_reason("The read operation timed out") == "timeout"
    assert failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection"
    assert failure_reason("<urlopen error [Errno -2] Name or service not known>") == "connection"
    assert failure_reason("Use of image disallowed by X-Robots-Tag directive") == "disallowed"


def test_config_rejects_unknown_download_keys(tiny_config_path: Path, tmp_path: Path) -> None:
    base = load_yaml(tiny_config_path)
    base["datasets"]["cc"] = {"source": "urls:/x.tsv", "download": {"timeout": 2}}
    validate_config(json.loads(json.dumps(base)))
    bad = json.loads(json.dumps(base))
    bad["datasets"]["cc"]["download"]["threds"] = 4
    with pytest.raises(ConfigError, match="threds"):
        validate_config(bad)
    bad = json.loads(json.dumps(base))
    bad["datasets"]["world"]["download"] = {"timeout": 2}
    with pytest.raises(ConfigError, match=r"datasets.world.download is only for a URL list"):
        validate_config(bad)


@pytest.mark.slow
def test_download_rule_through_snakemake(tmp_path: Path, server: _Server, world, snakemake,
                                         tiny_config_path: Path) -> None:
    images, captions = world
    url_list = _tsv(tmp_path / "urls.tsv",
                    [(f"{server.url}/img/{i}.png", captions[i]) for i in range(4)]
                    + [(f"{server.url}/missing.png", "gone")])
    cfg = load_yaml(tiny_config_path)
    cfg["datasets"]["cc_tiny"] = _spec(url_list)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    results = tmp_path / "results"
    target = results / "data" / "cc_tiny"
    proc = snakemake(["--configfile", str(cfg_file), "--config", f"results_dir={results}",
                      "-c1", str(target)], timeout=240)
    log = results / "logs" / "download" / "cc_tiny.log"
    assert proc.returncode == 0, proc.stdout[-3000:] + (log.read_text()[-3000:]
                                                        if log.exists() else "")
    assert "rule download" in proc.stdout
    stats = json.loads((target / "download_stats.json").read_text())
    assert stats["succeeded"] == 4 and stats["failures"] == {"http_404": 1}
    assert sum(len(ds) for ds in load_from_disk(str(target)).values()) == 4
