"""Render a story shot by shot with visual memory: ``storymem render`` / ``infer_story.py``.

The loop:

* shot 1 comes from Wan2.2-T2V-A14B (``--t2v-model``), or from ``--first-image`` (plain I2V), or from
  ``--reference-images`` (MR2V: the images seed the memory and shot 1 is M2V on them); with none of these
  it is M2V with an empty memory (text only);
* every later shot is M2V on the memory bank's frames; a shot whose ``cut`` is false continues the
  previous one (MI2V from its last frame, or MM2V from its last 5 frames when the adapter was trained so;
  ``--continuation none`` starts every shot afresh instead);
* after each shot :class:`~storymem.memory.KeyframeSelector` picks keyframes (deduplicated against the
  whole memory history) and they join the bank. ``--memory-source first-frame`` puts only each shot's first
  frame into the bank instead (same sink + window), ``--memory-source none`` uses no memory at all
  (independent shots); both are ablations;
* which of the bank's frames a shot sees: the sink + sliding window (the release), or with
  ``--memory-retrieval prompt`` the frames whose take (the shot and the shots it continues) reads most like the
  shot's own text (:mod:`storymem.memory.retrieval`).

Outputs in ``--out``: ``shots/SS_NN.mp4``, ``story.mp4``, ``keyframes/SS_NN/fFFF.png``, the bank after each
shot (``memory/after_SS_NN/``), sample thumbnails, ``manifest.json``, ``contact_sheet.png`` and
``index.html``. The manifest lists finished shots only and is replaced (atomically) after a shot's files
are complete, so an interrupted render resumes with the same command; ``--from-shot K`` re-renders from
shot K on, restoring the memory saved after shot K-1.

Several stories with one loaded model (experiments)::

    pipe = load_render_pipeline(options)          # base + adapter, placed on the device
    selector = build_selector(options)            # keyframe embedder / aesthetic scorer
    for story, out in jobs:
        render_story(story, dataclasses.replace(options, out_dir=out), pipe=pipe, selector=selector)

Every input is checked before any model loads and before the output folder is touched - the story, every option
against its range and the base's RoPE table, the images, the adapter's files tensor by tensor, the folder's
permissions, and offline the weights to be downloaded; a bad input is a :class:`RenderError` (exit code 2) naming
the file, shot or flag at fault. One render writes into a folder at a time (the renderer holds its
:class:`~storymem.locking.FolderLock`), and a shot that decodes to non-finite or constant frames stops the render by
name. The manifest records the settings of each shot (version 3).

A whole benchmark (``storymem render --story stories/ --out BATCH``, under ``torchrun`` over many GPUs and
nodes): :func:`render_batch` renders each story into ``BATCH/<file stem>/``, the processes sharing the stories
(:mod:`~storymem.render.batch`).

Modules: :mod:`~storymem.render.options` (the options and their validation), :mod:`~storymem.render.plan`
(manifest schema, resume, :func:`prepare`), :mod:`~storymem.render.models` (loaders),
:mod:`~storymem.render.parallel` (context parallelism), :mod:`~storymem.render.renderer` (the shot loop),
:mod:`~storymem.render.outputs` and :mod:`~storymem.render.report` (the folder's files),
:mod:`~storymem.render.cli` (``storymem render``), :mod:`~storymem.render.batch` (several stories; with
``batch_world`` for the processes of a launch and ``batch_progress`` for the bars).
"""

from .batch import BATCH_RECORD, BatchStory, find_story_files, load_batch_stories, render_batch
from .cli import main
from .models import (
    adapter_disabled,
    build_selector,
    load_pipeline,
    load_render_pipeline,
    load_t2v_pipeline,
    set_adapter_scale,
)
from .options import CONTINUATIONS, FIRST_SHOTS, MEMORY_SOURCES, RenderError, RenderOptions, shot_seed
from .parallel import enable_context_parallel
from .plan import MANIFEST_NAME, MANIFEST_VERSION, RenderPlan, prepare, read_manifest
from .renderer import StoryRenderer, render_story

__all__ = [
    "RenderOptions",
    "RenderError",
    "RenderPlan",
    "StoryRenderer",
    "prepare",
    "render_story",
    "read_manifest",
    "load_render_pipeline",
    "load_pipeline",
    "load_t2v_pipeline",
    "build_selector",
    "shot_seed",
    "enable_context_parallel",
    "set_adapter_scale",
    "adapter_disabled",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "MEMORY_SOURCES",
    "CONTINUATIONS",
    "FIRST_SHOTS",
    "BATCH_RECORD",
    "BatchStory",
    "find_story_files",
    "load_batch_stories",
    "render_batch",
    "main",
]
