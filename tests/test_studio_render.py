"""storymem studio's handlers on real renders of the tiny model: the render worker (progress, stop, resume, one
render per folder), memory edits, takes, and that a studio folder stays an ordinary render folder."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storymem.locking import LOCK_NAME, FolderLock
from storymem.memory import MemoryBank
from storymem.studio.handlers import Studio, StudioError
from storymem.studio.runner import parse_args
from storymem.studio.stories import StoryDraft

FLAGS = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "1"]
ROWS = [[1, "cut", "a red circle", ""], [1, "continue", "the circle moves", ""], [2, "cut", "a blue square", ""]]


def draft(rows=ROWS, name="Three shots"):
    return StoryDraft(name, "", [list(r) for r in rows])


def finish(studio: Studio) -> dict:
    status = studio.runner.wait(300)
    assert status["state"] == "finished", status
    return status


def manifest_of(studio: Studio, run: str) -> dict:
    return json.loads((studio.folder(run) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """One studio (its loaded model is reused) whose workspace holds a finished three-shot run, "base"."""
    studio = Studio(parse_args(FLAGS + ["--workspace", str(tmp_path_factory.mktemp("ws"))]))
    studio.start_render("base", draft())
    finish(studio)
    return studio


@pytest.fixture
def run(studio, request):
    """A copy of the base run under the test's name."""
    name = request.node.name.replace("test_", "")[:40].strip("_")
    shutil.copytree(studio.folder("base"), studio.folder(name))
    return name


def test_render_lands_shots_scores_takes_and_stays_a_render_folder(studio):
    folder = studio.folder("base")
    manifest = manifest_of(studio, "base")
    assert [s["stem"] for s in manifest["shots"]] == ["01_01", "01_02", "02_01"] and manifest["finished"]
    assert [s["mode"] for s in manifest["shots"]] == ["m2v", "mi2v", "m2v"]
    assert not (folder / LOCK_NAME).exists() and (folder / "story.json").is_file()
    status = studio.progress()
    assert (status["done"], status["total"], status["step"], status["steps"]) == (3, 3, 1, 1)
    state = studio.run_state("base")
    assert {stem: index["current"] for stem, index in state["takes"].items()} == {"01_01": 1, "01_02": 1,
                                                                                 "02_01": 1}
    assert state["stale"] == set()
    keyframes = [k["frame"] for k in manifest["shots"][0]["keyframes"]]
    assert keyframes and sorted(state["scores"]["01_01"]) == keyframes
    assert all(s["aesthetic"] is None for s in state["scores"]["01_01"].values())  # no aesthetic model here
    recorded = json.loads((folder / "studio" / "scores" / "01_01.json").read_text())
    assert recorded["scorer"] == "NullScorer" and recorded["keyframes"][0]["aesthetic"] == 10.0
    # The CLI resumes the studio's folder: everything is finished, nothing is rendered again.
    from storymem.render import main

    before = [s["finished"] for s in manifest["shots"]]
    assert main(["--story", str(folder / "story.json"), "--out", str(folder), "--device", "cpu", "--no-progress",
                 *FLAGS]) == 0
    assert [s["finished"] for s in manifest_of(studio, "base")["shots"]] == before
    assert "--story" in studio.cli_command("base") and "--steps 1" in studio.cli_command("base")


def test_the_studio_opens_what_the_cli_rendered(studio, tmp_path):
    from storymem.render import main
    from storymem.studio.stories import check_rows, save_story

    story, _ = check_rows("Three shots", "", ROWS)
    save_story(tmp_path / "tale.json", story)
    folder = studio.workspace.root / "runs" / "from-cli"
    assert main(["--story", str(tmp_path / "tale.json"), "--out", str(folder), "--device", "cpu", "--no-progress",
                 *FLAGS]) == 0
    assert "from-cli" in studio.workspace.runs()
    opened = studio.open_run("from-cli")
    assert [row[:3] for row in opened.rows] == [[1, "cut", "a red circle"], [1, "continue", "the circle moves"],
                                                [2, "cut", "a blue square"]]
    state = studio.run_state("from-cli")
    assert [index["current"] for index in state["takes"].values()] == [1, 1, 1] and state["scores"] == {}
    assert studio.memory("from-cli", 3)
    studio.start_render("from-cli", opened, seed=4, from_shot=3)
    finish(studio)
    assert studio.takes("from-cli", "02_01")["current"] == 2 and (folder / "story.json").is_file()


def test_memory_edit_remove_pin_add_then_rerender(studio, run, tmp_path):
    folder = studio.folder(run)
    items = studio.memory(run, 3)
    keyframes = [i for i in items if i.kind == "keyframe"]
    assert len(keyframes) >= 2 and all(i.in_window for i in items)
    removed, pinned = keyframes[0], keyframes[-1]
    upload = studio.workspace.upload_dir / "hero.png"
    upload.parent.mkdir(parents=True, exist_ok=True)
    hero = np.zeros((20, 24, 3), np.uint8)
    hero[:, :12] = 255
    Image.fromarray(hero).save(upload)
    record = studio.edit_memory(run, 3, remove=[removed.key], pin=[pinned.key], uploads=[str(upload)])

    assert [op["op"] for op in record["operations"]] == ["remove", "pin", "add_reference"]
    assert record["operations"][0]["entry"]["frame"] == removed.frame_index and record["shot"] == "02_01"
    assert (folder / record["bank_before"]["folder"] / "memory_bank.json").is_file()
    assert (folder / record["operations"][2]["file"]).is_file()
    bank = MemoryBank.load(folder / "memory" / "after_01_02")
    history = bank.history()
    assert [e.kind for e in history[:2]] == ["reference", "reference"]
    assert np.array_equal(history[0].frame, hero) and np.array_equal(history[1].frame, pinned.frame)
    assert not any(np.array_equal(e.frame, removed.frame) for e in history)
    assert len(history) == len(items) - 1 + 1
    assert manifest_of(studio, run)["edits"][0]["id"] == record["id"]
    assert np.array_equal(np.asarray(Image.open(folder / "references" / "ref_01.png")), pinned.frame)
    assert studio.run_state(run)["stale"] == {"02_01"}  # shot 3 was drawn from the memory before the edit

    studio.start_render(run, draft(), from_shot=3)
    finish(studio)
    manifest = manifest_of(studio, run)
    memory = manifest["shots"][2]["memory"]
    assert [m["kind"] for m in memory[:2]] == ["reference", "reference"]
    assert all((folder / m["file"]).is_file() for m in memory)
    assert len(memory) == len(items)
    assert manifest["edits"][0]["rendered_takes"] == [2]
    state = studio.run_state(run)
    assert state["takes"]["02_01"]["current"] == 2 and state["stale"] == set()
    assert state["edits"][0]["in_effect"]

    # A second edit drops the uploaded image: references/ref_00.png now holds the pinned frame, and shot 3, which
    # saw the upload there, keeps pointing at the upload's pixels under a new name.
    hero_item = next(i for i in studio.memory(run, 3) if np.array_equal(i.frame, hero))
    studio.edit_memory(run, 3, remove=[hero_item.key])
    assert np.array_equal(np.asarray(Image.open(folder / "references" / "ref_00.png")), pinned.frame)
    seen = manifest_of(studio, run)["shots"][2]["memory"][0]["file"]
    assert seen.startswith("references/ref_00-") and np.array_equal(np.asarray(Image.open(folder / seen)), hero)
    assert [e["in_effect"] for e in studio.run_state(run)["edits"]] == [False, True]


def test_memory_edit_refusals(studio, run):
    items = studio.memory(run, 3)
    with pytest.raises(StudioError, match="shots 2..3"):
        studio.memory(run, 1)
    with pytest.raises(StudioError, match="nothing to edit"):
        studio.edit_memory(run, 3)
    with pytest.raises(StudioError, match="not in the bank any more"):
        studio.edit_memory(run, 3, remove=["e09-deadbeef"])
    with pytest.raises(StudioError, match="both removed and pinned"):
        studio.edit_memory(run, 3, remove=[items[0].key], pin=[items[0].key])
    outside = studio.workspace.root.parent / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    with pytest.raises(StudioError, match="not an upload of this studio"):
        studio.edit_memory(run, 3, uploads=[str(outside)])
    assert not (studio.folder(run) / "studio" / "edits").exists()  # nothing was recorded


def test_takes_pick_and_the_story_follows(studio, run):
    folder = studio.folder(run)
    first = (folder / "shots" / "02_01.mp4").read_bytes()
    story_before = (folder / "story.mp4").read_bytes()
    studio.start_render(run, draft(), seed=5, from_shot=3)
    finish(studio)
    manifest = manifest_of(studio, run)
    assert manifest["shots"][2]["seed"] == 7 and manifest["shots"][1]["seed"] == 1  # shots 1-2 were kept
    second = (folder / "shots" / "02_01.mp4").read_bytes()
    assert second != first and (folder / "takes" / "02_01" / "take-1" / "shot.mp4").read_bytes() == first
    assert studio.takes(run, "02_01")["current"] == 2
    assert studio.cli_command(run).endswith("--seed 5")  # the terminal resumes with the run's own seed

    studio.pick_take(run, "02_01", 1)
    manifest = manifest_of(studio, run)
    assert (folder / "shots" / "02_01.mp4").read_bytes() == first and manifest["shots"][2]["seed"] == 2
    assert (folder / "story.mp4").read_bytes() == story_before  # the story video follows the pick
    assert studio.takes(run, "02_01")["current"] == 1
    studio.pick_take(run, "02_01", 2)
    assert (folder / "shots" / "02_01.mp4").read_bytes() == second
    with pytest.raises(StudioError, match="has no take 9"):
        studio.pick_take(run, "02_01", 9)
    with pytest.raises(StudioError, match="not in the story"):
        studio.pick_take(run, "09_01", 1)


def test_picking_upstream_makes_later_shots_stale(studio, run):
    studio.start_render(run, draft(), seed=3, from_shot=2)
    finish(studio)
    assert studio.run_state(run)["stale"] == set()
    studio.pick_take(run, "01_02", 1)
    assert studio.run_state(run)["stale"] == {"02_01"}
    studio.pick_take(run, "01_02", 2)
    assert studio.run_state(run)["stale"] == set()


def test_stop_keeps_finished_shots_and_resume_continues(studio, monkeypatch):
    runner = studio.runner
    original = runner._on_call

    def stop_at_second_shot(kwargs):
        if runner._current_shot() == 1:
            runner.stop()
        return original(kwargs)

    monkeypatch.setattr(runner, "_on_call", stop_at_second_shot)
    studio.start_render("stopped", draft())
    status = runner.wait(300)
    assert status["state"] == "stopped" and status["done"] == 1
    folder = studio.folder("stopped")
    assert not (folder / LOCK_NAME).exists() and (folder / "story.mp4").is_file()
    assert len(manifest_of(studio, "stopped")["shots"]) == 1
    monkeypatch.setattr(runner, "_on_call", original)
    rows = [list(r) for r in ROWS]
    rows[2][2] = "a yellow square"  # a shot not rendered yet changes: the render simply resumes with it
    assert "from shot 2" in studio.start_render("stopped", draft(rows))
    finish(studio)
    manifest = manifest_of(studio, "stopped")
    assert len(manifest["shots"]) == 3 and manifest["shots"][2]["prompt"] == "a yellow square"
    assert studio.takes("stopped", "01_01")["current"] == 1 and len(studio.takes("stopped", "01_01")["takes"]) == 1


def test_one_render_per_folder(studio, run):
    folder = studio.folder(run)
    with FolderLock(folder, owner="storymem render", purpose="render"):
        with pytest.raises(StudioError, match=r"in use by storymem render \(pid \d+"):
            studio.start_render(run, draft(), from_shot=3)
        with pytest.raises(StudioError, match="in use by storymem render"):
            studio.pick_take(run, "02_01", 1)
    studio.start_render(run, draft(), seed=9, from_shot=2)
    try:
        with pytest.raises(StudioError, match="is running"):
            studio.start_render("other", draft())
        with pytest.raises(StudioError, match="is rendering"):
            studio.edit_memory(run, 3, remove=["e00-x"])
        with pytest.raises(StudioError, match="is rendering|in use"):
            studio.pick_take(run, "01_01", 1)
    finally:
        finish(studio)
    assert not studio.folder("other").exists()


def test_changed_prompt_rerenders_from_that_shot(studio, run):
    rows = [list(r) for r in ROWS]
    rows[2][2] = "a green square"
    note = studio.start_render(run, draft(rows))
    assert "from shot 3" in note
    finish(studio)
    folder = studio.folder(run)
    assert json.loads((folder / "story.json").read_text())["scenes"][1]["video_prompts"] == ["a green square"]
    assert len(studio.takes(run, "01_02")["takes"]) == 1 and len(studio.takes(run, "02_01")["takes"]) == 2
    with pytest.raises(StudioError, match="new title or overview needs a new run"):
        studio.start_render(run, draft(rows, name="Renamed"))
    with pytest.raises(StudioError, match="fewer|2 shots"):
        studio.start_render(run, draft(rows[:2]))


def test_invalid_story_is_refused_before_anything_is_written(studio):
    with pytest.raises(StudioError, match="fix the story first: shot 2, prompt: is empty"):
        studio.start_render("bad", draft([[1, "cut", "a", ""], [1, "cut", "", ""]]))
    with pytest.raises(StudioError, match="run name"):
        studio.start_render("../escape", draft())
    assert not studio.folder("bad").exists()


def test_a_killed_server_loses_nothing_finished(tmp_path):
    """The studio's process dies mid-render: the finished shots stay listed, the folder is not left locked, and
    a new studio resumes after them."""
    import os
    import subprocess
    import sys
    import time

    flags = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "40"]
    code = ("import sys; from storymem.studio.handlers import Studio; from storymem.studio.runner import parse_args;"
            "from storymem.studio.stories import StoryDraft; s = Studio(parse_args(sys.argv[1:]));"
            f"s.start_render('killed', StoryDraft('Three shots', '', {ROWS!r})); s.runner.wait()")
    workspace = tmp_path / "ws"
    child = subprocess.Popen([sys.executable, "-c", code, *flags, "--workspace", str(workspace)],
                             cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, OMP_NUM_THREADS="1"))
    manifest = workspace / "runs" / "killed" / "manifest.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and child.poll() is None:
            if manifest.is_file() and json.loads(manifest.read_text())["shots"]:
                break
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    shots = json.loads(manifest.read_text())["shots"]
    assert shots and all((manifest.parent / s["file"]).is_file() for s in shots)
    studio = Studio(parse_args(flags + ["--workspace", str(workspace)]))
    assert "resuming" in studio.start_render("killed", draft()) or len(shots) == 3
    finish(studio)
    final = json.loads(manifest.read_text())["shots"]
    assert len(final) == 3 and [s["finished"] for s in final[:len(shots)]] == [s["finished"] for s in shots]
