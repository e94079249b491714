"""Render a whole benchmark: several stories into sub-folders of one batch folder, shared between the
processes of a ``torchrun`` / ``accelerate launch`` launch (data parallel), optionally in groups that split
each shot with context parallelism (``--parallel ulysses|ring --cp-degree G``).

    storymem render --story stories/ --out renders/bench [...]                       # one process
    torchrun --nproc-per-node 8 -m storymem render --story stories/ --out renders/bench [...]

Layout of ``--out``::

    BATCH/<story file stem>/   one render folder per story (as ``storymem render`` writes it)
    BATCH/batch.json           the batch record: stories and their state, settings, seeds, versions, hardware
    BATCH/.batch/              bookkeeping: one lock file and one status file per story, events.jsonl

How the work is shared: every script is read and checked first (a broken one is reported by name and
skipped), and every story's folder is checked against the settings before any model loads. Then each process
(each group's leader) walks the sorted story list and claims the first story nobody holds: once per launch in
the launcher's key-value store, and with the story's lock file (``flock``, released by the kernel when its
process ends, so a killed process's story is free again on a rerun). Only the claimer writes a story's files;
each story resumes on its own, from its manifest, whoever rendered it before. A story that fails is recorded
with its error and the process moves on. The models load once per process, on its first story.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..atomic import atomic_write_json
from ..locking import FolderLock, FolderLockError, describe_holder, read_lock_holder
from .batch_world import BatchWorld
from .options import RenderError, RenderOptions
from .plan import MANIFEST_NAME, now, prepare, read_manifest
from .renderer import StoryRenderer

__all__ = ["BATCH_RECORD", "BATCH_FORMAT", "BATCH_VERSION", "STATE_DIR", "BatchStory", "BatchLayout", "BatchRun",
           "find_story_files", "load_batch_stories", "check_batch_options", "render_batch", "story_states",
           "batch_record", "write_batch_record", "format_summary"]

BATCH_RECORD = "batch.json"
BATCH_FORMAT = "storymem-batch"
BATCH_VERSION = 1
STATE_DIR = ".batch"
STORY_SUFFIXES = (".json", ".txt")
# Errors of one story's inputs or folder: recorded for that story, the batch goes on.
_STORY_ERRORS = (RenderError, ValueError, OSError)


# ---------------------------------------------------------------------------------------------- stories
@dataclass
class BatchStory:
    """One story of a batch: ``name`` is its script's file stem and its sub-folder; ``story`` is None when the
    script is broken (``error`` says why)."""

    name: str
    path: Path
    story: Any = None
    error: Optional[str] = None

    @property
    def num_shots(self) -> int:
        return len(self.story) if self.story is not None else 0


def find_story_files(sources: Sequence) -> list[Path]:
    """The story scripts of ``--story`` values: files as given, folders as their ``*.json`` / ``*.txt`` files
    (sorted). Two scripts with one file stem would share a sub-folder: refused, naming both."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(f for f in path.iterdir()
                           if f.is_file() and f.suffix.lower() in STORY_SUFFIXES and not f.name.startswith("."))
            if not found:
                raise RenderError(f"--story {path}: the folder holds no story scripts (*.json, *.txt)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise RenderError(f"--story {path}: not found")
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.name.startswith("."):
            raise RenderError(f"--story {path}: a hidden file name cannot name a story's folder")
        other = by_stem.setdefault(path.stem, path)
        if other.resolve() != path.resolve():
            raise RenderError(f"--story: {other} and {path} would both render into the sub-folder "
                              f"{path.stem!r}; rename one")
    return list(by_stem.values())


def load_batch_stories(files: Sequence[Path]) -> list[BatchStory]:
    """Read every script before anything loads; a broken one is kept with its error (it is reported, not
    rendered)."""
    from ..story import StoryError, load_story

    stories = []
    for path in files:
        try:
            stories.append(BatchStory(Path(path).stem, Path(path), story=load_story(path)))
        except StoryError as err:
            stories.append(BatchStory(Path(path).stem, Path(path), error=str(err)))
    return stories


# ---------------------------------------------------------------------------------------------- the folder
class BatchLayout:
    """Paths of a batch folder, the per-story status files and the event log."""

    def __init__(self, root):
        self.root = Path(root)
        self.state = self.root / STATE_DIR

    @property
    def record_path(self) -> Path:
        return self.root / BATCH_RECORD

    def story_dir(self, name: str) -> Path:
        return self.root / name

    def status_path(self, name: str) -> Path:
        return self.state / f"{name}.json"

    def lock(self, name: str, owner: str) -> FolderLock:
        return FolderLock(self.state, owner=owner, purpose=f"story {name}", name=f"{name}.lock")

    def holder(self, name: str) -> Optional[dict]:
        return read_lock_holder(self.state, f"{name}.lock")

    def read_status(self, name: str) -> dict:
        try:
            data = json.loads(self.status_path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_status(self, name: str, **fields) -> None:
        atomic_write_json(self.status_path(name), dict(fields, story=name, updated=now()))

    def log(self, event: str, **fields) -> None:
        """Append one line to ``events.jsonl`` (one ``write`` of an O_APPEND file: lines of several processes
        do not mix)."""
        self.state.mkdir(parents=True, exist_ok=True)
        line = json.dumps(dict(time=now(), event=event, **fields), ensure_ascii=False) + "\n"
        fd = os.open(self.state / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    def events(self) -> list[dict]:
        try:
            lines = (self.state / "events.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def check(self) -> None:
        """The folder can hold a batch: a RenderError naming it when it is a file, holds one story's render, or
        cannot be written."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise RenderError(f"--out {root}: exists and is not a folder")
        if (root / MANIFEST_NAME).exists():
            raise RenderError(f"--out {root}: holds the render of one story ({MANIFEST_NAME}); a batch renders "
                              "each story into a sub-folder: choose another --out")
        existing = root if root.exists() else next(p for p in root.parents if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise RenderError(f"--out {root}: {existing} is not writable")


def _manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return read_manifest(path)
    except RenderError:
        return None


def story_states(layout: BatchLayout, stories: Sequence[BatchStory], errors: Optional[dict] = None) -> list[dict]:
    """Each story's state as the folder shows it: ``finished`` (its manifest says so), ``failed`` (with the
    error: ``errors`` found now, else its status file's), ``invalid`` (a broken script), ``incomplete`` (some
    shots rendered) or ``pending``; with who rendered it last."""
    errors = errors or {}
    states = []
    for bs in stories:
        entry: dict[str, Any] = {"name": bs.name, "script": str(bs.path), "folder": bs.name}
        if bs.story is None:
            states.append(dict(entry, status="invalid", error=bs.error, num_shots=None, shots_done=0))
            continue
        manifest = _manifest(layout.story_dir(bs.name))
        done = min(len(manifest.get("shots", [])), bs.num_shots) if manifest else 0
        status = layout.read_status(bs.name)
        entry.update(story_name=bs.story.name, num_shots=bs.num_shots, shots_done=done, error=None)
        if bs.name in errors:
            entry.update(status="failed", error=errors[bs.name])
        elif manifest and manifest.get("finished") and done == bs.num_shots:
            entry["status"] = "finished"
        elif status.get("state") in ("failed", "interrupted"):
            entry.update(status=status["state"], error=status.get("error"))
        else:
            entry["status"] = "incomplete" if done else "pending"
        for key in ("rendered_by", "render_s", "started", "ended"):
            if status.get(key) is not None:
                entry[key] = status[key]
        states.append(entry)
    return states


# ---------------------------------------------------------------------------------------------- options
def check_batch_options(options: RenderOptions) -> RenderOptions:
    """The options every story shares, resolved and checked once (a bad flag ends the batch before anything
    starts). Context parallelism is checked per group by :class:`BatchWorld` and per story size here."""
    if options.from_shot is not None:
        raise RenderError("--from-shot applies to one story; render that story on its own with --story FILE "
                          "--out BATCH/NAME --from-shot K")
    resolved = options.resolved()
    dataclasses.replace(resolved, parallel="none").validate()
    if resolved.parallel != "none" and resolved.offload != "none":
        raise RenderError(f"--parallel {resolved.parallel} keeps each expert on every GPU; use --offload none")
    return resolved


def _prepare(bs: BatchStory, options: RenderOptions, layout: BatchLayout, selector, degree: int):
    """The story's plan in its sub-folder. The render-wide context-parallel check counts every process of the
    launch; a batch splits a shot over a group of ``degree``, checked here."""
    story_options = dataclasses.replace(options, out_dir=layout.story_dir(bs.name), progress=False)
    plan = prepare(bs.story, dataclasses.replace(story_options, parallel="none"), selector=selector)
    if options.parallel != "none":
        o = plan.options
        if ((o.height // 16) * (o.width // 16)) % degree:
            raise RenderError(f"--parallel {options.parallel}: the {o.height // 16}x{o.width // 16} tokens of a "
                              f"latent frame must split evenly over --cp-degree {degree} GPUs")
        plan.options = dataclasses.replace(o, parallel=options.parallel)
    return plan


# ---------------------------------------------------------------------------------------------- rendering
class _BatchStoryRenderer(StoryRenderer):
    """A story render that reports each finished shot (the batch's progress and event log)."""

    def __init__(self, plan, pipe=None, group=None, on_shot=None):
        super().__init__(plan, pipe=pipe, group=group)
        self.on_shot = on_shot

    def _render_shot(self, shot, *args, **kwargs):
        result = super()._render_shot(shot, *args, **kwargs)
        if self.on_shot is not None and self.is_main:
            self.on_shot(shot)
        return result


class _ModelsUnavailable(Exception):
    """The models could not be loaded: no story of this process can render."""


class BatchRun:
    """One process's part of a batch (see the module doc). ``run()`` returns the exit code all processes
    agree on: 0 when every story is finished, 1 otherwise (each unfinished story named in the record)."""

    def __init__(self, stories: Sequence[BatchStory], options: RenderOptions, world: BatchWorld,
                 progress: bool = True):
        from .batch_progress import BatchProgress

        self.stories = sorted(stories, key=lambda s: s.name)
        self.by_name = {s.name: s for s in self.stories}
        self.options = dataclasses.replace(options, device=world.device)
        self.world = world
        self.layout = BatchLayout(options.out_dir)
        self.errors: dict[str, str] = {}  # story -> error found by this process
        self.finished_before: set[str] = set()
        self.visited: set[str] = set()
        self.pipe = None
        self.selector = None
        self.owner = f"storymem render (batch rank {world.rank})"
        self.progress = BatchProgress(world, self.layout, self.stories, enabled=progress)

    # ------------------------------------------------------------------ setup
    def preflight(self) -> None:
        """Check every valid story against its folder before any model loads: a story that cannot render
        (other settings, an unreadable folder) is recorded as failed, a finished one is left alone."""
        from .models import build_selector

        if self.options.memory_source == "keyframes":
            self.selector = build_selector(self.options)  # its models load lazily, on the first keyframes
        for bs in self.stories:
            if bs.story is None:
                continue
            try:
                plan = _prepare(bs, self.options, self.layout, self.selector, self.world.cp_degree)
            except _STORY_ERRORS as err:
                self.errors[bs.name] = str(err)
                continue
            if plan.start >= len(bs.story):
                self.finished_before.add(bs.name)

    def _models(self):
        """The pipeline, loaded once per process on its first story (with the group's context parallelism)."""
        if self.pipe is None:
            from .models import load_render_pipeline
            from .parallel import enable_context_parallel

            o = self.options
            self._log(f"loading {o.base}" + (f" + adapter {o.lora}" if o.lora else ""))
            try:
                pipe = load_render_pipeline(o, device=self.world.device)
                if self.world.group is not None:
                    enable_context_parallel(pipe, o.parallel, self.world.cp_degree, o.attention_backend,
                                            mesh=self.world.group.mesh)
            except Exception as err:
                raise _ModelsUnavailable(f"{type(err).__name__}: {err}") from err
            self.pipe = pipe
        return self.pipe

    def _log(self, message: str) -> None:
        self.progress.write(f"[rank {self.world.rank}] {message}")

    # ------------------------------------------------------------------ claims
    def _wanted(self, bs: BatchStory) -> bool:
        return bs.story is not None and bs.name not in self.errors and (
            self.options.force or bs.name not in self.finished_before)

    def _claim_next(self) -> Optional[tuple[BatchStory, FolderLock]]:
        """The next story nobody holds, locked (leaders only)."""
        for bs in self.stories:
            if bs.name in self.visited or not self._wanted(bs):
                continue
            self.visited.add(bs.name)
            if not self.world.claim_in_launch(bs.name):
                continue  # another process of this launch has it
            lock = self.layout.lock(bs.name, self.owner)
            try:
                lock.acquire()
            except FolderLockError:
                self._log(f"{bs.name}: skipped, in use by {describe_holder(self.layout.holder(bs.name))}")
                continue
            return bs, lock
        return None

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        try:
            self._loop()
        except KeyboardInterrupt:
            self.progress.close()
            if self.world.world_size == 1:
                self.write_record([])
            return 130
        except _ModelsUnavailable:
            pass  # recorded for the story that needed them; this process claims no more
        self.progress.close()
        processes = self.world.gather_records()
        code = self.write_record(processes) if self.world.rank == 0 else None
        return self.world.agree(code)

    def _loop(self) -> None:
        while True:
            pick = self._claim_next() if self.world.is_leader else None
            name = self.world.share_in_group(pick[0].name if pick else None)
            if name is None:
                return
            try:
                self._render_one(self.by_name[name])
            finally:
                if pick is not None:
                    pick[1].release()

    def _render_one(self, bs: BatchStory) -> None:
        leader, layout = self.world.is_leader, self.layout
        error = None
        try:  # again under the claim: another process may have rendered shots since the preflight
            plan = _prepare(bs, self.options, layout, self.selector, self.world.cp_degree)
        except _STORY_ERRORS as err:
            plan, error = None, str(err)
        # Also the group's meeting point: every rank has read the folder before the leader writes to it.
        if not self.world.all_in_group(error is None):
            if leader:
                self._fail(bs, error or "its folder could not be read on another process of the group")
            return
        if plan.start >= len(bs.story):
            return  # finished by another process meanwhile
        try:
            pipe = self._models()
        except _ModelsUnavailable as err:
            self._fail(bs, f"cannot load the models: {err}")
            raise
        started = now()
        if leader:
            layout.write_status(bs.name, state="rendering", started=started, rendered_by=self._me())
            layout.log("claimed", story=bs.name, start=plan.start, **self._me())
            self.progress.story_started(bs, plan.start)
            self._log(f"{bs.name}: rendering shots {plan.start + 1}-{len(bs.story)} of {len(bs.story)}")
        t0 = time.perf_counter()

        def shot_done(shot):
            layout.log("shot", story=bs.name, shot=shot.index, stem=shot.file_stem, **self._me())
            self.progress.shot_done()

        renderer = _BatchStoryRenderer(plan, pipe=pipe, group=self.world.group, on_shot=shot_done)
        try:
            renderer.run()
        except KeyboardInterrupt:
            if leader:
                self._end(bs, "interrupted", started, t0, error="interrupted")
            raise
        except Exception as err:  # noqa: BLE001 - one story's failure must not stop the batch
            if not isinstance(err, RenderError):
                traceback.print_exc(file=sys.stderr)
            self._fail(bs, f"{type(err).__name__}: {err}" if not isinstance(err, RenderError) else str(err),
                       started, t0)
            self._free_memory()
            return
        if leader:
            self._end(bs, "finished", started, t0)
            self._log(f"{bs.name}: finished ({len(bs.story)} shots, {time.perf_counter() - t0:.0f} s)")
        self.progress.refresh()

    def _me(self) -> dict:
        import socket

        return {"rank": self.world.rank, "host": socket.gethostname(), "pid": os.getpid(),
                "device": self.world.device, "group": self.world.group_index}

    def _end(self, bs: BatchStory, state: str, started: str, t0: float, error: Optional[str] = None) -> None:
        self.layout.write_status(bs.name, state=state, error=error, started=started, ended=now(),
                                 render_s=round(time.perf_counter() - t0, 3), rendered_by=self._me())
        self.layout.log(state, story=bs.name, error=error, **self._me())

    def _fail(self, bs: BatchStory, error: str, started: Optional[str] = None, t0: Optional[float] = None) -> None:
        self.errors[bs.name] = error
        self._log(f"error: story {bs.name!r} failed: {error}")
        if self.world.is_leader:
            self._end(bs, "failed", started or now(), t0 or time.perf_counter(), error=error)

    def _free_memory(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the record
    def write_record(self, processes: list[dict]) -> int:
        """Write ``batch.json`` from the folder's state (whoever rendered each story, in this launch or an
        earlier one) and return the exit code."""
        states = story_states(self.layout, self.stories, self.errors)
        record = batch_record(self.options, self.world, states, processes)
        write_batch_record(self.layout, record)
        self.progress.write(format_summary(record))
        return 0 if record["summary"]["stories"] == record["summary"]["finished"] else 1


# ---------------------------------------------------------------------------------------------- batch.json
def batch_record(options: RenderOptions, world: BatchWorld, states: list[dict], processes: list[dict]) -> dict:
    """What the batch produced and what produced it: the stories' states, the shared settings (the exact
    per-story ones are in each manifest), seeds, the launch, the hardware of every process and the versions."""
    from collections import Counter

    from .batch_world import process_record
    from .plan import _versions

    processes = processes or [process_record(world.rank, world.device)]
    counts = Counter(entry["status"] for entry in states)
    summary = {"stories": len(states), **{key: counts.get(key, 0) for key in
                                          ("finished", "failed", "invalid", "incomplete", "interrupted", "pending")},
               "shots_done": sum(entry["shots_done"] for entry in states),
               "shots_total": sum(entry["num_shots"] or 0 for entry in states)}
    rule = "seed + shot index in the story" if options.seed_mode == "global" else "seed + shot index in its scene"
    return {
        "format": BATCH_FORMAT,
        "version": BATCH_VERSION,
        "updated": now(),
        "out_dir": str(Path(options.out_dir)),
        "summary": summary,
        "settings": options.settings(),
        "seeds": {"seed": options.seed, "seed_mode": options.seed_mode, "shot_seed": rule},
        "launch": {"world_size": world.world_size, "parallel": world.parallel, "cp_degree": world.cp_degree,
                   "groups": world.groups, "command": list(sys.argv)},
        "hardware": {"world_size": len(processes), "hosts": sorted({p["host"] for p in processes}),
                     "devices": dict(Counter(p.get("device_name") for p in processes)), "processes": processes},
        "versions": _versions(),
        "stories": states,
    }


def write_batch_record(layout: BatchLayout, record: dict, wait_s: float = 60.0) -> Path:
    """Write ``batch.json`` atomically, keeping when it was created and the earlier launches (several launches
    may finish at once: one writes at a time)."""
    lock = FolderLock(layout.state, owner="storymem render (batch record)", purpose="batch.json",
                      name="record.lock")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            break
        except FolderLockError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        previous = {}
        if layout.record_path.is_file():
            try:
                previous = json.loads(layout.record_path.read_text(encoding="utf-8"))
            except ValueError:
                previous = {}
        launch = dict(record["launch"], ended=record["updated"], hosts=record["hardware"]["hosts"])
        launches = [*previous.get("launches", []), launch][-50:]
        record = {**record, "created": previous.get("created", record["updated"]), "launches": launches}
        atomic_write_json(layout.record_path, record)
    finally:
        lock.release()
    return layout.record_path


def render_batch(stories: Sequence[BatchStory], options: RenderOptions, cp_degree: Optional[int] = None,
                 progress: bool = True) -> int:
    """Render ``stories`` into sub-folders of ``options.out_dir`` with this process's share of the launch;
    returns the exit code (0: every story finished; 1: some did not, see ``batch.json``; 2: bad options;
    130: interrupted). Every process of the launch calls this with the same arguments."""
    options = check_batch_options(options)
    BatchLayout(options.out_dir).check()
    world = BatchWorld.start(options.device, options.parallel, cp_degree)
    try:
        run = BatchRun(stories, options, world, progress=progress)
        run.preflight()
        return run.run()
    finally:
        world.close()


def format_summary(record: dict) -> str:
    """The batch in a few lines: counts, then every story that is not finished, with its reason."""
    s = record["summary"]
    lines = [f"batch {record['out_dir']}: {s['finished']} of {s['stories']} stories finished, "
             f"{s['shots_done']} of {s['shots_total']} shots"]
    for entry in record["stories"]:
        if entry["status"] != "finished":
            reason = entry.get("error") or (f"{entry['shots_done']} of {entry['num_shots']} shots"
                                            if entry.get("num_shots") else "")
            lines.append(f"  {entry['status']:<11} {entry['name']}" + (f": {reason}" if reason else ""))
    lines.append(f"record: {Path(record['out_dir']) / BATCH_RECORD}")
    return "\n".join(lines)
