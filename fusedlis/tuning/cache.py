"""The persistent JSON tuning cache: where it lives, how it is read, and how writers merge into it.

File layout (``version`` 1)::

    {"format": "fusedlis-tuning", "version": 1,
     "devices": {"<fingerprint id>": {"fingerprint": {...},
                                      "entries": {"<op>": {"<key string>": {"key": {...}, "config": {...},
                                                                           "time_us": ..., ...}}}}}}

Writers (`merge_entries`) take an exclusive ``fcntl`` lock on ``<file>.lock``, re-read the file, merge
their entries (newer wins per op and key), write a temporary file in the same folder and ``os.replace``
it over the old one: readers never see a half-written file, and ranks writing at once never lose each
other's entries. Readers (`load`) take no lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fusedlis.tuning import fingerprint as _fp
from fusedlis.tuning.keys import key_string, normalize_key

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

FORMAT = "fusedlis-tuning"
VERSION = 1
FILE_NAME = "tuning.json"


class TuningCacheWarning(UserWarning):
    """The tuning cache could not be used (corrupt, stale or foreign); default configs are used instead."""


class CacheFormatError(ValueError):
    """The file is not a fusedlis tuning cache of a supported version."""


def cache_dir() -> Path:
    """``$FUSEDLIS_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedlis``, else ``~/.cache/fusedlis``
    (shared with the rest of fusedlis through `fusedlis.paths.cache_dir`)."""
    from fusedlis.paths import cache_dir as _shared

    return _shared().expanduser()


def default_path() -> Path:
    """The file `lookup` reads: ``$FUSEDLIS_TUNING_FILE`` if set, else ``cache_dir()/tuning.json``."""
    if os.environ.get("FUSEDLIS_TUNING_FILE"):
        return Path(os.environ["FUSEDLIS_TUNING_FILE"]).expanduser()
    return cache_dir() / FILE_NAME


def empty() -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "devices": {}}


def validate(data: Any) -> dict[str, Any]:
    """Check the structure of a parsed cache; returns it or raises `CacheFormatError`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheFormatError("not a fusedlis tuning cache (missing format tag)")
    if data.get("version") != VERSION:
        raise CacheFormatError(f"cache version {data.get('version')!r}, this fusedlis reads {VERSION}")
    devices = data.get("devices")
    if not isinstance(devices, dict):
        raise CacheFormatError("'devices' is not an object")
    for fid, sec in devices.items():
        if not isinstance(sec, dict) or not isinstance(sec.get("fingerprint"), dict):
            raise CacheFormatError(f"device section {fid!r} has no fingerprint")
        ents = sec.get("entries")
        if not isinstance(ents, dict):
            raise CacheFormatError(f"device section {fid!r} has no entries object")
        for op, per_op in ents.items():
            if not isinstance(per_op, dict):
                raise CacheFormatError(f"entries of op {op!r} is not an object")
            for k, e in per_op.items():
                if not isinstance(e, dict) or not isinstance(e.get("config"), dict) or not isinstance(e.get("key"), dict):
                    raise CacheFormatError(f"entry {op}/{k} lacks 'key' or 'config' objects")
    return data


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate a cache file. Missing file -> empty cache; bad file -> `CacheFormatError`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return empty()
    except OSError as e:
        raise CacheFormatError(f"cannot read {p}: {e}") from e
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{p} is not valid JSON: {e}") from e
    return validate(data)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _atomic_write(path: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_entry(op: str, key: Mapping[str, Any], config: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """One cache entry: the normalised `key`, the `config`, and any extra JSON-able `fields` (times, meta)."""
    norm = normalize_key(key)
    entry = {"op": op, "key": dict(norm), "config": dict(config)}
    entry.update(fields)
    entry.setdefault("tuned_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    json.dumps(entry)  # fail here, not half-way through a write, if something is not JSON-able
    return entry


def merge_entries(
    entries: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str] | None = None,
    fp: Mapping[str, Any] | None = None,
) -> Path:
    """Merge `entries` (from `make_entry`) into the cache at `path` under fingerprint `fp`; returns the path.

    Safe with many processes writing at once (file lock + atomic replace). A corrupt existing file is kept
    as ``<file>.corrupt`` and replaced, with one warning.
    """
    p = Path(path) if path is not None else default_path()
    fpd = dict(fp) if fp is not None else _fp.current()
    fid = _fp.fingerprint_id(fpd)
    entries = list(entries)
    with _locked(p):
        try:
            data = read(p)
        except CacheFormatError as e:
            warnings.warn(f"tuning cache {p} unusable ({e}); moved to {p.name}.corrupt, writing a new one",
                          TuningCacheWarning, stacklevel=2)
            with contextlib.suppress(OSError):
                os.replace(p, p.with_name(p.name + ".corrupt"))
            data = empty()
        sec = data["devices"].setdefault(fid, {"fingerprint": fpd, "entries": {}})
        sec["fingerprint"] = fpd
        for e in entries:
            op = e["op"]
            sec["entries"].setdefault(op, {})[key_string(e["key"])] = dict(e)
        _atomic_write(p, data)
    from fusedlis.tuning import _lookup

    _lookup.invalidate()
    return p


def iter_entries(data: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], str, str, dict[str, Any]]]:
    """Yield (fingerprint, op, key string, entry) for every entry of a parsed cache."""
    for sec in data.get("devices", {}).values():
        for op, per_op in sec.get("entries", {}).items():
            for ks, e in per_op.items():
                yield sec["fingerprint"], op, ks, e
