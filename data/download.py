"""Downloads the challenge's shards and tokenizers from the Hugging Face hub (the `download` command).

What to fetch comes from the hub repo's `datasets/manifest.json`. Files land in the SPEC layout:
`<out>/datasets/<dataset dir>/fineweb_{train,val}_%06d.bin` and `<out>/tokenizers/<name>.model`.
The hub is probed first with a short timeout, so an offline machine fails in about a second
instead of after huggingface_hub's retries.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .shards import ShardError, read_header

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST = "datasets/manifest.json"
SHARD_NAME = re.compile(r"fineweb_(train|val|val_bytes)_\d{6}\.bin")


class DownloadError(RuntimeError):
    """A download that cannot proceed; the message is one line meant for the user."""


@dataclass(frozen=True)
class Variant:
    repo: str
    dataset: str  # shard folder name, in the repo and locally
    tokenizer: str  # tokenizer file stem


VARIANTS = {
    "sp1024": Variant("willdepueoai/parameter-golf", "fineweb10B_sp1024", "fineweb_1024_bpe"),
    "sp4096": Variant("kevclark/parameter-golf", "fineweb10B_sp4096", "fineweb_4096_bpe"),
    "sp8192": Variant("kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb_8192_bpe"),
    # Kept under its own names so it cannot be mixed up with the plain SP8192 files.
    "caseops-sp8192": Variant("romeerp/parameter-golf-caseops-v1",
                              "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                              "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"),
}

PATH_KEYS = ("path", "rfilename", "filename", "name")
SIZE_KEYS = ("size", "bytes", "num_bytes")


def parse_manifest(doc) -> list[tuple[str, int | None]]:
    """(path, size or None) of each file a manifest lists; paths are relative to the manifest's folder.

    Expected shape: {"files": [{"path": "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
    "size": 125829144}, ...]}. Also accepted: a bare list instead of {"files": [...]}; entries that
    are plain path strings; "rfilename"/"filename"/"name" for "path" and "bytes"/"num_bytes" for
    "size"; and the official export's {"datasets": [{"name": ..., "stats": {"files_train": N,
    "files_val": M}}], "tokenizers": [{"model_path": ..., "vocab_path": ...}]}, expanded to paths.
    """
    if isinstance(doc, dict) and "files" not in doc and ("datasets" in doc or "tokenizers" in doc):
        entries = []
        for ds in doc.get("datasets") or []:
            stats = ds.get("stats") or {}
            for split in ("train", "val"):
                count = int(stats.get(f"files_{split}") or 0)
                entries += [f"datasets/{ds['name']}/fineweb_{split}_{i:06d}.bin" for i in range(count)]
        for t in doc.get("tokenizers") or []:
            entries += [t[k] for k in ("model_path", "vocab_path", "path") if t.get(k)]
    else:
        entries = doc.get("files") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise DownloadError("manifest: expected a list of file entries (or {\"files\": [...]})")
    files = []
    for e in entries:
        path = e if isinstance(e, str) else next(
            (e[k] for k in PATH_KEYS if isinstance(e, dict) and isinstance(e.get(k), str)), None)
        size = next((e[k] for k in SIZE_KEYS if isinstance(e.get(k), int)), None) if isinstance(e, dict) else None
        if path is None:
            raise DownloadError(f"manifest: entry {e!r} has no path (expected one of {PATH_KEYS})")
        files.append((path.lstrip("/"), size))
    return files


@dataclass(frozen=True)
class Planned:
    remote: str  # path in the hub repo
    local: Path
    size: int | None


def plan(files: list[tuple[str, int | None]], variant: Variant, out: Path,
         train_shards: int | None) -> list[Planned]:
    """The variant's val shards (all), first `train_shards` train shards and tokenizer files."""
    base = posixpath.dirname(MANIFEST)
    shards, tokenizers = {}, {}
    for path, size in files:
        p = posixpath.normpath(path)
        name, parent = posixpath.basename(p), posixpath.basename(posixpath.dirname(p))
        remote = posixpath.join(base, p)
        if parent == variant.dataset and SHARD_NAME.fullmatch(name):
            shards[name] = Planned(remote, out / "datasets" / variant.dataset / name, size)
        elif name in (variant.tokenizer + ".model", variant.tokenizer + ".vocab"):
            tokenizers[name] = Planned(remote, out / "tokenizers" / name, size)
    train = [shards[n] for n in sorted(shards) if n.startswith("fineweb_train_")]
    val = [shards[n] for n in sorted(shards) if n.startswith("fineweb_val_")]
    if not train and not val:
        raise DownloadError(f"{variant.repo}/{MANIFEST} lists no shards under {variant.dataset}/")
    if variant.tokenizer + ".model" not in tokenizers:
        raise DownloadError(f"{variant.repo}/{MANIFEST} lists no {variant.tokenizer}.model")
    if train_shards is not None:
        if train_shards > len(train):
            print(f"note: {variant.repo} lists {len(train)} train shards for {variant.dataset}; "
                  f"fetching all of them (--train-shards {train_shards})")
        train = train[:train_shards]
    return val + train + [tokenizers[n] for n in sorted(tokenizers)]


def is_present(p: Planned) -> bool:
    """Present with the manifest's size; without a size, a .bin must at least pass the header check."""
    if not p.local.is_file():
        return False
    if p.size is not None:
        return p.local.stat().st_size == p.size
    if p.local.suffix == ".bin":
        try:
            read_header(p.local)
        except ShardError:
            return False
    return p.local.stat().st_size > 0


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def probe(url: str, timeout: float) -> None:
    """Fails fast when nothing answers at `url`; any HTTP answer, even an error status, is fine.

    Runs in a thread so a hanging DNS lookup (not covered by socket timeouts) is bounded too."""
    outcome: dict = {}

    def run():
        try:
            urllib.request.urlopen(urllib.request.Request(url + "/", method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass
        except Exception as e:  # URLError, timeouts, resets: nothing usable answered
            outcome["error"] = getattr(e, "reason", e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout + 0.2)
    if thread.is_alive():
        outcome["error"] = f"no answer within {timeout:g} s"
    if "error" in outcome:
        raise DownloadError(f"cannot reach the Hugging Face hub at {url} ({outcome['error']}); "
                            "check the network or HF_ENDPOINT (offline: use data/sample or "
                            "`python -m data benchmark-set`)")


def fetch(repo: str, remote: str, staging: Path, revision: str) -> Path:
    """One file through huggingface_hub into the staging folder."""
    from huggingface_hub import hf_hub_download  # slow import: only once the hub answered

    try:
        return Path(hf_hub_download(repo, remote, repo_type="dataset", revision=revision,
                                    local_dir=staging, endpoint=endpoint()))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise DownloadError(f"downloading {remote} from {endpoint()} ({repo}) failed: "
                            f"{type(e).__name__}: {first}") from None


def download(variant_name: str = "sp1024", out: str | Path = ".", train_shards: int | None = None,
             revision: str = "main", probe_timeout: float = 1.2, log=print) -> list[Path]:
    """Fetches a variant's files; returns their local paths. Files already present are skipped."""
    if variant_name not in VARIANTS:
        raise DownloadError(f"unknown variant {variant_name!r}; expected one of {', '.join(VARIANTS)}")
    if train_shards is not None and train_shards < 0:
        raise DownloadError(f"--train-shards must be >= 0, got {train_shards}")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DownloadError("HF_HUB_OFFLINE is set, so nothing can be downloaded (unset it to download)")
    variant, out = VARIANTS[variant_name], Path(out)
    probe(endpoint(), probe_timeout)
    # Staging inside datasets/ (git-ignored); files are then renamed into place. It is kept after a
    # failure so huggingface_hub can resume a partial file on the next run.
    staging = out / "datasets" / ".hf_download"
    manifest_path = fetch(variant.repo, MANIFEST, staging, revision)
    try:
        files = parse_manifest(json.loads(manifest_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise DownloadError(f"{variant.repo}/{MANIFEST} is not valid JSON ({e})") from None
    todo = plan(files, variant, out, train_shards)
    for i, p in enumerate(todo, 1):
        if is_present(p):
            log(f"[{i}/{len(todo)}] present: {p.local}")
            continue
        log(f"[{i}/{len(todo)}] fetching {p.remote}" + (f" ({p.size:,} bytes)" if p.size else ""))
        got = fetch(variant.repo, p.remote, staging, revision)
        if p.size is not None and got.stat().st_size != p.size:
            raise DownloadError(f"{p.remote}: got {got.stat().st_size:,} bytes, manifest says {p.size:,}")
        if got.suffix == ".bin":
            try:
                read_header(got)
            except ShardError as e:
                raise DownloadError(f"downloaded file is not a valid shard: {e}") from None
        p.local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, p.local)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"{variant_name}: {len(todo)} files in {out / 'datasets' / variant.dataset} and {out / 'tokenizers'}")
    return [p.local for p in todo]
