"""URL lists (Conceptual Captions, LAION-style parquet / TSV of ``url, caption``) → a dataset.

A dataset spec with ``source: urls:<path>`` names a URL list: a parquet file (or a directory of
parquet files) or a CSV / TSV file (``.gz`` too). Its images are fetched with img2dataset
(https://github.com/rom1504/img2dataset), shard by shard, into a work directory that survives a
killed job; the fetched rows then become a normalised dataset (``vlalign.data.schema``) through
the ``url_captions`` preset of :func:`vlalign.data.sources.load_source`, so ``split_fractions``,
``splits``, ``max_rows`` and the split report work as for every other source.

Options (the spec's ``download`` block, defaults in :data:`DEFAULTS`): ``url_column`` /
``caption_column`` (column names; with ``header: false`` the names come from ``names``, e.g.
Conceptual Captions' header-less TSV is ``names: [caption, url]``), ``timeout`` (seconds per
request), ``retries``, ``threads`` (parallel requests), ``shard_size`` (URLs per img2dataset
shard: the unit of resumption), ``max_urls`` (only the first N rows: smoke runs),
``preflight_timeout`` (seconds) and ``user_agent_token``.

Outputs, next to the saved ``DatasetDict`` in the output directory:

``download_stats.json``
    ``rows`` (URL-list rows), ``succeeded`` (rows in the dataset), ``failed`` and ``failures``
    (count per reason: ``http_<code>``, ``timeout``, ``connection``, ``decode_error`` (bytes
    that are not a readable image), ``disallowed`` (X-Robots-Tag noai...), ``missing_url``,
    ``missing_caption``, ``other``), ``splits`` (rows per split), ``shards`` (``total``,
    ``fetched`` this run, ``reused`` from an interrupted run).
``failures.parquet``
    One row per skipped URL-list row: ``row``, ``url``, ``caption``, ``reason``, ``message``.

The work directory keeps img2dataset's shards (``shards/<id>.parquet``: every row with its
status, error message and image bytes; ``<id>_stats.json`` once a shard is finished): about
the size of the dataset again. Delete it to reclaim the space once the output is there (a rerun
of the rule then fetches everything again).

Choices (not fixed by issue 15): images are kept as served (img2dataset's re-encoding is
disabled, so the bytes, and their sha256 in ``meta``, are the server's); they are checked with
the same decoder as every other source (:func:`vlalign.data.sources._rgb_bytes`) and a row whose
bytes do not decode is a ``decode_error`` failure. Splits are drawn from the rows that were
fetched, so a URL that fails on one run and not on the next can move rows between splits.
Without network the job fails within ``preflight_timeout`` seconds: before fetching, it opens a
TCP connection to the hosts (or the proxy) of the first URLs; a run in which no row succeeds
fails too, naming the URL list and the failure counts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from vlalign.data.sources import SourceError, _rgb_bytes, _RowError, load_source, save_dataset
from vlalign.io_utils import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "url_column": "url",
    "caption_column": "caption",
    "header": True,
    "names": None,
    "timeout": 10.0,
    "retries": 0,
    "threads": 32,
    "shard_size": 10000,
    "max_urls": None,
    "preflight_timeout": 5.0,
    "user_agent_token": None,
}
# Options that change which rows are fetched: a work directory made with others is started over.
_REQUEST_KEYS = ("url_column", "caption_column", "header", "names", "shard_size", "max_urls")
_ROW = "vlalign_row"  # the URL-list row, carried through img2dataset as an extra column
_OOM_SHARDS = 5  # img2dataset's shard-name width: 00000.parquet, 00000_stats.json
_PREFLIGHT_HOSTS = 3
STATS_FILE = "download_stats.json"
FAILURES_FILE = "failures.parquet"
_FAILURE_SCHEMA = pa.schema([("row", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                             ("reason", pa.string()), ("message", pa.string())])
_GOOD_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()),
                          ("caption", pa.string()), ("url", pa.string()),
                          ("sha256", pa.string())])


class DownloadError(SourceError):
    """A URL list that cannot be fetched: names the dataset, the file and what went wrong."""


# ---------------------------------------------------------------------------------------------
# Options and the URL list.


def resolve_options(name: str, spec: dict) -> dict[str, Any]:
    """The spec's ``download`` block over :data:`DEFAULTS`; unknown keys are an error."""
    block = spec.get("download") or {}
    unknown = sorted(set(block) - set(DEFAULTS))
    if unknown:
        raise DownloadError(f"dataset '{name}': unknown download option(s) {unknown}; "
                            f"known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **block}
    if not opts["header"] and not opts["names"]:
        raise DownloadError(f"dataset '{name}': download.header is false, so download.names "
                            f"must give the column names (Conceptual Captions: [caption, url])")
    return opts


def url_list_path(name: str, spec: dict) -> Path:
    source = spec.get("source", "")
    if not isinstance(source, str) or not source.startswith("urls:") or len(source) <= 5:
        raise DownloadError(f"dataset '{name}': expected source urls:<path>, got {source!r}")
    return Path(source[5:]).expanduser()


def read_url_list(name: str, path: Path, opts: dict) -> pa.Table:
    """The URL list as a table (``url``, ``caption``, ``vlalign_row``), in file order."""
    if not path.exists():
        raise DownloadError(f"dataset '{name}': URL list {path} does not exist")
    url_col, cap_col = opts["url_column"], opts["caption_column"]
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if path.is_dir() or suffixes.endswith(".parquet"):
            table = pq.read_table(path)
        elif re.search(r"\.(tsv|csv)(\.gz)?$", suffixes):
            delimiter = "\t" if ".tsv" in suffixes else ","
            read = pa_csv.ReadOptions(column_names=opts["names"] if not opts["header"] else None)
            # TSV captions are not quoted (Conceptual Captions has bare '"' in captions)
            parse = pa_csv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == ","
                                        else False)
            convert = pa_csv.ConvertOptions(column_types={url_col: pa.string(),
                                                          cap_col: pa.string()})
            table = pa_csv.read_csv(path, read_options=read, parse_options=parse,
                                    convert_options=convert)
        else:
            raise DownloadError(f"dataset '{name}': URL list {path} is not .parquet, .tsv or "
                                f".csv (optionally .gz)")
    except (pa.ArrowInvalid, OSError) as e:
        raise DownloadError(f"dataset '{name}': cannot read URL list {path}: {e}") from e
    for what, col in (("url_column", url_col), ("caption_column", cap_col)):
        if col not in table.column_names:
            raise DownloadError(f"dataset '{name}': URL list {path} has no column {col!r} "
                                f"(download.{what}); columns: {table.column_names}")
    if opts["max_urls"] is not None:
        table = table.slice(0, int(opts["max_urls"]))
    return pa.table({
        "url": table[url_col].cast(pa.string()),
        "caption": table[cap_col].cast(pa.string()),
        _ROW: pa.array(range(table.num_rows), pa.int64()),
    })


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*.parquet")) if path.is_dir() else [path]:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Preflight: no network → a clear error within preflight_timeout, never a hang.


def _endpoint(url: str) -> tuple[str, int] | None:
    """The (host, port) a request for ``url`` connects to: its proxy's when one applies."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or 80
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _connect(endpoint: tuple[str, int], timeout: float) -> None:
    with socket.create_connection(endpoint, timeout=timeout):
        pass


def preflight(name: str, path: Path, urls: list[str | None], timeout: float) -> None:
    """Connect to the endpoints of the first URLs; raise :class:`DownloadError` if none answers.

    Name resolution ignores socket timeouts, so the connections run in daemon threads and the
    whole check is bounded by ``timeout``.
    """
    endpoints: list[tuple[str, int]] = []
    for url in urls:
        ep = _endpoint(url) if url else None
        if ep and ep not in endpoints:
            endpoints.append(ep)
        if len(endpoints) == _PREFLIGHT_HOSTS:
            break
    if not endpoints:
        raise DownloadError(f"dataset '{name}': URL list {path} has no http(s) URL in its "
                            f"first {len(urls)} rows")
    errors: dict[str, str] = {}
    pool = concurrent.futures.ThreadPoolExecutor(len(endpoints))
    futures = {pool.submit(_connect, ep, timeout): ep for ep in endpoints}
    try:
        for fut in concurrent.futures.as_completed(futures, timeout=timeout + 0.5):
            ep = futures[fut]
            try:
                fut.result()
                return  # one host answers: the network is there
            except OSError as e:
                errors[f"{ep[0]}:{ep[1]}"] = f"{type(e).__name__}: {e}"
    except concurrent.futures.TimeoutError:
        pass
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for ep in futures.values():
        errors.setdefault(f"{ep[0]}:{ep[1]}", f"no answer within {timeout:g}s")
    raise DownloadError(
        f"dataset '{name}': cannot reach any host of the first URLs of {path} "
        f"({'; '.join(f'{k}: {v}' for k, v in errors.items())}). Is there a network? The "
        f"download needs internet access; offline, point the dataset at images already "
        f"downloaded (source: local:<dir>)")


# ---------------------------------------------------------------------------------------------
# Fetching with img2dataset.


def _prepare_work_dir(work: Path, request: dict) -> None:
    """Keep the shards of an interrupted run of the same request; start over otherwise."""
    req_file = work / "request.json"
    if req_file.exists():
        if json.loads(req_file.read_text()) == request:
            return
        log.warning("download work dir %s was made for another URL list or options: starting "
                    "over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(req_file, request)


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:0{_OOM_SHARDS}d}"


def _done_shards(shards_dir: Path) -> set[int]:
    # img2dataset writes <shard>_stats.json last: a shard without it is redone
    return {int(p.name.split("_")[0]) for p in shards_dir.glob("*_stats.json")}


def fetch_shards(urls_file: Path, shards_dir: Path, opts: dict, source: str) -> tuple[int, int]:
    """Fetch the shards of ``urls_file`` not yet done into ``shards_dir`` with img2dataset's
    reader, downloader and parquet writer; return (shards fetched now, shards in all).
    ``source`` names the dataset and its URL list in the error when img2dataset is missing.

    img2dataset is imported here only: its import pulls in wandb, albumentations, OpenCV and
    torch (seconds), and albumentations checks the network for updates unless told not to.
    The shards run one after another in this process (threads within a shard), so a killed job
    leaves only finished shards behind: img2dataset's own ``incremental`` mode, by shard.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        from img2dataset.downloader import Downloader
        from img2dataset.reader import Reader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import ParquetSampleWriter
    except ImportError as e:
        raise DownloadError(
            f"{source}: fetching it needs img2dataset, which `make setup` installs "
            f"(docs/download.md, Install): {e}"
        ) from e

    shards_dir.mkdir(parents=True, exist_ok=True)
    tmp = shards_dir / "_tmp"
    tmp.mkdir(exist_ok=True)
    done = _done_shards(shards_dir)
    reader = Reader(str(urls_file), "parquet", "url", "caption", None, None, [_ROW],
                    int(opts["shard_size"]), done, str(tmp), 0)
    # resize_mode "no" + no re-encoding: the bytes as served (checked when converting)
    resizer = Resizer(image_size=0, resize_mode="no", resize_only_if_bigger=False,
                      disable_all_reencoding=True)
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter, resizer=resizer,
        thread_count=int(opts["threads"]), save_caption=True, extract_exif=False,
        output_folder=str(shards_dir), column_list=reader.column_list,
        timeout=float(opts["timeout"]), number_sample_per_shard=int(opts["shard_size"]),
        oom_shard_count=_OOM_SHARDS, compute_hash="sha256", verify_hash_type=None,
        encode_format="jpg", retries=int(opts["retries"]),
        user_agent_token=opts["user_agent_token"],
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )
    fetched = 0
    for shard in reader:
        ok, _ = downloader(shard)
        if not ok:  # img2dataset printed the traceback; one more try, as its max_shard_retry
            ok, _ = downloader(shard)
        if not ok:
            raise DownloadError(f"img2dataset failed on shard {shard[0]} of {urls_file} twice "
                                f"(traceback above)")
        fetched += 1
        log.info("shard %s fetched", _shard_name(shard[0]))
    shutil.rmtree(tmp, ignore_errors=True)
    total = -(-pq.read_metadata(urls_file).num_rows // int(opts["shard_size"]))
    return fetched, total


def failure_reason(message: str) -> str:
    """A short reason for one of img2dataset's (urllib's) error messages."""
    m = re.search(r"HTTP Error (\d{3})", message)
    if m:
        return f"http_{m.group(1)}"
    low = message.lower()
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "x-robots-tag" in low:
        return "disallowed"
    if any(s in low for s in ("refused", "unreachable", "no route", "name or service",
                              "name resolution", "nodename", "reset by peer",
                              "remote end closed", "urlopen error")):
        return "connection"
    return "other"


def _convert_shard(shards_dir: Path, shard_id: int, good_dir: Path, fail_dir: Path) -> None:
    """One fetched shard → the rows whose bytes decode (good/) and the failures (failures/)."""
    name = _shard_name(shard_id)
    good_file, fail_file = good_dir / f"good-{name}.parquet", fail_dir / f"{name}.parquet"
    if fail_file.exists():
        return  # converted by an interrupted run (the failures file is written last)
    table = pq.read_table(shards_dir / f"{name}.parquet",
                          columns=[_ROW, "url", "caption", "status", "error_message", "jpg",
                                   "sha256"])
    good: dict[str, list] = {k: [] for k in _GOOD_SCHEMA.names}
    fail: dict[str, list] = {k: [] for k in _FAILURE_SCHEMA.names}
    for rec in sorted(table.to_pylist(), key=lambda r: r[_ROW]):
        reason, message = None, rec["error_message"] or ""
        if rec["status"] == "success":
            try:
                image = _rgb_bytes(rec["jpg"], "image")
            except _RowError as e:
                reason, message = "decode_error", e.message
        else:
            reason = failure_reason(message)
        if reason is None:
            good["image_id"].append(str(rec[_ROW]))
            good["image"].append(image)
            good["caption"].append(rec["caption"])
            good["url"].append(rec["url"])
            good["sha256"].append(rec["sha256"])
        else:
            fail["row"].append(rec[_ROW])
            fail["url"].append(rec["url"])
            fail["caption"].append(rec["caption"])
            fail["reason"].append(reason)
            fail["message"].append(message)
    # no file for a shard without good rows: datasets cannot read an empty parquet file
    written = [(good_file, good, _GOOD_SCHEMA)] if good["image_id"] else []
    for path, cols, schema in [*written, (fail_file, fail, _FAILURE_SCHEMA)]:
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(cols, schema=schema), tmp)


# ---------------------------------------------------------------------------------------------
# The job.


def _invalid_rows(table: pa.Table) -> tuple[pa.Table, dict[str, list]]:
    """Rows with no URL or no caption are failures before any request; the rest are sent."""
    fail: dict[str, list] = {k: [] for k in _FAILURE_SCHEMA.names}
    keep = []
    for rec in table.to_pylist():
        url, cap = (rec["url"] or "").strip(), (rec["caption"] or "").strip()
        reason = "missing_url" if not url else "missing_caption" if not cap else None
        if reason is None:
            keep.append(rec[_ROW])
            continue
        fail["row"].append(rec[_ROW])
        fail["url"].append(rec["url"])
        fail["caption"].append(rec["caption"])
        fail["reason"].append(reason)
        fail["message"].append(f"empty {'url' if reason == 'missing_url' else 'caption'}")
    return table.take(pa.array(keep, pa.int64())), fail


def download_dataset(name: str, spec: dict, out: str | Path, work_dir: str | Path,
                     seed: int = 0) -> dict[str, Any]:
    """Fetch the URL list of ``spec`` (``source: urls:<path>``) and save it, normalised, at
    ``out`` (atomically, with ``download_stats.json`` and ``failures.parquet``).

    ``work_dir`` keeps the fetched shards: run again after a kill, only the unfinished shards
    are fetched. Returns the stats. Raises :class:`DownloadError` when the URL list is bad,
    no host answers (no network) or no row succeeds.
    """
    t0 = time.monotonic()
    opts = resolve_options(name, spec)
    path = url_list_path(name, spec)
    work = Path(work_dir)
    table = read_url_list(name, path, opts)
    request = {"url_list": str(path.resolve()), "sha256": _file_sha256(path),
               **{k: opts[k] for k in _REQUEST_KEYS}}
    _prepare_work_dir(work, request)
    sendable, invalid = _invalid_rows(table)
    urls_file = work / "urls.parquet"
    if not urls_file.exists():
        with atomic_path(urls_file) as tmp:
            pq.write_table(sendable, tmp)
    shards_dir, good_dir, fail_dir = work / "shards", work / "good", work / "failures"
    pending = sendable.num_rows > 0 and (
        len(_done_shards(shards_dir)) if shards_dir.exists() else 0
    ) < -(-sendable.num_rows // int(opts["shard_size"]))
    if pending:
        preflight(name, path, sendable["url"].to_pylist()[:1000], float(opts["preflight_timeout"]))
    source = f"dataset '{name}' (URL list {path})"
    fetched, total = (
        fetch_shards(urls_file, shards_dir, opts, source) if sendable.num_rows else (0, 0)
    )
    good_dir.mkdir(exist_ok=True)
    fail_dir.mkdir(exist_ok=True)
    for shard_id in sorted(_done_shards(shards_dir)):
        _convert_shard(shards_dir, shard_id, good_dir, fail_dir)

    failures = pa.concat_tables(
        [pa.table(invalid, schema=_FAILURE_SCHEMA)]
        + [pq.read_table(f, schema=_FAILURE_SCHEMA) for f in sorted(fail_dir.glob("*.parquet"))]
    ).sort_by("row")
    n_good = sum(pq.read_metadata(f).num_rows for f in good_dir.glob("good-*.parquet"))
    reasons = dict(sorted(Counter(failures["reason"].to_pylist()).items()))
    stats: dict[str, Any] = {
        "dataset": name, "url_list": str(path), "rows": table.num_rows, "succeeded": n_good,
        "failed": failures.num_rows, "failures": reasons,
        "shards": {"total": total, "fetched": fetched, "reused": total - fetched},
    }
    if n_good + failures.num_rows != table.num_rows:
        raise DownloadError(f"dataset '{name}': {n_good} rows fetched + {failures.num_rows} "
                            f"failed != {table.num_rows} rows in {path} (work dir {work})")
    if n_good == 0:
        raise DownloadError(f"dataset '{name}': no image of {path} could be fetched: all "
                            f"{table.num_rows} rows failed ({reasons}); see {fail_dir}")
    norm_spec = {k: v for k, v in spec.items() if k != "download"}
    norm_spec.update(source=f"local:{good_dir}", format="url_captions",
                     cache_dir=str(work / "cache"))
    dsd = load_source(name, norm_spec, seed=seed)
    stats["splits"] = {s: len(ds) for s, ds in dsd.items()}
    stats["seconds"] = round(time.monotonic() - t0, 3)
    with atomic_path(out, is_dir=True) as tmp:
        save_dataset(dsd, tmp)
        pq.write_table(failures, tmp / FAILURES_FILE)
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    # The output holds the images now: keep only the fetched shards (a rerun, e.g. with other
    # splits, converts them again without a request), not a second and third copy.
    for d in (work / "cache", good_dir, fail_dir):
        shutil.rmtree(d, ignore_errors=True)
    log.info("dataset %s: %d of %d rows fetched, failures %s, splits %s", name, n_good,
             table.num_rows, reasons, stats["splits"])
    return stats


def main(argv: list[str] | None = None) -> int:
    """``python -m vlalign.data.download --name N --params JSON --work DIR --out DIR``."""
    ap = argparse.ArgumentParser(prog="python -m vlalign.data.download", description=__doc__
                                 .split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--params", required=True, help='{"spec": {...}, "seed": int}')
    ap.add_argument("--work", required=True, help="resumable work dir (fetched shards)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    params = json.loads(args.params)
    try:
        download_dataset(args.name, params["spec"], args.out, args.work,
                         seed=int(params.get("seed", 0)))
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
