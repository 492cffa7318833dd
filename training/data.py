"""The bundled model's training data: the standard library plus pinned, permissively licensed packages.

Sources (training/packages.json, the data manifest):
- the `.py` files of this interpreter's CPython standard library, tests included (PSF licence),
  split by file as before (a hash of the relative path), so the old held-out files stay held out;
- the source distributions of a fixed list of packages from PyPI, each pinned by name, version,
  file name and sha256, with its licence. A package's files all go to training or all to the
  held-out set, chosen by a hash of its name.

Rules applied to every file, in this order:
- only `.py` files that decode as UTF-8; vendored copies of other projects (`_vendor/`,
  `vendored/`, `_vendored/`, `extern/`) are skipped: they are other packages, with their own
  licences, and duplicates;
- generated or data-like files are skipped: over 300 KB, a line over 1,000 characters, or a mean
  line length over 100;
- exact duplicates (after stripping trailing whitespace) are dropped; the held-out set is read
  first, so a file that is also in a training package stays only in the held-out set.

    python training/data.py build [--cache DIR] [--out DIR]    # downloads what is missing, writes the corpus
    python training/data.py pin NAME==VERSION ...               # add or update manifest entries (PyPI JSON)

The corpus (not committed): OUT/train.jsonl and OUT/held_out.jsonl, one {"source", "path",
"text"} per line, and OUT/corpus.json with the counts and each split's sha256. Downloading is
the only network use, and every archive is checked against its pinned sha256 before it is read.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

# the split rules, shared with the quality measurements (diffucode.heldout)
from diffucode import heldout
from diffucode.heldout import DEFAULT_HOME, Doc, decode, package_held_out, stdlib_docs

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "packages.json"

VENDORED = {"_vendor", "vendor", "vendored", "_vendored", "extern", "_extern"}
MAX_BYTES = 300_000
MAX_LINE = 1_000
MAX_MEAN_LINE = 100


def manifest(path: Path = MANIFEST) -> dict:
    return json.loads(path.read_text())


def manifest_sha256(path: Path = MANIFEST) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def skip_reason(path: str, text: str) -> str | None:
    """Why a file is left out, or None to keep it."""
    parts = set(Path(path).parts)
    if VENDORED & parts:
        return "vendored"
    if len(text.encode()) > MAX_BYTES:
        return "large"
    lines = text.split("\n")
    if max(len(l) for l in lines) > MAX_LINE or len(text) / len(lines) > MAX_MEAN_LINE:
        return "data-like"
    return None


def archive_members(data: bytes, filename: str):
    """(path, bytes) of every .py file in an sdist (.tar.gz) or wheel/zip, the top folder removed."""
    if filename.endswith((".tar.gz", ".tgz")):
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".py"):
                    yield m.name.split("/", 1)[-1], tar.extractfile(m).read()
    elif filename.endswith((".zip", ".whl")):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                if name.endswith(".py"):
                    yield name.split("/", 1)[-1] if filename.endswith(".zip") else name, z.read(name)
    else:
        raise SystemExit(f"{filename}: unknown archive type (expected .tar.gz, .zip or .whl)")


def fetch(entry: dict, cache: Path) -> bytes:
    """The archive's bytes, downloaded once into the cache and checked against the pinned sha256."""
    path = cache / entry["filename"]
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {entry['filename']} ({entry['size'] / 1e6:.1f} MB)", file=sys.stderr)
        with urllib.request.urlopen(entry["url"], timeout=120) as r:
            data = r.read()
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise SystemExit(f"{path}: sha256 {digest} is not the pinned {entry['sha256']}; delete it and retry")
    return data


def _key(text: str) -> str:
    return hashlib.sha256("\n".join(l.rstrip() for l in text.split("\n")).encode()).hexdigest()


def build(cache: Path, out: Path, manifest_path: Path = MANIFEST, stdlib: bool = True) -> dict:
    """Download what is missing, then write the two splits and corpus.json to out.
    (stdlib=False leaves the standard library out: for tests.)"""
    m = manifest(manifest_path)
    want = m["stdlib"]["python"]
    have = ".".join(map(str, sys.version_info[:3]))
    if have != want:
        print(f"warning: the manifest's standard library is Python {want}'s; this is {have}: "
              f"the corpus will differ from the recorded one", file=sys.stderr)
    sources: list[tuple[bool, Doc]] = stdlib_docs() if stdlib else []
    for entry in m["packages"]:
        held = package_held_out(entry["name"])
        for path, data in archive_members(fetch(entry, cache / "archives"), entry["filename"]):
            text = decode(data)
            if text is not None:
                sources.append((held, Doc(entry["name"], path, text)))
    seen: set[str] = set()
    splits: dict[str, list[Doc]] = {"held_out": [], "train": []}
    skipped: dict[str, int] = {"duplicate": 0, "vendored": 0, "large": 0, "data-like": 0, "empty": 0}
    for held in (True, False):  # held-out first: a duplicate stays only there
        for h, doc in sources:
            if h != held:
                continue
            if not doc.text.strip():
                skipped["empty"] += 1
                continue
            reason = skip_reason(doc.path, doc.text)
            if reason:
                skipped[reason] += 1
                continue
            k = _key(doc.text)
            if k in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(k)
            splits["held_out" if held else "train"].append(doc)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"manifest_sha256": manifest_sha256(manifest_path), "python": have, "skipped": skipped,
               "licences": {**({"stdlib": m["stdlib"]["licence"]} if stdlib else {}),
                            **{e["name"]: f"{e['licence']} ({e['name']} {e['version']})" for e in m["packages"]}},
               "splits": {}}
    for name, docs in splits.items():
        h = hashlib.sha256()
        with open(out / f"{name}.jsonl", "w") as f:
            for d in docs:
                line = json.dumps({"source": d.source, "path": d.path, "text": d.text})
                f.write(line + "\n")
                h.update(line.encode() + b"\n")
        per_source: dict[str, int] = {}
        for d in docs:
            per_source[d.source] = per_source.get(d.source, 0) + 1
        summary["splits"][name] = {"files": len(docs), "bytes": sum(len(d.text.encode()) for d in docs),
                                   "sha256": h.hexdigest(), "sources": per_source}
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def read_split(corpus: Path, split: str) -> list[Doc]:
    try:
        return heldout.read_split(corpus, split)
    except FileNotFoundError as e:
        raise SystemExit(str(e))


def pin(specs: list[str]) -> None:
    """Add or update manifest entries from PyPI's JSON API: the sdist of NAME==VERSION."""
    m = manifest()
    by_name = {e["name"]: e for e in m["packages"]}
    for spec in specs:
        name, _, version = spec.partition("==")
        if not version:
            raise SystemExit(f"{spec!r}: give NAME==VERSION")
        try:
            with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as r:
                d = json.load(r)
        except OSError as e:
            raise SystemExit(f"{spec}: PyPI does not answer for {name!r} ({e})")
        if version not in d["releases"]:
            raise SystemExit(f"{spec}: PyPI has no release {version} of {name}")
        sdists = [u for u in d["releases"][version] if u["packagetype"] == "sdist"]
        if not sdists:
            raise SystemExit(f"{spec}: no source distribution on PyPI")
        u, info = sdists[0], d["info"]
        licence = info.get("license_expression") or next(
            (c.split("::")[-1].strip() for c in info.get("classifiers", []) if c.startswith("License ::")), None) \
            or (info.get("license") or "").split("\n")[0][:80]
        url = u["url"]
        if "://" not in url:  # a mirror's relative link: the file's canonical address
            url = "https://files.pythonhosted.org/packages/" + url.split("packages/", 2)[-1]
        by_name[name] = {"name": name, "version": version, "filename": u["filename"], "url": url,
                         "sha256": u["digests"]["sha256"], "size": u["size"], "licence": licence}
    m["packages"] = sorted(by_name.values(), key=lambda e: e["name"].lower())
    MANIFEST.write_text(json.dumps(m, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download what is missing and write the corpus")
    b.add_argument("--cache", type=Path, default=DEFAULT_HOME, help=f"archives go to CACHE/archives ({DEFAULT_HOME})")
    b.add_argument("--out", type=Path, default=DEFAULT_HOME / "corpus")
    p = sub.add_parser("pin", help="add or update packages in the manifest (uses PyPI)")
    p.add_argument("specs", nargs="+", metavar="NAME==VERSION")
    args = ap.parse_args()
    if args.cmd == "pin":
        pin(args.specs)
        return 0
    summary = build(args.cache, args.out)
    for name, s in summary["splits"].items():
        print(f"{name}: {s['files']} files, {s['bytes'] / 1e6:.1f} MB from {len(s['sources'])} sources", file=sys.stderr)
    print(f"skipped: {summary['skipped']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
