"""storymem studio without rendering: the folder lock, workspace confinement, upload checks, the story table,
the command line, and the pipeline hook."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storymem.locking import LOCK_NAME, FolderLock, FolderLockError, read_lock_holder
from storymem.studio.stories import check_rows, draft_from_json_text, issues_column, rows_from_story
from storymem.studio.workspace import (Workspace, WorkspaceError, check_image_upload, check_story_upload, safe_name,
                                       slug)
from storymem.story import Story


# ---------------------------------------------------------------------------------------------- lock
def test_lock_excludes_a_second_holder_and_names_the_first(tmp_path):
    folder = tmp_path / "run"
    with FolderLock(folder, owner="storymem studio at http://127.0.0.1:1", purpose="rendering run"):
        holder = read_lock_holder(folder)
        assert holder["pid"] == os.getpid() and holder["purpose"] == "rendering run"
        with pytest.raises(FolderLockError) as err:
            FolderLock(folder, owner="storymem render").acquire()
        message = str(err.value)
        assert "storymem studio at http://127.0.0.1:1" in message and f"pid {os.getpid()}" in message
        assert "rendering run" in message and err.value.holder["owner"].startswith("storymem studio")
    assert not (folder / LOCK_NAME).exists()  # released: the file is gone
    with FolderLock(folder):  # and the folder can be locked again
        pass


def test_lock_of_a_dead_process_is_free(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time; from storymem.locking import FolderLock; FolderLock(sys.argv[1], owner='crashed')"
            ".acquire(); print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockError, match="crashed"):
            FolderLock(folder).acquire()
    finally:
        child.kill()
        child.wait()
    assert (folder / LOCK_NAME).exists()  # the killed holder left its file behind ...
    with FolderLock(folder, owner="next") as lock:  # ... which does not hold the folder
        assert lock.held and read_lock_holder(folder)["owner"] == "next"


def test_lock_release_is_idempotent_and_reacquire_refused(tmp_path):
    lock = FolderLock(tmp_path / "a").acquire()
    with pytest.raises(FolderLockError, match="already held"):
        lock.acquire()
    lock.release()
    lock.release()
    assert not lock.held


# ---------------------------------------------------------------------------------------------- workspace
@pytest.fixture
def workspace(tmp_path):
    return Workspace(tmp_path / "ws")


@pytest.mark.parametrize("name", ["../secret", "runs/../../x", "/etc/passwd", "C:/Windows", "runs\\x", ".studio/a",
                                  "runs/.storymem.lock", "", "a\x00b", "runs/./x"])
def test_workspace_refuses_names_that_escape_or_hide(workspace, name):
    with pytest.raises(WorkspaceError):
        workspace.resolve(name)


def test_workspace_resolves_inside_and_refuses_symlinks_out(workspace, tmp_path):
    (workspace.root / "runs" / "a").mkdir()
    (workspace.root / "runs" / "a" / "f.txt").write_text("x")
    assert workspace.resolve("runs/a/f.txt", must_exist=True) == workspace.root / "runs" / "a" / "f.txt"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    (workspace.root / "runs" / "link").symlink_to(outside)
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        workspace.resolve("runs/link/secret.txt")
    (workspace.root / "stories" / "inner").symlink_to(workspace.root / "runs" / "a")
    assert workspace.resolve("stories/inner/f.txt").read_text() == "x"  # a link that stays inside is fine
    with pytest.raises(WorkspaceError, match="not found"):
        workspace.resolve("runs/a/missing", must_exist=True)


def test_run_and_story_names(workspace):
    assert workspace.run_folder("my-story_2").name == "my-story_2"
    for bad in ("..", "a/b", ".hidden", "x" * 81, "a b", "name."):
        with pytest.raises(WorkspaceError):
            workspace.run_folder(bad)
    assert workspace.story_path("tale").name == "tale.json"
    assert safe_name("ok.txt") == "ok.txt"
    assert slug("The Lighthouse!  Part 2") == "the-lighthouse-part-2" and slug("???") == "story"
    (workspace.root / "runs" / "done").mkdir()
    (workspace.root / "runs" / "done" / "story.json").write_text("{}")
    (workspace.root / "runs" / "empty").mkdir()
    assert workspace.runs() == ["done"]


# ---------------------------------------------------------------------------------------------- uploads
def test_image_upload_checks(workspace, tmp_path):
    png = workspace.upload_dir / "ref.png"
    png.parent.mkdir(parents=True)
    Image.fromarray(np.full((8, 12, 4), 200, np.uint8), "RGBA").save(png)
    image = check_image_upload(png, [workspace.root])
    assert image.shape == (8, 12, 3) and image.dtype == np.uint8  # RGBA converted
    fake = workspace.upload_dir / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(WorkspaceError, match="fake.png: not a readable image"):
        check_image_upload(fake, [workspace.root])
    gif = workspace.upload_dir / "anim.gif"
    Image.new("RGB", (4, 4)).save(gif)
    with pytest.raises(WorkspaceError, match="GIF files are not accepted"):
        check_image_upload(gif, [workspace.root])
    elsewhere = tmp_path / "elsewhere.png"
    Image.new("RGB", (4, 4)).save(elsewhere)
    with pytest.raises(WorkspaceError, match="not an upload of this studio"):
        check_image_upload(elsewhere, [workspace.root])
    with pytest.raises(WorkspaceError, match="bytes is more than"):
        check_image_upload(png, [workspace.root], max_bytes=10)
    with pytest.raises(WorkspaceError, match="too large"):
        check_image_upload(png, [workspace.root], max_pixels=50)


def test_story_upload_checks(workspace):
    good = workspace.upload_dir / "tale.json"
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps({"story_name": "Tale", "scenes": [
        {"scene_num": 1, "video_prompts": ["a", "b"], "cut": [True, False]}]}))
    story = check_story_upload(good, [workspace.root])
    assert [s.cut for s in story] == [True, False] and story.path is None
    bad = workspace.upload_dir / "bad.json"
    bad.write_text(json.dumps({"scenes": [{"scene_num": 1, "video_prompts": ["a", ""], "cut": [True, True]}]}))
    with pytest.raises(WorkspaceError, match=r"bad.json, scene 1, shot 2: video_prompts entry is empty"):
        check_story_upload(bad, [workspace.root])
    text = workspace.upload_dir / "lines.txt"
    text.write_text("one\n# comment\ntwo\n")
    assert check_story_upload(text, [workspace.root]).prompts == ["one", "two"]
    exe = workspace.upload_dir / "story.exe"
    exe.write_text("[]")
    with pytest.raises(WorkspaceError, match="expected a .json or .txt"):
        check_story_upload(exe, [workspace.root])


# ---------------------------------------------------------------------------------------------- story table
def test_table_becomes_a_story():
    rows = [[1, "cut", "a cat", "", ""], ["", "continue", "it sits", "", ""], [2, "cut", "a dog", "dog first", ""],
            ["", "", "", "", ""]]
    story, issues = check_rows("Pets", "two animals", rows)
    assert issues == []
    assert [(s.scene, s.cut, s.prompt) for s in story] == [(1, True, "a cat"), (1, False, "it sits"),
                                                            (2, True, "a dog")]
    assert story[2].first_frame_prompt == "dog first" and story.name == "Pets"
    assert rows_from_story(story)[1][:3] == [1, "continue", "it sits"]
    again, _ = check_rows(story.name, story.overview, rows_from_story(story))
    assert again.to_dict() == story.to_dict()


def test_table_issues_name_the_shot_and_field():
    rows = [[1, "continue", "first", "", ""], [1, "maybe", "", "", ""], [0, "cut", "back", "", ""],
            ["x", "cut", "p", "", ""]]
    story, issues = check_rows("t", "", rows)
    assert story is None
    found = {(i.row, i.field) for i in issues}
    assert (1, "cut") in found and (1, "prompt") in found and (3, "scene") in found
    story, issues = check_rows("t", "", [[1, "continue", "first", "", ""]])
    assert [(i.row, i.field) for i in issues] == [(0, "cut")] and "first shot" in issues[0].message
    story, issues = check_rows("t", "", [[2, "cut", "a", "", ""], [1, "cut", "b", "", ""]])
    assert [(i.row, i.field) for i in issues] == [(1, "scene")]
    table = issues_column([[1, "continue", "first", "", ""], ["", "", "", "", ""]], issues_of := check_rows(
        "t", "", [[1, "continue", "first", "", ""]])[1])
    assert table[0][4].startswith("cut:") and table[1][4] == "" and issues_of
    _, issues = check_rows("t", "", [])
    assert issues[0].row is None and "no shots" in issues[0].message


def test_pasted_story_text():
    draft = draft_from_json_text("one\n\ntwo\n")
    assert [r[2] for r in draft.rows] == ["one", "two"]
    draft = draft_from_json_text(json.dumps({"prompts": ["a", "b"], "cuts": [True, False], "name": "N"}))
    assert draft.name == "N" and draft.rows[1][1] == "continue"
    from storymem.story import StoryError

    with pytest.raises(StoryError, match="invalid JSON"):
        draft_from_json_text("{bad")


# ---------------------------------------------------------------------------------------------- command line
def test_studio_takes_render_flags_and_defaults_to_the_bundled_model():
    from storymem.render import RenderError
    from storymem.studio.runner import parse_args

    options = parse_args([])
    assert (options.render.base, options.render.lora, options.render.device) == ("toy", "toy", "cpu")
    assert options.host == "127.0.0.1" and options.render_args == ["--base", "toy", "--lora", "toy", "--device",
                                                                   "cpu"]
    options = parse_args(["--base", "tiny", "--frames", "5", "--steps", "2", "--seed", "7", "--workspace", "w",
                          "--port", "0", "--max-memory", "4"])
    r = options.render
    assert (r.base, r.lora, r.frames, r.steps, r.seed, r.max_memory) == ("tiny", None, 5, 2, 7, 4)
    assert r.resolved().height == 64  # the built-in model's size, decided when the options resolve
    assert options.workspace == Path("w") and options.port == 0
    assert "--workspace" not in options.render_args and "--frames" in options.render_args
    with pytest.raises(RenderError, match="--story: the studio sets this in the page"):
        parse_args(["--story", "x.json"])
    with pytest.raises(RenderError, match="--parallel: the studio renders in one process"):
        parse_args(["--parallel", "ulysses"])
    with pytest.raises(SystemExit):
        parse_args(["--frames", "many"])


def test_studio_main_reports_bad_flags(capsys):
    from storymem.studio import main

    assert main(["--out", "x"]) == 2
    assert "--out: the studio sets this in the page" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--workspace" in out and "--max-memory" in out and "--story" not in out


def test_stepped_pipeline_reports_steps_and_passes_everything_else():
    from storymem.studio.runner import RenderStopped, SteppedPipeline

    class FakePipe:
        scheduler = "unipc"

        def __call__(self, prompt, num_inference_steps, callback_on_step_end=None, **kwargs):
            for i in range(num_inference_steps):
                callback_on_step_end(self, i, 1000 - i, {})
            return prompt

    calls, steps = [], []
    pipe = FakePipe()
    wrapped = SteppedPipeline(pipe, calls.append, lambda step, total: steps.append((step, total)))
    assert wrapped(prompt="p", num_inference_steps=3) == "p"
    assert steps == [(1, 3), (2, 3), (3, 3)] and calls[0]["prompt"] == "p"
    assert wrapped.scheduler == "unipc"
    wrapped.scheduler = "other"  # the renderer swaps schedulers on the pipeline itself
    assert pipe.scheduler == "other"

    def stop(step, total):
        if step == 2:
            raise RenderStopped()

    with pytest.raises(RenderStopped):
        SteppedPipeline(pipe, lambda kwargs: None, stop)(prompt="p", num_inference_steps=5)


def test_file_route_serves_only_the_workspace(tmp_path):
    pytest.importorskip("gradio", reason="the page needs gradio (pip install storymem[studio])")
    from fastapi.testclient import TestClient

    from storymem.studio.app import build_app
    from storymem.studio.handlers import Studio
    from storymem.studio.runner import parse_args

    studio = Studio(parse_args(["--base", "tiny", "--workspace", str(tmp_path / "ws")]))
    (studio.workspace.root / "runs" / "a").mkdir()
    (studio.workspace.root / "runs" / "a" / "x.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("CONTENT-OUTSIDE")
    (studio.workspace.root / "runs" / "out").symlink_to(tmp_path)
    client = TestClient(build_app(studio))
    assert client.get("/studio/file/runs/a/x.txt").text == "hello"
    for bad in ("/studio/file/..%2Fsecret.txt", "/studio/file/runs/out/secret.txt", "/studio/file/%2Fetc%2Fpasswd",
                "/studio/file/runs/a", "/studio/file/.studio"):
        response = client.get(bad)
        assert response.status_code == 404 and "CONTENT-OUTSIDE" not in response.text
    assert client.get("/").status_code == 200


def test_shot_cards_escape_text_and_link_only_workspace_files(tmp_path):
    from storymem.studio.views import progress_html, shots_html

    root = tmp_path / "ws"
    folder = root / "runs" / "r"
    (folder / "shots").mkdir(parents=True)
    (folder / "shots" / "01_01.mp4").write_bytes(b"x")
    story = Story.from_prompts(["<script>alert(1)</script>", "two"])
    entry = {"stem": "01_01", "mode": "m2v", "seed": 0, "file": "shots/01_01.mp4", "keyframes": [],
             "memory": [{"kind": "keyframe", "shot_stem": "00_00", "frame": 1, "file": "../../../../etc/passwd"}]}
    manifest = {"story": story.to_dict(), "shots": [entry], "num_shots": 2}
    page = shots_html(root, {"folder": folder, "manifest": manifest, "takes": {"01_01": {"current": 1, "takes": [
        {"take": 1}]}}, "stale": {"01_01"}, "scores": {}, "edits": []})
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "/studio/file/runs/r/shots/01_01.mp4?v=" in page and "passwd" not in page
    assert 'data-stem="01_02" data-finished="0"' in page and "re-render from here" in page
    status = {"state": "rendering", "run": "r", "shot": 1, "stem": "01_02", "step": 3, "steps": 8, "done": 1,
              "total": 2, "phase": "denoising"}
    assert "step 3 of 8" in progress_html(status) and 'data-state="rendering"' in progress_html(status)


def test_studio_without_gradio_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    import importlib.util

    from storymem.studio import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["--workspace", str(tmp_path / "ws")]) == 2
    assert 'pip install "storymem[studio]"' in capsys.readouterr().err
