"""What the page's buttons do, without the page: :class:`Studio` holds the workspace and the render worker, and
each method is one user action. The Gradio layer (:mod:`storymem.studio.app`) only turns widgets into these
arguments and results into widgets, so everything here is tested without a browser.

Names from the page (runs, story files, frames, takes) are checked here; errors are :class:`StudioError`
(one line, shown on the page).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..locking import FolderLock, FolderLockError
from ..render import RenderError
from ..story import Story, StoryError, load_story
from . import memory_edit, takes
from .runner import RenderRunner, StudioBusy, StudioOptions, read_manifest, scores_path
from .stories import Issue, StoryDraft, check_rows, draft_from_json_text, rows_from_story, save_story
from .workspace import Workspace, WorkspaceError, check_image_upload, check_story_upload, safe_name

__all__ = ["Studio", "StudioError", "STORY_FILE"]

STORY_FILE = "story.json"  # the story of a run, beside its manifest


class StudioError(ValueError):
    """A user action the studio refuses; the message says why and what to do."""


def _first_changed_shot(old: dict, new: Story) -> Optional[int]:
    """0-based index of the first shot where ``new`` differs from the rendered story ``old`` (None: same shots)."""
    rendered = [(s.scene, s.prompt, s.cut, s.first_frame_prompt) for s in Story.from_dict(old)]
    wanted = [(s.scene, s.prompt, s.cut, s.first_frame_prompt) for s in new]
    for i, (a, b) in enumerate(zip(rendered, wanted)):
        if a != b:
            return i
    return None if len(rendered) == len(wanted) else min(len(rendered), len(wanted))


class Studio:
    """The studio's state: a workspace, the render options every run starts from, one render worker."""

    def __init__(self, options: StudioOptions, url: str = ""):
        self.options = options
        self.workspace = Workspace(options.workspace)
        self.owner = f"storymem studio at {url}" if url else "storymem studio"
        self.runner = RenderRunner(owner=self.owner)
        self.upload_roots: list[Path] = [self.workspace.root]

    # ------------------------------------------------------------------ helpers
    def folder(self, run: str) -> Path:
        try:
            return self.workspace.run_folder((run or "").strip())
        except WorkspaceError as err:
            raise StudioError(str(err)) from None

    @contextlib.contextmanager
    def _locked(self, run: str, purpose: str):
        """The run folder, locked for a change made outside a render."""
        folder = self.folder(run)
        try:
            with FolderLock(folder, owner=self.owner, purpose=purpose):
                yield folder
        except FolderLockError as err:
            raise StudioError(str(err)) from None

    # ------------------------------------------------------------------ stories
    def check(self, draft: StoryDraft) -> tuple[Optional[Story], list[Issue]]:
        return check_rows(draft.name, draft.overview, draft.rows)

    def open_story(self, name: str) -> StoryDraft:
        try:
            path = self.workspace.resolve(f"{Workspace.STORIES}/{safe_name(name, 'story file')}", must_exist=True)
            story = load_story(path)
        except (WorkspaceError, StoryError) as err:
            raise StudioError(str(err).replace(str(self.workspace.root) + "/", "")) from None
        return StoryDraft(story.name, story.overview, rows_from_story(story))

    def upload_story(self, path: str, display_name: Optional[str] = None) -> tuple[StoryDraft, str]:
        """A story file from the browser: validated, kept in stories/ (a free name), loaded into the editor."""
        display_name = Path(display_name or path).name
        try:
            story = check_story_upload(path, self.upload_roots, display_name=display_name)
            stem = Path(display_name).stem
            name = self._free_story_name(stem)
        except WorkspaceError as err:
            raise StudioError(str(err)) from None
        save_story(self.workspace.story_path(name), story)
        return StoryDraft(story.name, story.overview, rows_from_story(story)), name

    def _free_story_name(self, stem: str) -> str:
        from .workspace import slug

        base = slug(stem)
        for i in range(1, 1000):
            name = f"{base}.json" if i == 1 else f"{base}-{i}.json"
            if not self.workspace.story_path(name).exists():
                return name
        raise StudioError(f"too many stories named {base}")

    def import_text(self, text: str) -> StoryDraft:
        try:
            return draft_from_json_text(text or "")
        except StoryError as err:
            raise StudioError(str(err)) from None

    def save_story(self, file_name: str, draft: StoryDraft) -> tuple[Optional[str], list[Issue]]:
        """Save the draft as stories/FILE (ST-Bench JSON); nothing is written when it has issues."""
        story, issues = self.check(draft)
        if story is None:
            return None, issues
        try:
            path = self.workspace.story_path((file_name or "").strip() or "story")
        except WorkspaceError as err:
            raise StudioError(str(err)) from None
        save_story(path, story)
        return path.name, []

    # ------------------------------------------------------------------ runs
    def open_run(self, run: str) -> StoryDraft:
        folder = self.folder(run)
        manifest = read_manifest(folder)
        try:
            if (folder / STORY_FILE).is_file():
                story = load_story(folder / STORY_FILE)
            elif manifest:
                story = Story.from_dict(manifest["story"])
            else:
                raise StudioError(f"run {run!r} has no story yet")
        except StoryError as err:
            raise StudioError(str(err)) from None
        return StoryDraft(story.name, story.overview, rows_from_story(story))

    def start_render(self, run: str, draft: StoryDraft, seed: Optional[int] = None,
                     from_shot: Optional[int] = None) -> str:
        """Render the draft into runs/RUN in the background: resume, re-render from the first shot the draft
        changed, or (``from_shot``, 1-based) from that shot. Returns what the page says."""
        story, issues = self.check(draft)
        if story is None:
            raise StudioError("fix the story first: " + "; ".join(str(i) for i in issues[:3]))
        folder = self.folder(run)
        manifest = read_manifest(folder)
        if manifest and from_shot is None:
            old = manifest.get("story", {})
            if (old.get("story_name"), old.get("story_overview", "")) != (story.name, story.overview):
                raise StudioError(f"run {run!r} was rendered as {old.get('story_name')!r} with its overview; a new "
                                  "title or overview needs a new run")
            changed = _first_changed_shot(old, story)
            if len(story) < len(manifest.get("shots", [])):
                raise StudioError(f"the story now has {len(story)} shots but run {run!r} has rendered "
                                  f"{len(manifest['shots'])}; render the shorter story into a new run folder")
            if changed is not None:  # re-render from there (or resume, when it is not rendered yet)
                from_shot = min(changed, len(manifest.get("shots", []))) + 1
        story.path = folder / STORY_FILE
        changes = {} if seed is None else {"seed": int(seed)}
        template = self.options.render

        def before(folder: Path, start: int) -> None:
            takes.archive_from(folder, start)
            save_story(folder / STORY_FILE, story)

        def after(folder: Path) -> None:
            index = takes.sync(folder)
            memory_edit.sync_manifest_edits(folder, index)

        try:
            self.runner.start(run, folder, story, dataclasses.replace(template, **changes), from_shot=from_shot,
                              before=before, after=after)
        except (StudioBusy, FolderLockError, RenderError, StoryError, ValueError) as err:
            raise StudioError(str(err).replace(str(self.workspace.root) + "/", "")) from None
        where = f"from shot {from_shot}" if from_shot else "resuming after the finished shots" if manifest else ""
        return f"rendering {run} {where}".strip()

    def stop(self) -> str:
        if not self.runner.busy:
            return "nothing is rendering"
        self.runner.stop()
        return "stopping after the current denoising step"

    def progress(self) -> dict:
        return self.runner.status()

    def run_state(self, run: str) -> dict:
        """What the page shows of a run: manifest, takes per shot (synced), stale shots, keyframe scores, edits."""
        folder = self.folder(run)
        manifest = read_manifest(folder)
        if not manifest:
            return {"folder": folder, "manifest": None, "takes": {}, "stale": set(), "scores": {}, "edits": []}
        index = takes.sync(folder, manifest)
        stale = {e["stem"] for i, e in enumerate(manifest.get("shots", [])) if takes.is_stale(folder, manifest, i)}
        scores = {}
        for entry in manifest.get("shots", []):
            path = scores_path(folder, entry["stem"])
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if [k["frame"] for k in record.get("keyframes", [])] != [k["frame"] for k in entry.get("keyframes", [])]:
                continue  # another take's record
            if record.get("scorer") == "NullScorer":  # no aesthetic model: its constant says nothing
                record["keyframes"] = [dict(k, aesthetic=None) for k in record["keyframes"]]
            scores[entry["stem"]] = {k["frame"]: k for k in record["keyframes"]}
        return {"folder": folder, "manifest": manifest, "takes": index, "stale": stale, "scores": scores,
                "edits": memory_edit.list_edits(folder)}

    # ------------------------------------------------------------------ memory
    def memory(self, run: str, shot: int) -> list[memory_edit.BankItem]:
        """The frames of the bank shot ``shot`` (1-based) is drawn from."""
        try:
            _, items = memory_edit.bank_items(self.folder(run), int(shot) - 1)
        except memory_edit.MemoryEditError as err:
            raise StudioError(str(err)) from None
        return items

    def edit_memory(self, run: str, shot: int, remove: Sequence[str] = (), pin: Sequence[str] = (),
                    uploads: Sequence[Any] = ()) -> dict:
        """Remove / pin frames of the bank shot ``shot`` (1-based) is drawn from and add uploaded images."""
        added = []
        for upload in uploads or ():
            path = getattr(upload, "name", None) or getattr(upload, "path", None) or str(upload)
            try:
                added.append((Path(path).name, check_image_upload(path, self.upload_roots)))
            except WorkspaceError as err:
                raise StudioError(str(err)) from None
        self._refuse_while_rendering(run)
        with self._locked(run, f"editing the memory before shot {shot}") as folder:
            try:
                return memory_edit.apply_edit(folder, int(shot) - 1, remove, pin, added)
            except memory_edit.MemoryEditError as err:
                raise StudioError(str(err)) from None

    def _refuse_while_rendering(self, run: str) -> None:
        if self.runner.busy and self.runner.status().get("run") == run:
            raise StudioError(f"run {run!r} is rendering; stop it or wait before changing it")

    # ------------------------------------------------------------------ takes
    def takes(self, run: str, stem: str) -> dict:
        folder = self.folder(run)
        takes.sync(folder)
        return takes.takes_of(folder, safe_name(stem, "shot"))

    def pick_take(self, run: str, stem: str, take: int) -> str:
        self._refuse_while_rendering(run)
        with self._locked(run, f"picking take {take} of shot {stem}") as folder:
            try:
                takes.pick(folder, safe_name(stem, "shot"), int(take))
            except (takes.TakeError, WorkspaceError) as err:
                raise StudioError(str(err)) from None
        return f"shot {stem} now uses take {take}; the story video and contact sheet follow it"

    def cli_command(self, run: str) -> str:
        """The `storymem render` line that resumes this run from a terminal (with the seed it was rendered with)."""
        folder = self.folder(run)
        manifest = read_manifest(folder) or {}
        seed = manifest.get("settings", {}).get("seed", self.options.render.seed)
        extra = [] if seed == self.options.render.seed else ["--seed", str(seed)]
        args = " ".join(_quote(a) for a in self.options.render_args + extra)
        return (f"storymem render --story {_quote(str(folder / STORY_FILE))} --out {_quote(str(folder))}"
                + (f" {args}" if args else ""))


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
