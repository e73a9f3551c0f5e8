"""The studios data set: the same emoji concepts drawn by five studios, each in its own
style and under its own licence, from pinned npm packages (`npm.py`; nothing else is
downloaded).

Studios (contributors) and where their artwork comes from:
  google         Noto Emoji      `emoji-datasource-google`  sheets-clean/32.png  Apache-2.0
  twitter        Twemoji         `emoji-datasource-twitter` sheets-clean/32.png  CC-BY-4.0
  openmoji       OpenMoji        `openmoji`                 color/svg            CC-BY-SA-4.0
  fluent-flat    Fluent Emoji    `fluentui-emoji`           icons/flat (SVG)     MIT
  fluent-modern  Fluent Emoji    `fluentui-emoji`           icons/modern (SVG)   MIT
plus `copycat`, planted: degraded copies (blurred, JPEG-crushed, colour-shifted) of a
share of twitter's artwork, re-uploaded as its own. A platform must not pay it.

Not used: Apple's artwork (its package's README: not licensed for commercial use),
Facebook's (no clear licence), EmojiOne (not an open licence); `@twemoji/svg` is the
same artwork as twitter's.

Concepts are `emoji-datasource`'s top-level entries (no skin-tone variants) outside the
"Component" category; the label is the category (9). A caption is OpenMoji's CLDR
annotation ("red apple", "flag: Japan"), else the Unicode name. Sprite cells are
32x32 at x = sheet_x*34+1, y = sheet_y*34+1 (the clean sheets hold only the vendor's
own art); SVGs are rasterized at 32x32 by resvg; everything is composited on white.

Split by concept (seeded), so held-out concepts are drawn by no shard:
  heldout/<label>/     HELDOUT_FRACTION of the concepts, every studio: evaluation only
  public/<label>/      PUBLIC_FRACTION of the concepts, every studio: the platform's
                       licensed split (each licence allows it), owned by no contributor;
                       the LoRA shards' base and the router's reference
  contributors/<studio>/<label>/   the rest
Each of those folders has a captions.csv (file relative to the folder, caption).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from . import npm
from .errors import DataError
from .files import building

META = "emoji-datasource"
SHEET_CELL, SHEET_SIZE = 34, 32
HELDOUT_FRACTION, PUBLIC_FRACTION = 0.10, 0.10
COPYCAT, COPIED, COPY_FRACTION = "copycat", "twitter", 0.3
SIZES = (16, 32)


@dataclass(frozen=True)
class Studio:
    package: str
    source: str  # "sheet:<vendor>", "openmoji" or "fluent:<style>"
    licence: str
    attribution: str


STUDIOS = {
    "google": Studio("emoji-datasource-google", "sheet:google", "Apache-2.0",
                     "Noto Emoji by Google, Apache License 2.0"),
    "twitter": Studio("emoji-datasource-twitter", "sheet:twitter", "CC-BY-4.0",
                      "Twemoji by Twitter, Inc and other contributors, CC-BY 4.0"),
    "openmoji": Studio("openmoji", "openmoji", "CC-BY-SA-4.0",
                       "OpenMoji, the open-source emoji and icon project, CC BY-SA 4.0"),
    "fluent-flat": Studio("fluentui-emoji", "fluent:flat", "MIT",
                          "Fluent Emoji (flat) by Microsoft, MIT License"),
    "fluent-modern": Studio("fluentui-emoji", "fluent:modern", "MIT",
                            "Fluent Emoji (modern) by Microsoft, MIT License"),
}
# what the planted uploader claims: its "own" work, under a licence of its choosing
COPYCAT_CLAIM = Studio(STUDIOS[COPIED].package, STUDIOS[COPIED].source, "CC0-1.0",
                       "Uploads by copycat (claimed as its own work, CC0)")
EXCLUDED = {
    "apple": "Apple's artwork is not licensed for commercial use (emoji-datasource-apple's README)",
    "facebook": "Facebook's artwork has no clear licence (emoji-datasource-facebook's README)",
    "emojione": "EmojiOne's artwork is not under an open licence",
}


@dataclass(frozen=True)
class Concept:
    unified: str
    label: int
    category: str
    subcategory: str
    caption: str
    sheet: tuple[int, int]
    vendors: frozenset[str]  # sprite-sheet vendors that drew it
    openmoji: str | None  # OpenMoji's hexcode (its file name), if it drew it


def _key(hexcode: str) -> str:
    return hexcode.upper().replace("-FE0F", "")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("’", "").replace("'", "")).strip("-")


def concepts(packages: Path | None = None) -> tuple[list[str], list[Concept]]:
    """(category names, index = label; the concepts), from the pinned metadata."""
    meta = dict(npm.read_members(npm.tarball(META, packages),
                                 lambda p: p in ("emoji.json", "categories.json")))
    names = [c for c in json.loads(meta["categories.json"]) if c != "Component"]
    annotations, hexcodes = {}, {}
    for entry in json.loads(_openmoji_meta(packages)):
        if not entry.get("skintone") and not entry["group"].startswith("extras"):
            annotations[_key(entry["hexcode"])] = entry["annotation"]
            hexcodes[_key(entry["hexcode"])] = entry["hexcode"]
    found = []
    for e in json.loads(meta["emoji.json"]):
        if e["category"] not in names:
            continue
        vendors = frozenset(v for v in ("google", "twitter") if e.get(f"has_img_{v}"))
        caption = annotations.get(_key(e["unified"])) or e["name"].lower()
        found.append(Concept(e["unified"], names.index(e["category"]), e["category"],
                             e["subcategory"], caption, (e["sheet_x"], e["sheet_y"]), vendors,
                             hexcodes.get(_key(e["unified"]))))
    return names, sorted(found, key=lambda c: c.unified)


def _openmoji_meta(packages: Path | None) -> bytes:
    for _, data in npm.read_members(npm.tarball("openmoji", packages),
                                    lambda p: p == "data/openmoji.json"):
        return data
    raise DataError("npm package openmoji: data/openmoji.json is missing")


def on_white(image: Image.Image) -> Image.Image:
    """An RGBA/LA/P/RGB image composited on white, as RGB."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def rasterize(svg: bytes, what: str, size: int = SHEET_SIZE) -> Image.Image:
    """An SVG rendered at size x size by resvg, on white (a drawing that is not square
    is fitted inside and centred).

    Raises:
        DataError: naming `what`, when the SVG does not parse or render.
    """
    import resvg_py

    try:
        png = resvg_py.svg_to_bytes(svg_string=svg.decode("utf-8"), width=size, height=size)
        image = on_white(Image.open(io.BytesIO(bytes(png))))
    except Exception as err:  # resvg raises plain exceptions for unparsable SVG
        raise DataError(f"{what}: the SVG does not rasterize ({str(err)[:120]})") from None
    if image.size != (size, size):
        image = ImageOps.pad(image, (size, size), method=Image.Resampling.LANCZOS,
                             color=(255, 255, 255))
    return image


def render(studio: str, wanted: list[Concept], packages: Path | None = None
           ) -> dict[str, Image.Image]:
    """unified -> the studio's 32x32 RGB drawing of each wanted concept it drew."""
    spec = STUDIOS[studio]
    path = npm.tarball(spec.package, packages)
    kind, _, arg = spec.source.partition(":")
    if kind == "sheet":
        member = f"img/{arg}/sheets-clean/{SHEET_SIZE}.png"
        sheet = dict(npm.read_members(path, lambda p: p == member))
        if member not in sheet:
            raise DataError(f"npm package {spec.package}: {member} is missing")
        rgba = Image.open(io.BytesIO(sheet[member])).convert("RGBA")
        out = {}
        for c in wanted:
            if arg not in c.vendors:
                continue
            x, y = c.sheet[0] * SHEET_CELL + 1, c.sheet[1] * SHEET_CELL + 1
            cell = rgba.crop((x, y, x + SHEET_SIZE, y + SHEET_SIZE))
            if cell.getextrema()[3][1] > 0:  # an empty cell: not drawn
                out[c.unified] = on_white(cell)
        return out
    if kind == "openmoji":
        files = {f"color/svg/{c.openmoji}.svg": c for c in wanted if c.openmoji}
    else:
        files = {}
        for c in wanted:
            for name in (_slug(c.caption), _slug(c.caption) + "-default"):
                files.setdefault(f"icons/{arg}/{name}.svg", c)
    out = {}
    for inner, data in npm.read_members(path, lambda p: p in files):
        c = files[inner]
        if c.unified not in out:
            out[c.unified] = rasterize(data, f"npm package {spec.package}: {inner}")
    return out


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A re-upload's damage: blur, JPEG at quality 8, and a hue/saturation shift."""
    blurred = image.filter(ImageFilter.GaussianBlur(radius=0.6 * image.width / 32))
    buf = io.BytesIO()
    blurred.save(buf, format="JPEG", quality=8)
    hsv = np.asarray(Image.open(buf).convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(20, 40))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * 0.7, 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")


def write_studios(out_dir: str | Path, seed: int = 0, size: int = 32,
                  studios: list[str] | None = None, labels: list[int] | None = None,
                  per_label: int | None = None, packages: str | Path | None = None) -> dict:
    """Write the studios data set under `out_dir` (module docstring) and return its
    ownership table (also `owners.json`). `studios`, `labels` and `per_label` (the
    most images of a label per studio and split) make a small subset, for tests.
    Written to a sibling temp folder and renamed: complete or absent.

    Raises:
        DataError: `out_dir` not empty; an unknown studio, label or size; a package
            missing, unpinned or corrupt; an SVG that does not rasterize.
    """
    chosen = list(STUDIOS) if studios is None else list(studios)
    unknown = [s for s in chosen if s not in STUDIOS]
    if unknown or not chosen:
        raise DataError(f"unknown studio {unknown[0] if unknown else None!r}; studios: "
                        f"{list(STUDIOS)} ({COPYCAT} is planted with {COPIED})")
    if size not in SIZES:
        raise DataError(f"size {size}: the studios are drawn at 32x32; sizes: {list(SIZES)}")
    if per_label is not None and per_label < 1:
        raise DataError(f"per_label={per_label} must be positive")
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()):
        raise DataError(f"{final} exists and is not empty")
    packages = Path(packages) if packages is not None else None
    names, every = concepts(packages)
    if labels is not None:
        bad = [x for x in labels if not (isinstance(x, int) and 0 <= x < len(names))]
        if bad:
            raise DataError(f"unknown label {bad[0]!r}; labels: "
                            + ", ".join(f"{i} {n}" for i, n in enumerate(names)))
        every = [c for c in every if c.label in labels]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(every))
    n_held, n_pub = round(HELDOUT_FRACTION * len(every)), round(PUBLIC_FRACTION * len(every))
    split = {}
    for rank, i in enumerate(order):
        split[every[i].unified] = ("heldout" if rank < n_held else
                                   "public" if rank < n_held + n_pub else "contributors")
    with building(final) as out:
        table = _write(out, every, names, split, chosen, size, per_label, rng, packages)
        table["seed"] = seed
        (out / "owners.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def _write(out: Path, every: list[Concept], names: list[str], split: dict[str, str],
           chosen: list[str], size: int, per_label: int | None, rng: np.random.Generator,
           packages: Path | None) -> dict:
    by_id = {c.unified: c for c in every}
    rows, counts = [], {}  # concepts.csv rows; (owner, split) -> images
    copied = []
    for studio in chosen:
        print(f"[studios] {studio}: rendering", file=sys.stderr, flush=True)
        drawn = render(studio, every, packages)
        taken: dict[tuple[str, int], int] = {}
        for unified in sorted(drawn):
            c, part = by_id[unified], split[unified]
            if per_label is not None and taken.get((part, c.label), 0) >= per_label:
                continue
            taken[(part, c.label)] = taken.get((part, c.label), 0) + 1
            image = drawn[unified] if size == SHEET_SIZE else drawn[unified].resize(
                (size, size), Image.Resampling.LANCZOS)
            folder = out / part / (studio if part == "contributors" else "") / str(c.label)
            rows.append(_save(out, folder, f"{studio}-{unified}.png", image, studio, c, part))
            counts[(studio, part)] = counts.get((studio, part), 0) + 1
            if studio == COPIED and part == "contributors":
                copied.append((c, image))
    for c, image in [copied[i] for i in sorted(rng.permutation(len(copied))[
            :round(COPY_FRACTION * len(copied))])]:
        folder = out / "contributors" / COPYCAT / str(c.label)
        rows.append(_save(out, folder, f"{COPYCAT}-{c.unified}.png", degrade(image, rng),
                          COPYCAT, c, "contributors"))
        counts[(COPYCAT, "contributors")] = counts.get((COPYCAT, "contributors"), 0) + 1
    _write_captions(out, rows)
    with open(out / "concepts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "studio", "unified", "category", "subcategory", "caption", "split"])
        writer.writerows(rows)
    owners = {}
    for studio in [*chosen, *([COPYCAT] if copied else [])]:
        spec = COPYCAT_CLAIM if studio == COPYCAT else STUDIOS[studio]
        folder = out / "contributors" / studio
        owners[studio] = {
            "package": f"{spec.package}@{npm.PINNED[spec.package][0]}",
            "licence": spec.licence, "attribution": spec.attribution,
            "images": counts.get((studio, "contributors"), 0),
            "classes": sorted(int(p.name) for p in folder.iterdir() if p.is_dir()),
            "planted": studio == COPYCAT,
        }
        if studio == COPYCAT:
            owners[studio]["copies"] = COPIED
        _write_licence(folder, owners[studio])
    return {"dataset": "studios", "size": size, "labels": dict(enumerate(names)),
            "contributors": owners,
            "public_images": sum(v for (_, p), v in counts.items() if p == "public"),
            "heldout_images": sum(v for (_, p), v in counts.items() if p == "heldout"),
            "public_is": "the platform's licensed split: every studio's drawings of "
                         f"{PUBLIC_FRACTION:.0%} of the concepts, in no contributor's folder",
            "excluded": EXCLUDED}


def _save(out: Path, folder: Path, name: str, image: Image.Image, owner: str, c: Concept,
          part: str) -> list[str]:
    if image.size[0] != image.size[1]:
        raise AssertionError(f"{name} is {image.size}, not square")  # a bug of ours
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return [str((folder / name).relative_to(out)), owner, c.unified, c.category,
            c.subcategory, c.caption, part]


def _write_captions(out: Path, rows: list[list[str]]) -> None:
    """captions.csv (file relative to its folder, caption) in each contributor's
    folder, public/ and heldout/."""
    per: dict[Path, list[tuple[str, str]]] = {}
    for file, owner, _, _, _, caption, part in rows:
        if part == "contributors":
            folder, rel = Path("contributors") / owner, file.split("/", 2)[2]
        else:
            folder, rel = Path(part), file.split("/", 1)[1]
        per.setdefault(folder, []).append((rel, caption))
    for folder, entries in per.items():
        with open(out / folder / "captions.csv", "w", newline="") as f:
            csv.writer(f).writerows([("file", "caption"), *entries])


def _write_licence(folder: Path, owner: dict) -> None:
    """licence.json: what a store records as the contributor's licence at training."""
    (folder / "licence.json").write_text(json.dumps(
        {"licence": owner["licence"], "attribution": owner["attribution"]}, indent=2) + "\n")
