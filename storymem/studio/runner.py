"""The studio's render worker, and the one place where the studio meets the renderer.

Everything the studio knows about :mod:`storymem.render` is in this module: the render CLI's options (parsed
by the renderer's own parser, so the studio takes the same flags and presets), ``prepare`` / ``StoryRenderer``
to run a render, and how a render folder's derived outputs are rebuilt.

:class:`RenderRunner` renders one story at a time in a background thread:

* one render per folder: the folder's :class:`~storymem.locking.FolderLock` is held from the moment the render
  is accepted until its thread ends;
* progress per shot comes from the folder's manifest (the renderer lists a shot there once its files are
  complete), progress per denoising step from the pipeline's ``callback_on_step_end``, which the studio adds to
  every call of the pipeline it loaded (:class:`SteppedPipeline`);
* stop: the step callback raises :class:`RenderStopped`, which unwinds the renderer before the shot it was
  drawing is written; the finished shots stay listed, and a later start resumes after them;
* the keyframe selector is wrapped so each shot's keyframe scores are kept (``studio/scores/SS_NN.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..atomic import atomic_write_json
from ..locking import FolderLock, FolderLockError
from ..render import MANIFEST_NAME, RenderError, RenderOptions, StoryRenderer, build_selector, \
    load_render_pipeline, prepare

__all__ = ["RenderRunner", "RenderStopped", "StudioBusy", "SteppedPipeline", "StudioOptions", "build_parser",
           "parse_args", "read_manifest", "write_manifest", "refresh_outputs", "scores_path", "bank_folder",
           "shot_parts", "reference_file", "STUDIO_DIR"]

STUDIO_DIR = "studio"  # the studio's own records inside a render folder
# Flags of `storymem render` that the page decides instead (the story, the folder, where to start).
_PAGE_FLAGS = {"story": "--story", "out_dir": "--out", "from_shot": "--from-shot", "force": "--force",
               "demo": "--demo", "progress": "--no-progress", "cp_degree": "--cp-degree"}


class RenderStopped(Exception):
    """Raised inside the pipeline's step callback when the page asked the render to stop."""


class StudioBusy(RuntimeError):
    """A render is already running in this studio."""


# ---------------------------------------------------------------------------------------------- options
def _render_cli():
    """(build_parser, options_from_args) of the render command."""
    from ..render.cli import build_parser as render_parser, options_from_args

    return render_parser, options_from_args


@dataclasses.dataclass
class StudioOptions:
    """The parsed ``storymem studio`` command line."""

    workspace: Path
    host: str
    port: int
    render: RenderOptions  # the template every run of the page starts from
    render_args: list[str]  # the render flags as `storymem render` takes them (for the page's CLI line)


def build_parser() -> argparse.ArgumentParser:
    """``storymem studio``'s parser: the studio's flags plus every model and sampling flag of ``storymem render``."""
    render_parser, _ = _render_cli()
    parser = argparse.ArgumentParser(
        prog="storymem studio", parents=[render_parser()], conflict_handler="resolve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="A web page to write a story, watch it render shot by shot, and curate its memory. It serves "
                    "on 127.0.0.1 and keeps everything in --workspace. Model and sampling flags are those of "
                    "`storymem render`; without --base it uses the bundled small model on the CPU.")
    group = parser.add_argument_group("studio")
    group.add_argument("--workspace", default="storymem_studio",
                       help="folder the page reads and writes (stories/, runs/); created if missing")
    group.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 exposes the page to "
                                                           "your network: it has no login)")
    group.add_argument("--port", type=int, default=7860, help="port to serve on (0: any free port)")
    for action in parser._actions:
        if action.dest in _PAGE_FLAGS:  # the page sets these
            action.help = argparse.SUPPRESS
        elif action.dest == "base":
            action.help = ("Wan2.2-I2V diffusers folder or hub id, or a built-in model: 'toy' (the small world's "
                           "trained model) or 'tiny' (random weights); default: 'toy' with its adapter, on the CPU")
        elif action.dest == "parallel":
            action.help = argparse.SUPPRESS  # context parallelism needs torchrun: `storymem render` only
    return parser


def parse_args(argv: Sequence[str]) -> StudioOptions:
    """Parse ``storymem studio`` flags; raises RenderError (bad flag values) or SystemExit (argparse)."""
    from ..builtin import BUILTIN_BASES

    argv = list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = vars(parser.parse_args([]))
    for dest, flag in _PAGE_FLAGS.items():
        if getattr(args, dest, None) != defaults.get(dest):
            raise RenderError(f"{flag}: the studio sets this in the page; drop it")
    if getattr(args, "parallel", "none") != "none":
        raise RenderError("--parallel: the studio renders in one process; use `torchrun ... storymem render "
                          "--parallel` for context parallelism")
    _, options_from_args = _render_cli()
    builtin = args.base in (None, *BUILTIN_BASES)
    # The bundled model renders like `storymem demo` (built-in base, its adapter, the CPU); a real base like
    # `storymem render` (the story flag only satisfies the parser: the page supplies the story).
    args.demo, args.story = builtin, None
    if not builtin:
        from ..builtin import DEMO_STORY

        args.story = [DEMO_STORY]
    _, options = options_from_args(args)
    studio = {"--workspace", "--host", "--port"}
    render_args, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item.split("=", 1)[0] in studio:
            skip = "=" not in item
            continue
        render_args.append(item)
    if args.base is None:
        render_args = ["--base", options.base] + (["--lora", options.lora] if options.lora else []) + render_args
    if builtin and args.device is None:
        render_args += ["--device", options.device or "cpu"]
    return StudioOptions(workspace=Path(args.workspace), host=args.host, port=args.port, render=options,
                         render_args=render_args)


def run_options(template: RenderOptions, folder: Path, from_shot: Optional[int] = None, **changes) -> RenderOptions:
    """The options of one render of the page into ``folder`` (``from_shot``: 1-based, re-render from there)."""
    fresh = not (folder / MANIFEST_NAME).is_file()
    return dataclasses.replace(template, out_dir=folder, from_shot=None if from_shot is None else str(from_shot),
                               # a new folder holds the lock file (and the story): not empty, but no render yet
                               force=fresh, progress=False, **changes)


# ---------------------------------------------------------------------------------------------- folder files
def read_manifest(folder: Path) -> Optional[dict]:
    """The render manifest of ``folder``, or None when it has none (or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(folder: Path, manifest: dict) -> None:
    """Replace the manifest (atomically). Only while holding the folder's lock, with no render running."""
    from datetime import datetime, timezone

    manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(Path(folder) / MANIFEST_NAME, manifest)


def refresh_outputs(folder: Path, manifest: Optional[dict] = None) -> None:
    """Rebuild the story video, contact sheet and index.html from the manifest's shots (no model needed)."""
    from ..render.outputs import write_story_outputs

    manifest = manifest if manifest is not None else read_manifest(Path(folder))
    if manifest is not None:
        write_story_outputs(Path(folder), manifest)


def scores_path(folder: Path, stem: str) -> Path:
    return Path(folder) / STUDIO_DIR / "scores" / f"{stem}.json"


# The render folder's layout, as the renderer writes it.
def bank_folder(folder: Path, stem: str) -> Path:
    """The memory bank the renderer saved after shot ``stem`` (what ``--from-shot`` of the next one restores)."""
    return Path(folder) / "memory" / f"after_{stem}"


def shot_parts(folder: Path, entry: dict) -> dict[str, Path]:
    """The files of a finished shot (its manifest ``entry``): video, keyframes, samples, the bank after it."""
    folder, stem = Path(folder), entry["stem"]
    return {"video": folder / entry["file"], "keyframes": folder / "keyframes" / stem,
            "samples": folder / "samples" / stem,
            "memory": folder / entry["memory_state"] if entry.get("memory_state") else bank_folder(folder, stem)}


def reference_file(position: int) -> str:
    """Where the renderer's manifest says reference image ``position`` of the bank is (``references/ref_NN.png``)."""
    return f"references/ref_{position:02d}.png"


# ---------------------------------------------------------------------------------------------- hooks
class SteppedPipeline:
    """A loaded pipeline whose every call reports each denoising step (``callback_on_step_end``); everything
    else (attributes, LoRA switches, scheduler changes) goes to the pipeline itself."""

    def __init__(self, pipe, on_call: Callable[[dict], None], on_step: Callable[[int, int], None]):
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "_on_call", on_call)
        object.__setattr__(self, "_on_step", on_step)

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):
        setattr(self._pipe, name, value)

    def __call__(self, *args, **kwargs):
        steps = int(kwargs.get("num_inference_steps") or 0)
        self._on_call(kwargs)
        user_callback = kwargs.pop("callback_on_step_end", None)

        def on_step_end(pipe, step, timestep, tensors):
            self._on_step(step + 1, steps)  # may raise RenderStopped
            return user_callback(pipe, step, timestep, tensors) if user_callback else {}

        return self._pipe(*args, callback_on_step_end=on_step_end, **kwargs)


class _RecordingSelector:
    """The keyframe selector, keeping what each selection scored (``studio/scores/SS_NN.json``)."""

    def __init__(self, selector, runner: "RenderRunner"):
        self._selector = selector
        self._runner = runner

    def __getattr__(self, name):
        return getattr(self._selector, name)

    def extract(self, frames, memory=()):
        self._runner._set(phase="choosing keyframes")
        selection = self._selector.extract(frames, memory)
        try:
            self._runner._record_selection(selection, memory, type(getattr(self._selector, "scorer", None)).__name__)
        except Exception as err:  # a record, never a reason to lose the shot
            self._runner._set(message=f"keyframe scores not kept: {err}")
        return selection


# ---------------------------------------------------------------------------------------------- worker
@dataclasses.dataclass
class _Job:
    run: str
    folder: Path
    story: Any
    plan: Any
    options: RenderOptions
    start: int
    lock: FolderLock
    after: Optional[Callable[[Path], None]]


class RenderRunner:
    """Renders one story at a time in a background thread (see the module doc).

    Args:
        owner: how the folder lock names this studio ("storymem studio at http://127.0.0.1:7860").
    """

    def __init__(self, owner: str = "storymem studio"):
        self.owner = owner
        self._state: dict = {"state": "idle", "run": None}
        self._mutex = threading.Lock()
        self._starting = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._job: Optional[_Job] = None
        self._pipes: dict = {}
        self._selectors: dict = {}

    # ------------------------------------------------------------------ state
    def _set(self, **values) -> None:
        with self._mutex:
            self._state.update(values)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        """A snapshot: state (idle, loading, rendering, stopping, finished, stopped, failed), run, shot (0-based),
        step/steps, done/total shots (read from the manifest), phase, message, elapsed seconds."""
        with self._mutex:
            state = dict(self._state)
        job = self._job
        if job is not None:
            manifest = read_manifest(job.folder)
            state["done"] = len(manifest.get("shots", [])) if manifest else 0
            state["total"] = len(job.story)
            if state.get("started"):
                state["elapsed"] = round((state.get("ended") or time.time()) - state["started"], 1)
        return state

    # ------------------------------------------------------------------ control
    def start(self, run: str, folder: Path, story, options: RenderOptions, from_shot: Optional[int] = None,
              before: Optional[Callable[[Path, int], None]] = None,
              after: Optional[Callable[[Path], None]] = None) -> dict:
        """Validate and start rendering ``story`` into ``folder`` (``from_shot``: 1-based, re-render from there;
        default: resume after the finished shots). ``before(folder, start)`` runs once the render is accepted
        and before it writes (the lock is held); ``after(folder)`` when it ends, still under the lock.
        Raises StudioBusy, FolderLockError, or the render's own input errors (nothing is written then)."""
        if not self._starting.acquire(blocking=False):
            raise StudioBusy("another render is being started; try again in a moment")
        try:
            return self._start(run, Path(folder), story, options, from_shot, before, after)
        finally:
            self._starting.release()

    def _start(self, run, folder: Path, story, options, from_shot, before, after) -> dict:
        if self.busy:
            current = self._state.get("run")
            raise StudioBusy(f"a render of {current!r} is running; stop it before starting another")
        created = not folder.exists()
        lock = FolderLock(folder, owner=self.owner, purpose=f"rendering {run}")
        lock.acquire()
        try:
            options = run_options(options, folder, from_shot)
            plan = prepare(story, options, selector=self._selector(options))
            start = plan.start
            if before is not None:
                before(folder, start)
        except BaseException:
            lock.release()
            if created and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # refused before anything was written: leave no empty run behind
            raise
        self._stop.clear()
        self._job = _Job(run, folder, story, plan, options, start, lock, after)
        with self._mutex:
            self._state = {"state": "loading", "run": run, "shot": None, "step": 0, "steps": plan.options.steps,
                           "phase": "loading the model", "message": "", "started": time.time(), "ended": None,
                           "from": start}
        self._thread = threading.Thread(target=self._work, args=(self._job,), name=f"storymem-render-{run}",
                                        daemon=True)
        self._thread.start()
        return self.status()

    def stop(self, wait: Optional[float] = None) -> None:
        """Ask the running render to stop after the current denoising step (``wait``: seconds to wait for it)."""
        if not self.busy:
            return
        self._stop.set()
        self._set(state="stopping", phase="stopping after this step")
        if wait:
            self._thread.join(wait)

    def wait(self, timeout: Optional[float] = None) -> dict:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    # ------------------------------------------------------------------ models
    def _pipeline(self, options: RenderOptions):
        from ..render.speed import pipeline_record

        resolved = options.resolved()
        key = (resolved.base, resolved.dtype, resolved.device, resolved.offload, resolved.attention_backend,
               resolved.preset, resolved.compile, resolved.low_vram,
               json.dumps(pipeline_record(resolved), sort_keys=True, default=str))
        if key not in self._pipes:
            self._pipes.clear()  # one model in memory at a time
            self._pipes[key] = load_render_pipeline(options)
        return self._pipes[key]

    def _selector(self, options: RenderOptions):
        if options.memory_source != "keyframes":
            return None
        resolved = options.resolved()
        key = (resolved.embedder, resolved.aesthetic, resolved.hpsv3_checkpoint, resolved.hpsv3_base,
               resolved.keyframe_threshold, resolved.device)
        if key not in self._selectors:
            self._selectors.clear()
            self._selectors[key] = build_selector(options)
        return _RecordingSelector(self._selectors[key], self)

    # ------------------------------------------------------------------ callbacks (render thread)
    def _current_shot(self) -> int:
        """The shot being drawn: the renderer lists shots in order, so it is the first one not listed."""
        manifest = read_manifest(self._job.folder)
        return len(manifest.get("shots", [])) if manifest else self._job.start

    def _on_call(self, kwargs: dict) -> None:
        if self._stop.is_set():
            raise RenderStopped()
        shot = self._current_shot()
        stem = self._job.story[shot].file_stem if shot < len(self._job.story) else None
        self._set(state="rendering", shot=shot, stem=stem, step=0, steps=int(kwargs.get("num_inference_steps") or 0),
                  phase="denoising")

    def _on_step(self, step: int, steps: int) -> None:
        self._set(step=step, steps=steps, phase="denoising" if step < steps else "decoding")
        if self._stop.is_set():
            raise RenderStopped()

    def _record_selection(self, selection, memory, scorer: str) -> None:
        import torch

        job = self._job
        shot = self._current_shot()
        stem = job.story[shot].file_stem
        similarity = [None] * len(selection.indices)
        if isinstance(memory, torch.Tensor) and len(memory) and len(selection.indices):
            kept = torch.nn.functional.normalize(selection.embeddings.float(), dim=-1)
            mem = torch.nn.functional.normalize(memory.float(), dim=-1)
            similarity = [round(float(v), 4) for v in (kept @ mem.T).max(dim=1).values]
        keyframes = [{"frame": int(i), "aesthetic": _round(selection.scores.get(i)), "memory_similarity": s}
                     for i, s in zip(selection.indices, similarity)]
        dropped = [int(i) for i in selection.candidates if i not in selection.indices]
        atomic_write_json(scores_path(job.folder, stem), {
            "shot": shot, "stem": stem, "threshold": _round(selection.threshold), "keyframes": keyframes,
            "dropped_as_repeats": dropped, "scorer": scorer, "recorded": time.time()})

    # ------------------------------------------------------------------ the thread
    def _work(self, job: _Job) -> None:
        from ..memory import MemoryBankError
        from ..story import StoryError

        outcome = {"state": "finished", "message": ""}
        try:
            pipe = self._pipeline(job.options)
            if self._stop.is_set():
                raise RenderStopped()
            self._set(state="rendering", phase="starting")
            StoryRenderer(job.plan, pipe=SteppedPipeline(pipe, self._on_call, self._on_step), lock=job.lock).run()
        except RenderStopped:
            outcome = {"state": "stopped", "message": "stopped; the finished shots are kept: start again to resume"}
        except (RenderError, StoryError, MemoryBankError, FolderLockError, ValueError, OSError) as err:
            outcome = {"state": "failed", "message": str(err)}
        except Exception as err:  # shown on the page; the traceback goes to the server's log
            traceback.print_exc()
            outcome = {"state": "failed", "message": f"{type(err).__name__}: {err}"}
        finally:
            # The end state is published only once the folder's records are complete and the lock is free.
            try:
                if job.after is not None:
                    job.after(job.folder)
            except Exception as err:
                traceback.print_exc()
                outcome["message"] = f"{outcome['message']} (after the render: {err})".strip()
            finally:
                job.lock.release()
                self._set(**outcome, phase="", ended=time.time())


def _round(value) -> Optional[float]:
    return None if value is None else round(float(value), 4)
