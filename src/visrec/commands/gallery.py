"""``visrec gallery enroll|calibrate|list|delete|export|import ... --config serve.yaml [--gallery NAME]``: a
served face gallery offline (``--gallery``: one of the config's named galleries; default: its default one)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from visrec.commands.eval import rate_option

console = Console()
app = typer.Typer(help="The face gallery a serve config names: enroll a folder of photos, calibrate its threshold, "
                       "list, delete (erase a person), export, import.",
                  add_completion=False)
CONFIG = typer.Option(..., "--config", help="serve YAML whose faces gallery is meant")
GALLERY = typer.Option(None, "--gallery", help="which of the config's face galleries (faces.galleries), by name; "
                                               "default: faces.default_gallery, else the one named default "
                                               "(faces.gallery), else the only one")


def _pick(config: Path, gallery: str | None):
    """(serve config, gallery name, its GalleryConfig); a ConfigError naming the declared galleries when
    ``gallery`` is not one of them."""
    from visrec.errors import ConfigError
    from visrec.serve.config import load_serve_config

    cfg = load_serve_config(config)
    if cfg.faces is None:
        raise ConfigError(f"{config}: no faces section, so no gallery")
    name, g = cfg.faces.pick_gallery(gallery, str(config))
    return cfg, name, g


def _where(name: str, g) -> str:
    if g.backend == "milvus":
        return f"gallery {name!r} ({g.uri}, collection {g.collection})"
    return f"gallery {name!r} ({g.path})" if g.path else f"gallery {name!r} (in memory)"


@contextlib.contextmanager
def _open(config: Path, gallery: str | None):
    """The configured gallery ``gallery`` (None: the default one) and its description, closed afterwards even
    on an error (Milvus Lite holds its file while open)."""
    from visrec.faces.pipeline import Embedder
    from visrec.serve.pipeline import open_named_gallery

    cfg, name, gcfg = _pick(config, gallery)
    g = open_named_gallery(name, gcfg, Embedder(cfg.faces.model))
    try:
        yield g, _where(name, gcfg)
    finally:
        g.close()


@app.command()
def enroll(folder: Path = typer.Argument(..., help="photos in FOLDER/<identity>/ (one sub-folder per person)"),
           config: Path = CONFIG, gallery: str | None = GALLERY):
    """Enroll the largest face of every photo through the config's pipeline (detector, detection size, landmarks,
    alignment, model), keeping thumbnails where the gallery's config names a folder for them. A copy of a photo
    already taken for the same person (the same aligned face) is one template: it is left out and listed."""
    from rich.progress import Progress

    from visrec.data.folders import read_image_folder
    from visrec.index.enroll import enroll_folder
    from visrec.serve.pipeline import configured_pipeline
    from visrec.serve.thumbnails import Thumbnails

    cfg, _, gcfg = _pick(config, gallery)  # a bad --gallery fails before the model loads
    pipe = configured_pipeline(cfg)  # the service's own pipeline: the same crop as an HTTP enrollment
    thumbs = None if gcfg.thumbnails is None else Thumbnails(gcfg.thumbnails)
    total = len(read_image_folder(folder).paths)
    with _open(config, gallery) as (g, where), Progress(console=console) as bar:
        task = bar.add_task("photos", total=total)
        report = enroll_folder(pipe, g, folder, progress=lambda n: bar.advance(task, n),
                               thumbnails=thumbs)
        count = g.count()
    t = Table(title=Text(f"enrolled into {where}: {count:,} templates"))
    t.add_column("outcome")
    t.add_column("photos")
    t.add_column("first ones")
    for label, rows in (("enrolled", report.enrolled), ("no face (left out)", report.no_face),
                        ("several faces (largest enrolled)", report.several_faces),
                        ("same photo as another (left out)", [f"{p} (same as {q})" for p, q in report.duplicates]),
                        ("same face as another person's photo (enrolled: check the labels)",
                         [f"{p} (same as {q})" for p, q in report.other_person]),
                        ("errors", [f"{p}: {why}" for p, why in report.errors])):
        t.add_row(label, f"{len(rows):,}", Text(", ".join(rows[:3]) + (" ..." if len(rows) > 3 else "")))
    console.print(t)


@app.command()
def calibrate(config: Path = CONFIG,
              data: Path = typer.Option(..., "--data", help="labelled aligned faces: image folder or RecordIO; "
                                                            "with --photos, raw photos in DATA/<identity>/"),
              photos: bool = typer.Option(False, "--photos", help="DATA holds raw photos: detect, align and embed "
                                                                  "them with the config's pipeline"),
              target_fpr: float = typer.Option(1e-4, "--target-fpr", help="false accepts per impostor pair",
                                               callback=rate_option()),
              gallery: str | None = GALLERY):
    """Pick the match threshold at a target FPR from a labelled set (exact engine) and store it in the gallery."""
    from rich.progress import Progress

    from visrec.serve.pipeline import calibrate_gallery

    _pick(config, gallery)  # a bad --gallery fails before any photo is read
    if photos:
        from visrec.data.folders import read_image_folder

        total = len(read_image_folder(data).paths)
    else:
        from visrec.data.datasets import open_face_dataset

        total = len(open_face_dataset(data, scored=True))
    with Progress(console=console) as bar:
        task = bar.add_task("photos" if photos else "embedding", total=total)
        out = calibrate_gallery(config, data, target_fpr, photos=photos, progress=lambda n: bar.advance(task, n),
                                gallery=gallery)
    t = Table(title=Text(f"threshold stored in gallery {out['gallery_name']!r} ({out['gallery']})"))
    t.add_column("quantity")
    t.add_column("value")
    for key in ("threshold", "target_fpr", "tpr", "fpr", "genuine_pairs", "impostor_pairs", "images", "identities"):
        v = out[key]
        t.add_row(key, f"{v:.6g}" if isinstance(v, float) else "none" if v is None else f"{v:,}")
    if photos:
        t.add_row("photos without a face (left out)", f"{len(out['no_face']):,}")
    console.print(t)
    if out["no_face"]:
        console.print("no face found in: " + ", ".join(out["no_face"][:20])
                      + (f" and {len(out['no_face']) - 20} more" if len(out["no_face"]) > 20 else ""), markup=False)


@app.command("list")
def list_(config: Path = CONFIG, gallery: str | None = GALLERY):
    """Enrolled identities, their template counts and metadata."""
    with _open(config, gallery) as (g, where):
        t = Table(title=Text(f"{where}: {g.count():,} templates; threshold {g.threshold}"))
        for col in ("identity", "templates", "metadata"):
            t.add_column(col)
        for row in g.list():
            t.add_row(Text(row["identity"]), str(row["templates"]), Text(str(row["metadata"] or "")))
    console.print(t)


@app.command("delete")
def delete(identity: str = typer.Argument(..., help="the identity to erase (any name the service accepts; "
                                                    "quote it for the shell)"),
           config: Path = CONFIG, gallery: str | None = GALLERY):
    """Erase one identity: its row, every template and the thumbnails the service kept of it (biometric data: the
    way to erase a person)."""
    from visrec.errors import DataError
    from visrec.serve.thumbnails import Thumbnails, erase_person

    _, _, gcfg = _pick(config, gallery)
    with _open(config, gallery) as (g, where):
        if g.identity(identity) is None:
            raise DataError(f"identity {identity!r} is not enrolled in {where}")
        removed = erase_person(g, identity, None if gcfg.thumbnails is None else Thumbnails(gcfg.thumbnails))
    t = Table(title=Text(f"erased from {where}"))
    t.add_column("identity")
    t.add_column("templates removed")
    t.add_row(Text(identity), f"{removed:,}")  # Text: a name is never read as Rich markup
    console.print(t)


@app.command("export")
def export_(config: Path = CONFIG, out: Path = typer.Option(..., "--out", help="the .npz to write (an existing "
                                                                "file only when it is an earlier export)"),
            gallery: str | None = GALLERY):
    """Write every template, metadata and the threshold to a .npz (no pickle)."""
    with _open(config, gallery) as (g, where):
        path = g.export(out)
        console.print(f"exported {g.count():,} templates of {len(g.list()):,} identities from {where} to {path}",
                      markup=False)


@app.command("import")
def import_(config: Path = CONFIG, src: Path = typer.Argument(..., help="a .npz from visrec gallery export"),
            gallery: str | None = GALLERY):
    """Enroll everything from an export (idempotent; refuses another model's embeddings)."""
    from rich.progress import Progress

    with _open(config, gallery) as (g, where):
        with Progress(console=console) as bar:
            task = bar.add_task("importing templates", total=None)
            added = g.import_(src, progress=lambda done, total: bar.update(task, completed=done, total=total))
        # after the bar's last frame, which a console that is no terminal prints when the bar stops
        console.print(f"imported {added:,} new templates; {where} holds {g.count():,}", markup=False)
