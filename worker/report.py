"""What `aftertrip-faces group` writes: result.json (schema in docs/result.md) and report.html."""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from worker.types import NO_FACE_GROUP, SINGLE_FACE_GROUP, AlbumResult, PhotoStatus

SCHEMA_VERSION = 1


def album_json(result: AlbumResult) -> dict[str, Any]:
    """The album result as plain JSON data (no embeddings)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "photos": [
            {
                "id": p.id,
                "path": p.path,
                "status": p.status.value,
                "error": p.error,
                "width": p.width,
                "height": p.height,
                "group_idx": p.group_idx,
            }
            for p in result.photos
        ],
        "faces": [
            {
                "id": f.id,
                "photo_id": f.photo_id,
                "box": f.box,
                "landmarks": f.landmarks,
                "score": f.score,
                "group": f.group,
                "matched_face": f.matched_face,
                "similarity": f.similarity,
            }
            for f in result.faces
        ],
        "groups": [asdict(g) for g in result.groups],
        "group_idx_list": result.group_idx_list,
        "models": [asdict(m) for m in result.models],
        "settings": result.settings,
        "timings": result.timings,
    }


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem} h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-end}
.face img{width:80px;height:80px;object-fit:cover;border-radius:6px}
.photo img{height:120px;border-radius:4px}
figure{margin:0;text-align:center;font-size:.7rem;color:#666}
.meta{color:#666;font-size:.85rem} table{border-collapse:collapse}
td,th{padding:2px 8px;text-align:left}
"""


def _img(src: str | None, css: str, caption: str, title: str = "") -> str:
    if src is None:
        return ""
    return (
        f'<figure class="{css}" title="{html.escape(title)}"><img src="{html.escape(src)}" '
        f'loading="lazy" alt=""><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


def render_html(
    result: AlbumResult,
    *,
    face_images: Mapping[int, str],
    photo_images: Mapping[str, str],
    title: str = "AfterTrip Faces",
) -> str:
    """A self-contained page: a section per person, then others, no faces and errors.

    `face_images` / `photo_images` map face ids / photo ids to image paths beside the page.
    """
    photos = {p.id: p for p in result.photos}
    faces = result.faces
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style><h1>{html.escape(title)}</h1>",
        _summary(result),
    ]
    for group in result.groups:
        counts = f"{len(group.photo_ids)} photos, {len(group.face_ids)} faces"
        parts.append(f"<h2>Person {group.idx} — {counts}</h2>")
        face_row = []
        for fid in group.face_ids:
            face = faces[fid]
            why = (
                f"matched face {face.matched_face} (cos {face.similarity:.2f})"
                if face.matched_face is not None and face.similarity is not None
                else ""
            )
            cover = " (cover)" if fid == group.cover_face_id else ""
            face_row.append(_img(face_images.get(fid), "face", f"#{fid}{cover}", why))
        parts.append(f"<div class='row'>{''.join(face_row)}</div>")
        parts.append(_photo_row(group.photo_ids, photo_images, photos))
    others = [f for f in faces if f.group == SINGLE_FACE_GROUP]
    parts.append(f"<h2>Others (-1) — {len(others)} faces seen once</h2>")
    parts.append(
        "<div class='row'>"
        + "".join(_img(face_images.get(f.id), "face", f"#{f.id}") for f in others)
        + "</div>"
    )
    parts.append(_photo_row(list(dict.fromkeys(f.photo_id for f in others)), photo_images, photos))
    no_face = [p.id for p in result.photos if p.group_idx == [NO_FACE_GROUP]]
    parts.append(f"<h2>No faces (-2) — {len(no_face)} photos</h2>")
    parts.append(_photo_row(no_face, photo_images, photos))
    failed = [p for p in result.photos if p.status is not PhotoStatus.OK]
    if failed:
        rows = "".join(
            f"<tr><td>{html.escape(p.path)}</td><td>{p.status.value}</td>"
            f"<td>{html.escape(p.error or '')}</td></tr>"
            for p in failed
        )
        parts.append(f"<h2>Photos not processed — {len(failed)}</h2><table>{rows}</table>")
    return "\n".join(parts)


def _photo_row(ids: list[str], photo_images: Mapping[str, str], photos: Mapping[str, Any]) -> str:
    cells = [
        _img(photo_images.get(pid), "photo", photos[pid].path.rsplit("/", 1)[-1]) for pid in ids
    ]
    return f"<div class='row'>{''.join(cells)}</div>"


def _summary(result: AlbumResult) -> str:
    ok = sum(p.status is PhotoStatus.OK for p in result.photos)
    models = ", ".join(f"{m.name} ({m.sha256[:12]})" for m in result.models)
    return (
        f"<p class='meta'>{len(result.photos)} photos ({ok} processed), {len(result.faces)} faces, "
        f"{len(result.groups)} people. Models: {html.escape(models)}. "
        f"Grouping: {html.escape(str(result.settings.get('grouping')))}.</p>"
    )
