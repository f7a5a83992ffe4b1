"""Videos: frame sampling and times, face tracks, rows equal to photo predictions, bad videos, the CLI."""

import csv
import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

import facemt
from facemt.cli import main
from facemt.errors import FacemtError
from facemt.inference import PROBABILITY_TOLERANCE
from facemt.synth import draw_face, make_person
from facemt.video import Tracker, iter_frames, predict_video


def write_video(path, frames=20, fps=10, size=(320, 240), blank=(), faces=1):
    """A face (or two) sliding left to right over a grey background, written with OpenCV's VideoWriter."""
    rng = np.random.default_rng(0)
    people = [np.asarray(draw_face(make_person(i, "young", ("female", "male")[i], rng), "happiness", rng, (100, 125)))
              for i in range(faces)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        canvas = np.full((size[1], size[0], 3), 110, np.uint8)
        if i not in blank:
            for k, face in enumerate(people):
                x = int(5 + (size[0] // faces - 110) * i / max(1, frames - 1)) + k * size[0] // faces
                canvas[60 + k * 40 - 40 * (faces > 1):185 + k * 40 - 40 * (faces > 1), x:x + 100] = face
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_photo(path, seed):
    """A generated photo of an old man's angry face."""
    rng = np.random.default_rng(seed)
    draw_face(make_person(1, "old", "male", rng), "anger", rng, (200, 250)).save(path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.avi", blank=(6, 7))


def test_frames_are_sampled_in_time(tmp_path):
    path = write_video(tmp_path / "v.avi", frames=40, fps=20)
    default = list(iter_frames(path))  # every frame up to 10 per second: every second frame
    assert [i for i, _, _ in default] == list(range(0, 40, 2))
    assert [t for _, t, _ in default] == pytest.approx([i / 20 for i in range(0, 40, 2)])
    assert default[0][2].shape == (240, 320, 3) and default[0][2].dtype == np.uint8
    assert [i for i, _, _ in iter_frames(path, fps=5)] == list(range(0, 40, 4))
    assert len(list(iter_frames(path, fps=100))) == 40  # never more than the video has
    with pytest.raises(FacemtError, match="positive"):
        list(iter_frames(path, fps=0))


def test_a_moving_face_keeps_one_track_and_each_frame_equals_predict_on_it(clip, tmp_path):
    model = facemt.load()
    rows = list(predict_video(model, clip))
    assert [r.frame for r in rows] == list(range(20))
    assert [r.status for r in rows] == ["ok"] * 6 + ["no_face"] * 2 + ["ok"] * 12
    assert {r.track for r in rows if r.status == "ok"} == {0}  # one person, moving, one track
    assert rows[19].box[0] - rows[0].box[0] > 150  # it did move across the frame
    frames = {i: rgb for i, _, rgb in iter_frames(clip)}
    for k in (0, 9, 19):
        Image.fromarray(frames[k]).save(tmp_path / f"{k}.png")
        photo = model.predict(tmp_path / f"{k}.png")
        assert photo.labels == rows[k].labels
        for t in model.tasks:
            for c, p in photo.probabilities[t].items():
                assert abs(p - rows[k].probabilities[t][c]) <= PROBABILITY_TOLERANCE
    table = model.predict_video(clip, fps=5)
    assert list(table["frame"]) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert table["time_s"].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8])
    assert {"track", "landmarks", "expression", "gender_p_male"} <= set(table.columns)


def test_smoothing_is_off_by_default_and_follows_each_track(clip):
    model = facemt.load()
    plain = [r for r in predict_video(model, clip) if r.status == "ok"]
    smooth = [r for r in predict_video(model, clip, smooth=2.0) if r.status == "ok"]
    assert smooth[0].probabilities == plain[0].probabilities  # nothing before the first frame
    p = [r.probabilities["gender"]["male"] for r in plain]
    s = [r.probabilities["gender"]["male"] for r in smooth]
    assert np.std(np.diff(s)) < np.std(np.diff(p))  # smoother over time
    for r in smooth:
        assert sum(r.probabilities["expression"].values()) == pytest.approx(1, abs=1e-6)
        assert r.labels["gender"] == max(r.probabilities["gender"], key=r.probabilities["gender"].get)


def test_tracks_follow_overlapping_boxes_and_end_after_a_gap():
    tracker = Tracker(gap_s=1.0)
    assert tracker.assign([(0, 0, 50, 50), (200, 0, 50, 50)], 0.0) == [0, 1]
    assert tracker.assign([(205, 0, 50, 50), (5, 0, 50, 50)], 0.1) == [1, 0]  # order of boxes does not matter
    assert tracker.assign([(10, 0, 50, 50)], 0.2) == [0]
    assert tracker.assign([(210, 0, 50, 50)], 1.5) == [2]  # track 1 unseen for more than a second


def test_cli_streams_rows_plots_a_timeline_and_mixes_photos_and_videos(clip, tmp_path, capsys):
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.avi").write_bytes(clip.read_bytes())
    write_photo(folder / "photo.png", 1)
    out, plot = tmp_path / "rows.csv", tmp_path / "timeline.png"
    assert main(["predict", str(folder), "--fps", "5", "--out", str(out), "--plot", str(plot)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows[0]["path"].endswith("clip.avi") and rows[-1]["path"].endswith("photo.png")
    assert [r["frame"] for r in rows[:-1]] == [str(i) for i in range(0, 20, 2)] and rows[-1]["frame"] == ""
    assert rows[0]["track"] == "0" and rows[0]["time_s"] == "0.0" and len(json.loads(rows[0]["landmarks"])) == 5
    assert Image.open(plot).size[0] > 400
    capsys.readouterr()
    jsonl = tmp_path / "rows.jsonl"
    assert main(["predict", str(clip), "--out", str(jsonl)]) == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(lines) == 20 and lines[7]["status"] == "no_face" and lines[8]["track"] == 0


def test_a_truncated_video_keeps_its_rows_and_says_so_in_one_line(clip, tmp_path, capsys):
    data = clip.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "rows.csv"
    assert main(["predict", str(cut), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1 and "truncated" in err
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows[-1]["status"] == "error" and len(rows) > 3  # the frames before were kept
    assert all(r["status"] in ("ok", "no_face") for r in rows[:-1])
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    assert main(["predict", str(junk), "--csv"]) == 1
    assert "cannot read this video" in capsys.readouterr().err


def test_video_options_are_checked_and_shards_take_whole_videos(clip, tmp_path, capsys):
    photo = write_photo(tmp_path / "p.png", 2)
    assert main(["predict", str(photo), "--fps", "5"]) == 2
    assert "--fps applies to videos" in capsys.readouterr().err
    assert main(["predict", str(photo), "--fps", "5", "--smooth", "0.5"]) == 2
    assert "--fps, --smooth apply to videos" in capsys.readouterr().err
    assert main(["predict", str(clip), "--smooth", "-1"]) == 2
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.avi", "b.avi"):
        (folder / name).write_bytes(clip.read_bytes())
    out = tmp_path / "rows.csv"
    for k in (1, 2):
        assert main(["predict", str(folder), "--fps", "2", "--out", str(out), "--shard", f"{k}/2"]) == 0
    assert main(["merge-predictions", "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["a.avi"] * 4 + ["b.avi"] * 4


def test_per_track_each_face_track_gets_one_age_group_and_gender(tmp_path):
    """--person-from track: a track is one person; its rows share the pooled age group and gender of all its
    frames (per_person over the frames' own probabilities), expression stays each frame's."""
    from facemt.tasks import per_person

    two = write_video(tmp_path / "two.avi", frames=12, size=(480, 300), faces=2)
    model = facemt.load()
    plain = [r for r in predict_video(model, two) if r.status == "ok"]
    pooled = [r for r in predict_video(model, two, per_track=True) if r.status == "ok"]
    tracks = [r.track for r in plain]
    assert sorted(set(tracks)) == [0, 1] and [r.track for r in pooled] == tracks
    for head in ("age_group", "gender"):
        classes = list(plain[0].probabilities[head])
        frames = np.array([[r.probabilities[head][c] for c in classes] for r in plain])
        want = per_person(frames, tracks)
        for i, r in enumerate(pooled):
            assert [r.probabilities[head][c] for c in classes] == pytest.approx(list(want[i]), abs=1e-6)
            assert r.labels[head] == classes[int(np.argmax(want[i]))]
        for track in (0, 1):
            assert len({r.labels[head] for r in pooled if r.track == track}) == 1
    assert [r.probabilities["expression"] for r in pooled] == [r.probabilities["expression"] for r in plain]
    table = model.predict_video(two, per_track=True)
    assert table.groupby("track")["gender_p_male"].nunique().tolist() == [1, 1]


def test_person_from_track_is_for_videos_and_keeps_a_truncated_videos_rows(clip, tmp_path, capsys):
    photo = write_photo(tmp_path / "p.png", 3)
    assert main(["predict", str(photo), "--person-from", "track"]) == 2
    assert "no video is among the inputs" in capsys.readouterr().err
    assert main(["predict", str(clip), "--person-from", "name"]) == 2
    assert "--person-from track" in capsys.readouterr().err
    data = clip.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "rows.csv"
    assert main(["predict", str(cut), "--out", str(out), "--person-from", "track"]) == 1
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows[-1]["status"] == "error" and len(rows) > 3
    faces = [r for r in rows if r["status"] == "ok"]
    assert len({(r["gender"], r["gender_p_male"]) for r in faces}) == 1  # one track, one answer


def test_timeline_legends_hide_no_panel(clip):
    """The legends stand above the top row of panels: inside, the expression legend covered the stacked areas."""
    from facemt.video import timeline_figure

    table = facemt.load().predict_video(clip)
    fig = timeline_figure(table[table["status"] == "ok"])
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = [ax.get_window_extent(renderer) for ax in fig.axes]
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 3  # one per head
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(panel) for panel in panels)
            assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)  # not cut off
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
