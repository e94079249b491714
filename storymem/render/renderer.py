"""The shot loop: runs a :class:`~storymem.render.plan.RenderPlan` - takes the output folder's lock, loads the
models, renders the remaining shots one by one with the memory bank, and lists each shot in the manifest once its
files are complete. A shot whose frames decode to non-finite or constant values stops the render (it is not
listed), as broken weights would otherwise pass as an all-black shot."""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..defaults import MOTION_FRAMES, WAN_NEGATIVE_PROMPT
from . import models, outputs
from .options import RenderError, RenderOptions, check_model_capacity, shot_seed
from .parallel import ProcessGroup, enable_context_parallel
from .plan import (OUTPUT_FILES, OUTPUT_FOLDERS, RenderPlan, check_memory_rope, continued_manifest,
                   new_manifest, now, prepare, read_manifest)
from .speed import check_given_pipeline, prepare_speed, release_t2v, setup_pipeline, storymem_adapter_off

__all__ = ["StoryRenderer", "render_story", "SHOT_MODES"]

# How a shot is generated (recorded in the manifest).
SHOT_MODES = ("t2v", "base", "i2v", "m2v", "mi2v", "mm2v")


class StoryRenderer:
    """Runs a validated plan: loads the models, renders the remaining shots, writes the folder.

    Args:
        plan: from :func:`~storymem.render.prepare`.
        pipe: an already loaded :class:`~storymem.StoryMemPipeline` (e.g. from :func:`load_render_pipeline`,
            shared by several renders; ``--base``/placement are the caller's, its adapter settings the options'.
            The render gives it the preset's scheduler and expert boundary, passes ``options.memory_rope`` with
            each call, so one render's options do not leak into the next. Default: loaded from the options.
        group: the processes that render this story together, already started (a batch's group, see
            :mod:`~storymem.render.batch`); default: started from ``options.parallel`` when the render runs.
        lock: a held :class:`~storymem.locking.FolderLock` of the output folder, for a caller that took it itself
            (before :func:`prepare`); default: the render takes the folder's lock before it loads or writes
            anything and gives it back when it ends. A folder another render holds is a
            :class:`~storymem.locking.FolderLockError` naming the holder, at once.
    """

    def __init__(self, plan: RenderPlan, pipe=None, group: Optional[ProcessGroup] = None, lock=None):
        from ..memory.retrieval import TextRelevance, story_take_texts

        self.plan = plan
        self.options: RenderOptions = plan.options
        self.story = plan.story
        self.out_dir = Path(plan.options.out_dir)
        self.pipe = pipe
        self.adapter = None
        self.group = ProcessGroup()
        self.given_group = group  # a batch's group of processes for this story (None: started in run())
        self.device = self.options.device
        self.manifest: dict = {}
        self.timings: dict = {}
        self.speed = plan.speed if plan.speed is not None else prepare_speed(self.options)
        self.sampling: dict = {}  # steps and guidance of the I2V calls (the preset's)
        # Every keyframe keeps its take's text, so a bank saved now can be retrieved by prompt later.
        self.take_texts = story_take_texts(self.story)
        self.relevance = TextRelevance(self.take_texts)
        self.lock = lock
        self.settings: dict = {}  # this run's settings, as each shot it renders records them

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.group.is_main

    def _log(self, message: str):
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def _progress_config(self, pipe) -> None:
        pipe.set_progress_bar_config(desc="denoising", leave=False, disable=not (self.options.progress
                                                                                 and self.is_main))

    def _load_main_pipeline(self, shared: Optional[dict] = None):
        o = self.options
        t0 = time.perf_counter()
        if self.pipe is None:
            self._log(f"loading {o.base}" + (f" + adapter {o.lora}" if o.lora else ""))
            self.pipe = models.load_render_pipeline(o, shared=shared, device=self.device, speed=self.speed,
                                                    prompts=self._prompts())
            if o.parallel != "none":
                enable_context_parallel(self.pipe, o.parallel, self.group.world_size, o.attention_backend)
        else:
            check_given_pipeline(self.pipe, o)
        self.sampling = self.speed.preset.apply(self.pipe)  # scheduler, boundary: a render setting
        self.adapter = getattr(self.pipe, "storymem_adapter", None)
        self._progress_config(self.pipe)
        self.timings["load_s"] = self.timings.get("load_s", 0.0) + time.perf_counter() - t0
        for model in (self.pipe.transformer, getattr(self.pipe, "transformer_2", None)):
            if model is not None:  # the loaded (or given) model's RoPE table, in the mode now known
                check_model_capacity(o, model.config.rope_max_seq_len, tuple(model.config.patch_size),
                                     memory_rope=self.memory_rope, vae_stride=self.pipe.vae_scale_factor_spatial,
                                     model=f"--base {o.base}",
                                     memory_stride=getattr(self.pipe, "memory_rope_stride", None))
        if self.continuation_mode == "mm2v" and o.frames < MOTION_FRAMES + 4:
            raise RenderError(f"--frames {o.frames}: the adapter continues shots with MM2V, which drops "
                              f"{MOTION_FRAMES} frames; use at least {MOTION_FRAMES + 4}")
        if self.plan.resuming and self.plan.start > 0:
            # Known only now when the mode comes from an adapter without readable metadata; nothing is written yet.
            check_memory_rope(self.plan.manifest_path, self.plan.previous["shots"][:self.plan.start],
                              self.memory_rope)

    def _prompts(self) -> list[str]:
        """The prompts of the shots still to render (encoded up front with --low-vram)."""
        return [shot.prompt for shot in self.story.shots[self.plan.start:]]

    @property
    def continuation_mode(self) -> str:
        """How cut:false shots continue the previous one: mi2v, mm2v, or none (they start afresh)."""
        if self.options.continuation != "auto":
            return self.options.continuation
        conditioning = getattr(self.adapter, "conditioning", None)
        return "mm2v" if conditioning == "mm2v" else "mi2v"

    @property
    def memory_rope(self) -> Optional[str]:
        """Where memory frames sit in time: the option, else the loaded adapter's (the pipeline's default)."""
        return self.options.memory_rope or getattr(self.pipe, "memory_rope", None)

    # ------------------------------------------------------------------ per shot
    def mode_for(self, shot) -> str:
        """How a shot is generated (one of :data:`SHOT_MODES`)."""
        if shot.index == 0:
            if self.options.t2v_model:
                return "t2v"
            if self.options.first_image:
                return "i2v"
            return "base" if self.options.first_shot == "base" else "m2v"
        if shot.cut or self.continuation_mode == "none":
            return "m2v"
        return self.continuation_mode

    def _generate(self, shot, mode: str, bank, seed: int, t2v=None) -> tuple[np.ndarray, list]:
        """Frames (uint8 [N, H, W, 3]) of one shot and the memory entries it was conditioned on."""
        import torch

        o = self.options
        # An explicit empty negative prompt is a choice (the built-in models' unconditional prompt), not a default.
        negative = WAN_NEGATIVE_PROMPT if o.negative_prompt is None else o.negative_prompt
        # Steps and guidance are the preset's (one expert: no second guidance scale).
        common = dict(**self.speed.prompt_kwargs(shot.prompt, negative), height=o.height, width=o.width,
                      num_frames=o.frames, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        entries: list = []
        if mode == "t2v":
            out = t2v(**common, **self.speed.preset.apply(t2v, "t2v"))
        elif mode == "base":
            with storymem_adapter_off(self.pipe, o):
                out = self.pipe(**common, **self.sampling)
        else:
            kwargs = dict(self.sampling)
            if mode == "i2v":
                from PIL import Image

                kwargs.update(first_frame=Image.fromarray(self.plan.first_image), drop_context_frames=False)
            else:
                if o.memory_source != "none":
                    entries = self._memory_for(shot, bank)
                    kwargs["memory_images"] = [e.frame for e in entries]
                    if o.memory_guidance != 1.0 and entries:
                        kwargs["memory_guidance_scale"] = o.memory_guidance
                    if o.memory_rope:
                        kwargs["memory_rope"] = o.memory_rope
                if mode == "mi2v":
                    kwargs["first_frame"] = bank.last_frame
                elif mode == "mm2v":
                    kwargs["motion_frames"] = bank.last_frames(MOTION_FRAMES)
            out = self.pipe(**common, **kwargs)
        return _checked_frames(np.asarray(out.frames[0]), shot, mode), entries

    def _memory_for(self, shot, bank) -> list:
        """The bank entries shot ``shot`` is conditioned on: the sink + window, or retrieved by its take text."""
        o = self.options
        if o.memory_retrieval == "prompt":
            return bank.retrieve(self.take_texts[shot.index], self.relevance, o.memory_min_relevance,
                                 o.memory_relative_relevance)
        return bank.entries()

    def _select_keyframes(self, frames: np.ndarray, bank):
        """(indices, embeddings) of the frames the memory receives: the keyframes, chosen on rank 0 and shared,
        so every rank's memory (and with it every rank's sequence length) stays identical; or the first frame
        (``--memory-source first-frame``); or none."""
        source = self.options.memory_source
        if source == "none":
            return [], None
        if source == "first-frame":
            # No dedup: the bank's sink + window alone decide what a shot sees.
            return [0], None
        selection = None
        if self.is_main:
            selector = self.plan.selector
            with self.speed.keyframes_on(selector, self.options, self.device):
                picked = selector.extract(frames, memory=bank.history_embeddings(selector.embedder))
            selection = (list(picked.indices), picked.embeddings)
        return self.group.share(selection)

    # ------------------------------------------------------------------ manifest
    def _memory_record(self, entry, position: dict, query: Optional[str] = None) -> dict:
        if entry.is_reference:
            i = position[id(entry)]
            return {"kind": "reference", "id": f"ref_{i:02d}", "shot": None, "frame": None,
                    "file": f"references/ref_{i:02d}.png"}
        stem = self.story[entry.shot].file_stem
        record = {"kind": "keyframe", "shot": entry.shot, "shot_stem": stem, "frame": entry.frame_index,
                  "file": None}
        if entry.frame_index is not None:
            record["file"] = f"keyframes/{stem}/f{entry.frame_index:03d}.png"
        if query is not None and entry.text is not None:
            record["relevance"] = round(float(self.relevance(query, [entry.text])[0]), 4)
        return record

    def _start_manifest(self):
        """The manifest this run continues: the finished shots before ``start`` are kept."""
        plan, o = self.plan, self.options
        if plan.previous is not None and plan.start > 0:
            manifest = continued_manifest(plan.previous, plan.start, self.story, o)
        else:
            manifest = new_manifest(self.story, o)
        manifest["runtime"] = {
            "device": self.device, "offload": o.offload, "parallel": o.parallel,
            "world_size": self.group.world_size, "memory_rope": self.memory_rope,
            "continuation": self.continuation_mode, "memory_source": o.memory_source,
            "adapter": None if self.adapter is None else {
                k: v for k, v in dataclasses.asdict(self.adapter).items() if k != "target_modules"},
            "speed": self.speed.runtime_record(o, self.pipe),
        }
        manifest["timings"] = dict(manifest.get("timings", {}), load_s=round(self.timings.get("load_s", 0.0), 3))
        self.manifest = manifest
        self.settings = manifest["settings"]
        if self.is_main:
            outputs.write_manifest(self.out_dir, self.manifest)
            if plan.clear_previous:
                _clear_previous_outputs(self.out_dir)

    # ------------------------------------------------------------------ run
    def _initial_bank(self):
        from ..memory import MemoryBank

        bank = self.plan.bank
        if bank is None:
            bank = MemoryBank(max_memory=self.options.max_memory, sink=self.options.sink)
            if self.plan.references:
                bank.add_references(self.plan.references)
        else:  # a bank saved before take texts were kept
            bank.fill_texts(lambda index: self.take_texts[index])
        return bank

    def run(self) -> dict:
        """Render the remaining shots; returns the final manifest. The output folder's lock is held throughout
        (see the class doc)."""
        from tqdm.auto import tqdm

        o = self.options
        t_run = time.perf_counter()
        start = self.plan.start
        if start >= len(self.story):
            # Everything is rendered already: refresh the derived outputs, load no model.
            self.manifest = self.plan.previous
            if _launch_rank() == 0:
                held = self._take_lock()
                try:
                    outputs.write_story_outputs(self.out_dir, self.manifest)
                finally:
                    if held is not None:
                        held.release()
            return self.manifest

        self.group = self.given_group or ProcessGroup.start(o.parallel)
        self.device = self.group.device or self.device
        held = self._take_lock()  # before any model loads: a second render into the folder stops at once
        try:
            bank = self._initial_bank()
            t2v_frames, shared = None, None
            if start == 0 and self.mode_for(self.story[0]) == "t2v":
                t2v_frames, shared = self._render_t2v_first_shot()
            self._load_main_pipeline(shared)
            if self.is_main and self.plan.selector is not None and o.memory_source == "keyframes":
                models.load_selector(self.plan.selector)  # else it loads after shot 1 is drawn
            if not o.is_builtin and start == 0 and self.mode_for(self.story[0]) == "m2v" and not self.plan.references:
                warnings.warn("shot 1 is generated from text alone by the I2V model with an empty memory; "
                              "--t2v-model (Wan2.2-T2V-A14B) gives a better opening shot", stacklevel=2)
            # Nothing is written before this point: the folder gets its manifest first.
            self._start_manifest()
            if self.is_main and start == 0:
                outputs.write_references(self.out_dir, self.plan.references)

            bar = tqdm(total=len(self.story), initial=start, desc="shots", unit="shot",
                       disable=not (o.progress and self.is_main), file=sys.stderr)
            try:
                for shot in self.story.shots[start:]:
                    self._render_shot(shot, bank, t2v_frames)
                    bar.update(1)
            finally:
                bar.close()
            self.manifest["finished"] = len(self.manifest["shots"]) == len(self.story)
            self.manifest["timings"]["render_s"] = round(time.perf_counter() - t_run, 3)
            if self.is_main:
                outputs.write_manifest(self.out_dir, self.manifest)
        finally:
            if held is not None:
                held.release()
        self.group.close()
        return self.manifest

    def _take_lock(self) -> Optional["_HeldLock"]:
        """Rank 0 takes the output folder's lock (None: the caller holds it, or another rank); when it cannot,
        every rank stops with the holder named."""
        from ..locking import FolderLock, FolderLockError

        error, held = None, None
        if self.is_main and self.lock is None:
            lock = FolderLock(self.out_dir, owner="storymem render", purpose=f"rendering {self.story.name!r}")
            held = _HeldLock(lock, self.plan, remove_if_empty=not self.out_dir.exists())
            try:
                held.acquire()
            except (FolderLockError, RenderError) as err:
                error, held = str(err), None
        error = self.group.share(error)
        if error is not None:
            raise RenderError(error)
        return held

    def _render_shot(self, shot, bank, t2v_frames=None):
        """Generate one shot, pick its keyframes into ``bank``, write its files, then list it as finished."""
        o = self.options
        mode = self.mode_for(shot)
        seed = shot_seed(shot, o.seed, o.seed_mode)
        t0 = time.perf_counter()
        if mode == "t2v":  # rendered before the I2V model loaded
            frames, memory_used = t2v_frames, []
            t_generate = self.timings.get("t2v_generate_s", 0.0)
        else:
            position = {id(e): i for i, e in enumerate(bank.history())}
            with self.speed.compile_clock("i2v", o):
                frames, entries = self._generate(shot, mode, bank, seed)
            t_generate = time.perf_counter() - t0
            query = self.take_texts[shot.index] if o.memory_retrieval == "prompt" else None
            memory_used = [self._memory_record(e, position, query) for e in entries]
        t1 = time.perf_counter()
        indices, embeddings = self._select_keyframes(frames, bank)
        if indices:
            bank.add(frames[indices], shot=shot.index, embeddings=embeddings, frame_indices=indices,
                     text=self.take_texts[shot.index])
        bank.set_last_frames(frames, shot=shot.index)
        t2 = time.perf_counter()
        if not self.is_main:
            return
        files = outputs.write_shot_files(self.out_dir, shot.file_stem, frames, indices, bank, o.fps)
        t3 = time.perf_counter()
        entry = {
            "index": shot.index, "stem": shot.file_stem, "scene": shot.scene, "shot_in_scene": shot.shot_in_scene,
            "prompt": shot.prompt, "cut": shot.cut, "mode": mode, "seed": seed,
            # The memory layout of the StoryMem pipeline that drew the shot (the T2V model has none).
            "memory_rope": None if mode == "t2v" else self.memory_rope,
            "num_frames": int(len(frames)), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
            "fps": o.fps, "memory": memory_used, **files,
            "settings": self.settings,  # what decided this shot's pixels (--from-shot may change them later on)
            "timings": {"generate_s": round(t_generate, 3), "keyframes_s": round(t2 - t1, 3),
                        "write_s": round(t3 - t2, 3)},
            "finished": now(),
        }
        self.manifest["timings"].update(self.speed.timings())
        # The manifest names the shot only now that all its files are complete.
        self.manifest["shots"].append(entry)
        outputs.write_manifest(self.out_dir, self.manifest)
        outputs.write_story_outputs(self.out_dir, self.manifest)

    def _render_t2v_first_shot(self):
        """Shot 1 with Wan2.2-T2V-A14B; its experts are freed before the I2V experts load, and its text
        encoder, tokenizer and VAE (the same models as Wan2.2-I2V's) are handed on."""
        o = self.options
        t0 = time.perf_counter()
        self._log(f"loading {o.t2v_model} for the first shot")
        t2v = setup_pipeline(models.load_t2v_pipeline(o), o, self.speed, self.device, "t2v", self._prompts())
        if o.parallel != "none":
            enable_context_parallel(t2v, o.parallel, self.group.world_size, o.attention_backend,
                                    mesh=self.group.mesh)
        self._progress_config(t2v)
        self.timings["load_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        shot = self.story[0]
        with self.speed.compile_clock("t2v", o):
            frames, _ = self._generate(shot, "t2v", None, shot_seed(shot, o.seed, o.seed_mode), t2v=t2v)
        self.timings["t2v_generate_s"] = time.perf_counter() - t1
        t2v.remove_all_hooks()  # offload hooks; the shared models are placed again with the I2V pipeline
        shared = {"text_encoder": t2v.text_encoder, "tokenizer": t2v.tokenizer, "vae": t2v.vae}
        release_t2v(t2v)  # its experts (and their low-VRAM hooks) go before the I2V experts load
        return frames, shared


def _launch_rank() -> int:
    """This process's rank in a torchrun launch (0 outside one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _HeldLock:
    """The output folder's FolderLock, held for one render. Taking it also checks that the folder is still as the
    plan found it (a render that ended in between); giving it back removes a folder the render created that stayed
    empty (the model did not load)."""

    def __init__(self, lock, plan: RenderPlan, remove_if_empty: bool):
        self.lock, self.plan, self.remove_if_empty = lock, plan, remove_if_empty

    def acquire(self) -> None:
        self.lock.acquire()
        try:
            _check_unchanged(self.plan)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self.lock.release()
        folder = self.lock.folder
        if self.remove_if_empty and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _check_unchanged(plan: RenderPlan) -> None:
    """The folder's manifest is still the one the plan was made from (checked under the lock; --force starts over
    whatever is there now)."""
    if plan.options.force:
        return
    path = plan.manifest_path
    now_there = read_manifest(path) if path.is_file() else None
    before = plan.previous
    if (now_there is None) != (before is None) or (now_there is not None and now_there.get("updated") !=
                                                     before.get("updated")):
        raise RenderError(f"{path.parent}: another render changed the folder while this one was being prepared; run "
                          "the command again")


def _checked_frames(frames: np.ndarray, shot, mode: str) -> np.ndarray:
    """The decoded frames (floats in [0, 1]) as uint8, or a RenderError for frames that cannot be a picture:
    values that are not finite (NaN or infinity), or one value everywhere in every frame."""
    where = f"shot {shot.index + 1} ({shot.file_stem}, {mode.upper()})"
    finite = np.isfinite(frames)
    if not finite.all():
        raise RenderError(f"{where}: {np.size(frames) - int(finite.sum())} of {np.size(frames)} decoded values are "
                          "not finite (NaN or infinity): the model or adapter weights are broken, or the guidance "
                          "overflows; nothing of this shot was written")
    pixels = np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
    if pixels.size and (pixels == pixels.flat[0]).all():
        raise RenderError(f"{where}: every frame decodes to the one value {int(pixels.flat[0])} (a blank shot): the "
                          "model or adapter weights are broken; nothing of this shot was written")
    return pixels


def _clear_previous_outputs(out_dir: Path) -> None:
    """--force over a render: remove what it wrote (the new manifest, written first, lists no shot yet)."""
    for name in OUTPUT_FOLDERS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)


def render_story(story, options: RenderOptions, pipe=None, selector=None, lock=None) -> dict:
    """Validate, then render ``story`` (a :class:`~storymem.story.Story` or a path) into ``options.out_dir``.

    Returns the manifest. ``pipe``: an already loaded StoryMemPipeline to use instead of loading one (see
    :func:`~storymem.render.load_render_pipeline`); ``selector``: an already built keyframe selector (see
    :func:`~storymem.render.build_selector`). Both let several renders share their models. ``lock``: the output
    folder's :class:`~storymem.locking.FolderLock` when the caller holds it already (see :class:`StoryRenderer`)."""
    from ..story import Story, load_story

    if not isinstance(story, Story):
        story = load_story(story)
    return StoryRenderer(prepare(story, options, selector=selector, pipe=pipe), pipe=pipe, lock=lock).run()
