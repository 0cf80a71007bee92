"""Deterministic test objects for the lab's HTTP servers, generated once into a shared cache.

The objects live in ``/var/tmp/appliance-docroot/`` (override with the environment variable
``APPLIANCE_DOCROOT``) and are named ``obj-<size>``, the size written as ``size_name()`` writes
it (``1k`` = 1024 bytes, ``10m`` = 10 MiB, plain bytes otherwise). The content of ``obj-N`` is
the concatenation, for MiB chunk index i = 0, 1, ..., of
``hashlib.shake_128(f"appliance-object:{name}:{i}".encode()).digest(1 MiB)``, truncated to the
size: reproducible anywhere, and no repeating pattern that could hide an off-by-N offset.

Every file gets the fixed mtime ``MTIME`` (1_700_000_000), so its ETag (``"<mtime hex>-<size
hex>"``, nginx's format) and Last-Modified are the same on every replica and in every run.
``manifest.json`` in the cache dir maps name -> {size, sha256}; a later run trusts an entry
whose file has the recorded size (and resets the mtime if it drifted) instead of re-hashing.
Generation holds an flock on ``.lock`` in the cache dir, so concurrent processes are safe.

    from appliance import docroot
    objs = docroot.ensure()                 # {"/obj-1k": (1024, "<sha256 hex>"), ...}
    docroot.ensure(["4k", 65536])           # sizes as names or ints
    docroot.object_path("10m")              # Path("/var/tmp/appliance-docroot/obj-10m")
    docroot.parse_size("10m") == 10485760; docroot.size_name(10485760) == "10m"
    docroot.copy_to("/var/tmp/x/a", ["1k"])  # real copies (own inodes, mtime MTIME) of the objects

``copy_to`` gives a directory its own copy of the objects (the lab's ``docroot="copy"``): a
data copy per file (no hard link: a distinct inode, so an inode-based ETag differs), same bytes
and mtime ``MTIME``, so the mtime/size-based validators match the shared cache's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

DEFAULT_DIR = "/var/tmp/appliance-docroot"
DEFAULT_SIZES = ("1k", "10k", "100k", "1m", "10m", "20m", "100m")
MTIME = 1_700_000_000
CHUNK = 1024 * 1024
MANIFEST = "manifest.json"

_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024, "g": 1024 * 1024 * 1024}


def docroot_dir() -> Path:
    return Path(os.environ.get("APPLIANCE_DOCROOT") or DEFAULT_DIR)


def parse_size(size) -> int:
    """"10m" -> 10485760, "1k" -> 1024, "512" -> 512, 4096 -> 4096. ValueError otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise ValueError(f"negative object size: {size}")
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([kmgKMG]?)\s*", str(size))
    if not m:
        raise ValueError(f"bad object size {size!r} (want e.g. 1k, 10m, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def size_name(size) -> str:
    """10485760 -> "10m", 1024 -> "1k", 1000 -> "1000" (the largest unit that divides exactly)."""
    n = parse_size(size)
    for unit, mult in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def object_name(size) -> str:
    return f"obj-{size_name(size)}"


def object_path(size) -> Path:
    return docroot_dir() / object_name(size)


def generate_chunks(name: str, size: int):
    """Yield the content of object `name` of `size` bytes, one MiB chunk at a time."""
    index = 0
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield hashlib.shake_128(f"appliance-object:{name}:{index}".encode()).digest(CHUNK)[:n]
        left -= n
        index += 1


def expected_bytes(size, start: int = 0, end: int | None = None) -> bytes:
    """Bytes [start, end) of obj-<size>, computed without the file (for tests)."""
    n = parse_size(size)
    name = object_name(n)
    end = n if end is None else min(end, n)
    out = bytearray()
    for index in range(start // CHUNK, (max(end, 1) - 1) // CHUNK + 1):
        chunk = hashlib.shake_128(f"appliance-object:{name}:{index}".encode()).digest(CHUNK)
        lo = max(start - index * CHUNK, 0)
        hi = min(end - index * CHUNK, CHUNK)
        if hi > lo:
            out += chunk[lo:hi]
    return bytes(out)


def _read_manifest(root: Path) -> dict:
    try:
        data = json.loads((root / MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / (MANIFEST + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)


def _generate(root: Path, name: str, size: int) -> str:
    tmp = root / f".{name}.tmp{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in generate_chunks(name, size):
                digest.update(chunk)
                f.write(chunk)
        os.chmod(tmp, 0o644)
        os.utime(tmp, (MTIME, MTIME))
        os.replace(tmp, root / name)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest.hexdigest()


def ensure(sizes=DEFAULT_SIZES) -> dict:
    """Make sure obj-<size> exists for every size; returns {"/obj-<size>": (size, sha256hex)}."""
    root = docroot_dir()
    root.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(root, 0o755)
    except PermissionError:
        pass
    wanted = {object_name(s): parse_size(s) for s in sizes}
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _read_manifest(root)
        changed = False
        result = {}
        for name, size in sorted(wanted.items(), key=lambda kv: kv[1]):
            path = root / name
            entry = manifest.get(name)
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            ok = (isinstance(entry, dict) and entry.get("size") == size and isinstance(entry.get("sha256"), str)
                  and st is not None and st.st_size == size)
            if ok:
                if int(st.st_mtime) != MTIME or st.st_mtime != int(st.st_mtime):
                    os.utime(path, (MTIME, MTIME))
                sha = entry["sha256"]
            else:
                sha = _generate(root, name, size)
                manifest[name] = {"size": size, "sha256": sha}
                changed = True
            result["/" + name] = (size, sha)
        if changed:
            _write_manifest(root, manifest)
    return result


def copy_to(dest, sizes=DEFAULT_SIZES) -> dict:
    """Copy obj-<size> for every size from the cache into directory `dest` (created if needed).

    Each file is a real copy (its own inode; written to a temporary name, then renamed), mode
    0644, mtime MTIME. Returns ensure()'s manifest {"/obj-<size>": (size, sha256hex)}.
    """
    objs = ensure(sizes)
    root = docroot_dir()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    for path, (size, _sha) in objs.items():
        name = path.lstrip("/")
        tmp = dest / f".{name}.tmp{os.getpid()}"
        try:
            shutil.copyfile(root / name, tmp)  # the bytes (sendfile in the kernel), never a link
            if tmp.stat().st_size != size:
                raise OSError(f"copy of {root / name} to {dest}: {tmp.stat().st_size} bytes, want {size}")
            os.chmod(tmp, 0o644)
            os.utime(tmp, (MTIME, MTIME))
            os.replace(tmp, dest / name)
        finally:
            if tmp.exists():
                tmp.unlink()
    return objs


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m appliance.docroot", description="generate the lab's test objects")
    p.add_argument("sizes", nargs="*", default=list(DEFAULT_SIZES), help="sizes like 1k 10m (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        objs = ensure(args.sizes)
    except ValueError as exc:
        p.error(str(exc))
    for path, (size, sha) in objs.items():
        print(f"{docroot_dir()}{path}\t{size}\t{sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
