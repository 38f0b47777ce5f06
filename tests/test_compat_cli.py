"""The prototype's API and the command line, end to end on the shipped photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tasks.cli import main
from tests.support.files import vectron_image_path
from worker.compat import run_face_recog
from worker.pipeline import FacePipeline
from worker.settings import PipelineSettings

GROUP_KEYS = {
    "original_images_idx_list",
    "crop_path_list",
    "face_list",
    "face2_idx_list",
    "face1_idx_list",
    "cosine_similarity_list",
}


@pytest.fixture(scope="module")
def album(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    folder = tmp_path_factory.mktemp("album")
    Image.new("RGB", (320, 240), (30, 140, 60)).save(folder / "field.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not much of a jpeg")
    urls = [str(vectron_image_path(n)) for n in ("players.jpg", "yaoming.jpg", "gdp.jpg")]
    urls += [f"file://{folder / 'field.jpg'}", str(folder / "broken.jpg")]
    return [{"id": 100 + i, "url": url} for i, url in enumerate(urls)]


@pytest.mark.parametrize("method", ["default", "seed"])
def test_run_face_recog_returns_the_documented_structure(
    album: list[dict[str, object]], method: str, tmp_path: Path
) -> None:
    settings = PipelineSettings(grouping=method, detector="scrfd")
    groups, group_idx_list, images = run_face_recog(
        album, settings=settings, crop_dir=tmp_path / "crops", pipeline=FacePipeline(settings)
    )
    assert [image["id"] for image in images] == [100, 101, 102, 103, 104]
    assert all(set(group) == GROUP_KEYS for group in groups)
    faces_seen = sorted(f for g in groups for f in g["face2_idx_list"])
    assert faces_seen == list(range(len(faces_seen)))  # every face in exactly one group
    for idx, group in enumerate(groups):
        n = len(group["face2_idx_list"])
        assert all(len(group[key]) == n for key in GROUP_KEYS)
        assert group["face1_idx_list"][0] == [] and group["cosine_similarity_list"][0] == -1
        assert all(isinstance(m, int) for m in group["face1_idx_list"][1:])
        assert all(Path(p).is_file() for p in group["crop_path_list"])
        assert all(chip.shape == (112, 112, 3) for chip in group["face_list"])
        assert (idx in group_idx_list) == (n >= 2)
    # Yao Ming: the portrait's group also holds a face of the team photo.
    yao_groups = [g for g in images[1]["group_idx"] if g >= 0]
    assert len(yao_groups) == 1
    assert 0 in groups[yao_groups[0]]["original_images_idx_list"]
    assert images[3]["group_idx"] == [-2]
    assert images[4]["group_idx"] == [] and "corrupt" in images[4]["error"]
    # A photo whose faces are all seen once is in "others" only.
    for image in images[:3]:
        ids = image["group_idx"]
        assert ids and all(i in group_idx_list or i == -1 for i in ids)


def test_demo_command_writes_report_and_json(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--quiet", "--detector", "scrfd"]) == 0
    # the console wraps at 80 columns where it is no terminal: a long tmp path (xdist's
    # popen-gw<n>/ level) breaks report.html over two lines
    out = capsys.readouterr().out.replace("\n", "")
    assert "album summary" in out and "report.html" in out
    result = json.loads((tmp_path / "report" / "result.json").read_text())
    assert set(result) >= {"photos", "faces", "groups", "group_idx_list", "models", "settings"}
    photos = {Path(p["path"]).name: p for p in result["photos"]}
    assert photos["lake.jpg"]["group_idx"] == [-2]
    shared = set(photos["yaoming.jpg"]["group_idx"]) & set(photos["players.jpg"]["group_idx"])
    assert len(shared - {-1}) == 1
    assert all(len(m["sha256"]) == 64 for m in result["models"])
    face = result["faces"][0]
    assert set(face) == {
        "id",
        "photo_id",
        "box",
        "landmarks",
        "score",
        "group",
        "matched_face",
        "similarity",
    }
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Person " in html and "Others (-1)" in html and "No faces (-2)" in html
    for src in ("faces/0.jpg", "photos/0.jpg"):
        assert src in html and (tmp_path / "report" / src).is_file()


def test_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("group", "demo", "bench", "models"):
        assert command in out


def test_commands_of_other_distributions_are_plugged_in(monkeypatch) -> None:  # noqa: ANN001
    """`aftertrip_faces.commands` entry points add their subcommands (bench/ does); one
    whose imports are missing is left out, the others stay."""
    import tasks.cli

    class Plugin:
        def __init__(self, value: str, register) -> None:  # noqa: ANN001
            self.value = value
            self._register = register

        def load(self):  # noqa: ANN202
            return self._register()

    def hello():  # noqa: ANN202
        return lambda sub: sub.add_parser("hello", help="a plugin's command")

    def broken():  # noqa: ANN202
        raise ImportError("No module named 'nothing'")

    def entry_points(group: str) -> list[Plugin]:
        assert group == tasks.cli.COMMAND_PLUGINS
        return [Plugin("broken:register", broken), Plugin("hello:register", hello)]

    monkeypatch.setattr(tasks.cli, "entry_points", entry_points)
    commands = next(a for a in tasks.cli.build_parser()._actions if a.dest == "command").choices
    assert "hello" in commands and "group" in commands and "bench" not in commands


class _StubPipeline:
    """Stands in for `FacePipeline`: each photo has one face of one person (cosine 0.8
    between the two), of the given size in the pixels its chip was cut from."""

    class embedder:  # noqa: N801 - the attribute `run_face_recog` reads
        name = "w600k_mbf"

    def __init__(self, size: float) -> None:
        self.size = size

    def analyze(self, sources, keep_chips: bool = False):  # noqa: ANN001, ANN201
        import numpy as np

        from tests.support.vectors import vectors_with_gram
        from worker.pipeline import AnalyzedPhoto
        from worker.types import Detections, PhotoStatus

        emb = vectors_with_gram(np.array([[1.0, 0.8], [0.8, 1.0]]))
        for i, source in enumerate(sources):
            box = np.array([[10.0, 10.0, 10.0 + 2 * self.size, 10.0 + 2 * self.size]], np.float32)
            yield AnalyzedPhoto(
                photo_id=source.id,
                name=source.name,
                status=PhotoStatus.OK,
                error=None,
                width=4000,
                height=3000,
                detections=Detections(box, np.array([0.9], np.float32), np.zeros((1, 5, 2))),
                embeddings=emb[i : i + 1],
                chips=np.zeros((1, 112, 112, 3), np.uint8),
                working_scale=0.5,  # the box is twice the size the chip was cut from
            )


@pytest.mark.parametrize(("size", "grouped"), [(30.0, False), (80.0, True)])
def test_run_face_recog_keeps_the_small_face_rule(size: float, grouped: bool) -> None:
    """The prototype's API groups as the result file does: two small faces of one person
    (30 px where their chips were cut) found no group; two big ones do."""
    images = [{"id": 1, "url": "a.jpg"}, {"id": 2, "url": "b.jpg"}]
    groups, group_idx_list, out = run_face_recog(
        images,
        settings=PipelineSettings(grouping="default"),
        read=lambda url: b"",
        pipeline=_StubPipeline(size),  # type: ignore[arg-type]
    )
    assert (len(group_idx_list) == 1) is grouped
    expected = [0] if grouped else [-1]
    assert [image["group_idx"] for image in out] == [expected, expected]
