"""The small world's experiment, before anything renders: its conditions (the table's rows), its settings, the
held-out stories with their ground truth, and the plan of every render folder (each input checked first).
:mod:`.experiment` renders, scores and reports what is planned here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from storymem.builtin import BUILTIN_SAMPLING

__all__ = [
    "CONDITIONS",
    "HELD_OUT_STORY_SEED",
    "Condition",
    "ExperimentConfig",
    "ExperimentError",
    "ExperimentPlan",
    "StoryCase",
    "ensure_stories",
    "load_story_cases",
    "plan_experiment",
    "read_json",
    "render_options",
    "resolve_conditions",
    "square_size",
]


class ExperimentError(ValueError):
    """Bad experiment input (stories, conditions, models, output folder), found before any model loads."""


# The seed of the recipe's (train_small_world.sh) `stories` stage: the shipped weights never saw these characters.
HELD_OUT_STORY_SEED = 2026


# ---------------------------------------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Condition:
    """One row of the experiment.

    Attributes:
        name: the row's name (``--conditions``).
        description: what it is, for the table's notes.
        adapter: which adapter it renders with: ``"adapter"`` (``--adapter``), ``"contiguous_adapter"``
            (``--contiguous-adapter``) or None (the base alone).
        render: :class:`~storymem.render.RenderOptions` fields that differ from the render defaults.
        generated: False for the ground truth (no model).
    """

    name: str
    description: str
    adapter: Optional[str] = None
    render: dict = field(default_factory=dict)
    generated: bool = True


# Text-aware retrieval of memory frames with the thresholds picked on 100 toy stories of another seed than the
# held-out ones (storymem.memory.retrieval's module doc).
RETRIEVAL = dict(memory_retrieval="prompt", memory_min_relevance=0.3, memory_relative_relevance=0.5)

CONDITIONS: dict[str, Condition] = {c.name: c for c in (
    Condition("ground_truth", "reference renders of the ground truth: the detector's ceiling", generated=False),
    Condition("independent", "base model, no adapter, no memory, no continuation: each shot from its prompt",
              render=dict(memory_source="none", continuation="none")),
    Condition("m2v", "base + adapter, keyframe memory with sink + window (max 10, sink 3)", adapter="adapter"),
    Condition("base_memory", "base model alone (no adapter) with the same memory and continuation as m2v: what the "
              "adapter adds"),
    Condition("first_frame_memory", "base + adapter, memory = the first frame of each shot", adapter="adapter",
              render=dict(memory_source="first-frame")),
    Condition("no_sink", "base + adapter, sink 0 (sliding window only)", adapter="adapter", render=dict(sink=0)),
    Condition("contiguous_rope", "base + contiguous-RoPE adapter, rendered with contiguous RoPE",
              adapter="contiguous_adapter", render=dict(memory_rope="contiguous")),
    Condition("negative_adapter_contiguous_rope", "the negative-RoPE adapter rendered with contiguous RoPE "
              "(mismatch)", adapter="adapter", render=dict(memory_rope="contiguous")),
    Condition("m2v_retrieval", "base + adapter, memory retrieved by prompt (takes below relevance 0.3 or half the "
              "best left out)", adapter="adapter", render=dict(RETRIEVAL)),
    Condition("base_memory_retrieval", "base model alone with m2v_retrieval's memory and continuation",
              render=dict(RETRIEVAL)),
)}


# ---------------------------------------------------------------------------------------------- config
@dataclass
class ExperimentConfig:
    """Settings of one experiment run (defaults: the built-in models' sampling, ``storymem.builtin.BUILTIN_SAMPLING``).

    ``height``/``width`` of None: a square of ``area`` (side rounded to a multiple of 16; the toy base models
    are trained on square clips). ``shift`` of None: the base's own scheduler shift. ``conditions`` of None:
    all of :data:`CONDITIONS`. Stories are made in ``stories`` when that folder is missing or empty
    (``count``, ``story_seed``, ``num_shots``..``max_shots``); ``limit_stories`` takes the first K.
    """

    base: str
    stories: Path
    out: Path
    adapter: Optional[str] = None
    contiguous_adapter: Optional[str] = None
    conditions: Optional[Sequence[str]] = None
    device: Optional[str] = None
    dtype: str = "auto"
    area: int = BUILTIN_SAMPLING["area"]
    height: Optional[int] = None
    width: Optional[int] = None
    frames: int = BUILTIN_SAMPLING["frames"]
    steps: int = BUILTIN_SAMPLING["steps"]
    guidance: float = 3.5
    memory_guidance: float = 1.0
    first_shot: str = "m2v"
    lora_scale: float = 1.0  # weight of the adapter's LoRA layers in the adapter rows
    shift: Optional[float] = None
    render_seed: int = 0
    count: int = 20
    story_seed: int = HELD_OUT_STORY_SEED
    num_shots: int = 6
    max_shots: int = 8
    limit_stories: Optional[int] = None
    progress: bool = True

    def resolved_device(self) -> str:
        from storymem.devices import resolve_device

        return self.device or resolve_device().type


@dataclass
class StoryCase:
    """A held-out story: its script (``story``, a :class:`~storymem.story.Story`) and ground truth."""

    stem: str
    name: str
    path: Path
    story: Any
    truth: dict

    @property
    def identities(self) -> list[str]:
        return [shot["identity"] for shot in self.truth["shots"]]


@dataclass
class ExperimentPlan:
    """A validated experiment: what is rendered where, with which settings (built before any model loads)."""

    config: ExperimentConfig
    cases: list[StoryCase]
    conditions: list[Condition]
    skipped: dict[str, str]  # condition name -> why it is left out
    notes: list[str]
    height: int
    width: int
    shift: float
    device: str
    adapters: dict[str, dict]  # "adapter" / "contiguous_adapter" -> {"path", "memory_rope", "conditioning"}
    jobs: dict[str, list[tuple[StoryCase, Any]]]  # condition -> (story, render plan) for generated rows

    def render_dir(self, condition: str, case: StoryCase) -> Path:
        return Path(self.config.out) / "renders" / condition / case.stem


# ---------------------------------------------------------------------------------------------- stories
def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExperimentError(f"{path}: cannot read {what} ({err})") from None


def _check_truth(truth: Any, path: Path, num_shots: int) -> dict:
    from .world import Character, WorldError

    if not isinstance(truth, dict) or not isinstance(truth.get("shots"), list):
        raise ExperimentError(f"{path}: not a toy story ground truth (no 'shots' list)")
    if len(truth["shots"]) != num_shots:
        raise ExperimentError(f"{path}: 'shots' has {len(truth['shots'])} entries but the story has {num_shots} "
                              "shots")
    for i, shot in enumerate(truth["shots"]):
        if not isinstance(shot, dict):
            raise ExperimentError(f"{path}: shots[{i}] is not an object")
        for key in ("identity", "clip"):
            if key not in shot:
                raise ExperimentError(f"{path}: shots[{i}] has no {key!r}")
        try:
            Character.from_key(shot["identity"])
        except WorldError as err:
            raise ExperimentError(f"{path}: shots[{i}].identity: {err}") from None
    returns = truth.get("returns", [])
    if not isinstance(returns, list) or not all(isinstance(r, int) and 0 <= r < num_shots for r in returns):
        raise ExperimentError(f"{path}: 'returns' must list shot indices 0..{num_shots - 1}, got {returns!r}")
    return truth


def load_story_cases(folder, limit: Optional[int] = None) -> list[StoryCase]:
    """The stories of a :func:`~research.small_world.datasets.make_story_set` folder (from its ``index.json``), each
    script loaded and checked against its ground truth."""
    from storymem.story import StoryError, load_story

    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise ExperimentError(f"{folder}: holds no index.json, so it is not a toy story set; give a folder made "
                              "by make_story_set, or a missing/empty one to make the stories there")
    index = read_json(index_path, "story index")
    entries = index.get("stories") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ExperimentError(f"{index_path}: field 'stories' must be a non-empty list")
    if limit is not None:
        if limit < 1:
            raise ExperimentError(f"--limit-stories {limit}: must be >= 1")
        entries = entries[:limit]
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("story"), str) or \
                not isinstance(entry.get("truth"), str):
            raise ExperimentError(f"{index_path}: stories[{i}] needs 'story' and 'truth' paths")
        script = folder / entry["story"]
        try:
            story = load_story(script)
        except StoryError as err:
            raise ExperimentError(f"{index_path}: stories[{i}]: {err}") from None
        truth_path = folder / entry["truth"]
        truth = _check_truth(read_json(truth_path, "ground truth"), truth_path, len(story))
        cases.append(StoryCase(stem=script.stem, name=entry.get("name") or story.name, path=script, story=story,
                               truth=truth))
    stems = [c.stem for c in cases]
    if len(set(stems)) != len(stems):
        raise ExperimentError(f"{index_path}: two stories share a file name; render folders would collide")
    return cases


def ensure_stories(config: ExperimentConfig) -> list[StoryCase]:
    """The experiment's stories; made first when ``config.stories`` is missing or empty."""
    from .datasets import DatasetError, make_story_set

    folder = Path(config.stories)
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        try:
            make_story_set(folder, count=config.count, seed=config.story_seed, num_shots=config.num_shots,
                           max_shots=config.max_shots)
        except DatasetError as err:
            raise ExperimentError(f"cannot make the stories in {folder}: {err}") from None
    elif not folder.is_dir():
        raise ExperimentError(f"{folder}: --stories is not a folder")
    return load_story_cases(folder, config.limit_stories)


# ---------------------------------------------------------------------------------------------- planning
def resolve_conditions(names: Optional[Sequence[str]], adapter: Optional[str],
                       contiguous_adapter: Optional[str]) -> tuple[list[Condition], dict[str, str]]:
    """(conditions to run, {skipped condition: why}). With ``names`` None every condition runs that can: the
    contiguous-RoPE row is skipped without ``--contiguous-adapter``. Named conditions must be runnable."""
    given = {"adapter": adapter, "contiguous_adapter": contiguous_adapter}
    flags = {"adapter": "--adapter", "contiguous_adapter": "--contiguous-adapter"}
    skipped: dict[str, str] = {}
    if names is None:
        chosen = list(CONDITIONS.values())
        if not adapter:
            raise ExperimentError("--adapter is needed for the memory conditions; pass --conditions "
                                  "ground_truth,independent to run without one")
        if not contiguous_adapter:
            skipped["contiguous_rope"] = "no --contiguous-adapter given"
            chosen = [c for c in chosen if c.name != "contiguous_rope"]
        return chosen, skipped
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ExperimentError("--conditions is empty")
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise ExperimentError(f"--conditions: unknown condition(s) {', '.join(map(repr, unknown))}; choose from "
                              f"{', '.join(CONDITIONS)}")
    chosen = [CONDITIONS[n] for n in dict.fromkeys(names)]
    for condition in chosen:
        if condition.adapter and not given[condition.adapter]:
            raise ExperimentError(f"condition {condition.name!r} needs {flags[condition.adapter]} DIR")
    # Table order, whatever order they were named in.
    order = list(CONDITIONS)
    return sorted(chosen, key=lambda c: order.index(c.name)), skipped


def _adapter_info(path: str, flag: str) -> dict:
    from storymem.builtin import ADAPTER_DIR
    from storymem.lora import ADAPTER_CONFIG_NAME, AdapterError, StoryMemLoraConfig

    # 'toy': the shipped adapter, as --base toy is the shipped base.
    folder = ADAPTER_DIR if path == "toy" else Path(path)
    if not folder.is_dir():
        raise ExperimentError(f"{flag} {path}: adapter folder not found")
    info = {"path": str(folder.resolve()), "memory_rope": None, "conditioning": None}
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        try:
            config = StoryMemLoraConfig.from_file(folder / ADAPTER_CONFIG_NAME)
        except (AdapterError, OSError, ValueError) as err:
            raise ExperimentError(f"{flag} {path}: {err}") from None
        info.update(memory_rope=config.memory_rope, conditioning=config.conditioning)
    return info


def _base_shift(base: str) -> float:
    """The base's own scheduler shift (what it was trained to sample with); the release default otherwise."""
    from storymem.builtin import builtin_base_folder
    from storymem.defaults import FLOW_SHIFT

    folder = builtin_base_folder("toy") if base == "toy" else Path(base)
    config = folder / "scheduler" / "scheduler_config.json"
    if config.is_file():
        shift = read_json(config, "scheduler config").get("flow_shift")
        if isinstance(shift, (int, float)) and shift > 0:
            return float(shift)
    return FLOW_SHIFT


def square_size(area: int) -> int:
    """Side of the square frame of about ``area`` pixels, a multiple of 16."""
    return max(16, int(round(math.sqrt(area) / 16.0)) * 16)


def render_options(config: ExperimentConfig, condition: Condition, out_dir: Path, *, height: int, width: int,
                   shift: float, device: str, adapters: dict):
    """The :class:`~storymem.render.RenderOptions` of one (condition, story) render into ``out_dir``: the toy
    built-in models' sampling, the experiment's sampling settings and the condition's changes."""
    from storymem.render import RenderOptions

    adapter = adapters[condition.adapter]["path"] if condition.adapter else None
    options = RenderOptions(
        out_dir=out_dir, base=config.base, lora=adapter, lora_scale=config.lora_scale if adapter else 1.0,
        dtype=config.dtype, height=height, width=width,
        area=config.area, frames=config.frames, steps=config.steps, guidance=config.guidance,
        memory_guidance=config.memory_guidance, first_shot=config.first_shot, shift=shift,
        negative_prompt=BUILTIN_SAMPLING["negative_prompt"], seed=config.render_seed,
        embedder=BUILTIN_SAMPLING["embedder"], aesthetic=BUILTIN_SAMPLING["aesthetic"], device=device,
        progress=False,
    )
    return dataclasses.replace(options, **condition.render)


def plan_experiment(config: ExperimentConfig) -> ExperimentPlan:
    """Check every input and plan every render folder (no model loads; only missing stories are written)."""
    from storymem.render import RenderError, build_selector, prepare
    from storymem.story import StoryError

    if config.frames < 5 or (config.frames - 1) % 4:
        raise ExperimentError(f"--frames {config.frames}: must be of the form 4n+1 and at least 5")
    if config.steps < 1:
        raise ExperimentError(f"--steps {config.steps}: must be >= 1")
    if not (math.isfinite(config.memory_guidance) and config.memory_guidance >= 0):
        raise ExperimentError(f"--memory-guidance {config.memory_guidance}: must be a finite number >= 0 (1 = off)")
    if not (math.isfinite(config.lora_scale) and config.lora_scale >= 0):
        raise ExperimentError(f"--lora-scale {config.lora_scale}: must be a finite number >= 0 (1 = as trained)")
    if (config.height is None) != (config.width is None):
        raise ExperimentError("give both --height and --width, or neither (a square of --area)")
    if config.base != "toy" and not (Path(config.base) / "model_index.json").is_file():
        raise ExperimentError(f"--base {config.base}: not a diffusers pipeline folder (no model_index.json)")
    conditions, skipped = resolve_conditions(config.conditions, config.adapter, config.contiguous_adapter)
    adapters = {}
    if config.adapter:
        adapters["adapter"] = _adapter_info(config.adapter, "--adapter")
    if config.contiguous_adapter:
        adapters["contiguous_adapter"] = _adapter_info(config.contiguous_adapter, "--contiguous-adapter")
    notes = []
    names = [c.name for c in conditions]
    if "negative_adapter_contiguous_rope" in names and adapters["adapter"]["memory_rope"] == "contiguous":
        notes.append("negative_adapter_contiguous_rope: --adapter was trained with contiguous RoPE, so this row "
                     "is no mismatch")
    if "contiguous_rope" in names and adapters["contiguous_adapter"]["memory_rope"] not in (None, "contiguous"):
        notes.append(f"contiguous_rope: --contiguous-adapter was trained with "
                     f"{adapters['contiguous_adapter']['memory_rope']} RoPE; it is rendered with contiguous RoPE")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"{out}: --out exists and is not a folder")

    cases = ensure_stories(config)
    size = square_size(config.area)
    height, width = (config.height, config.width) if config.height is not None else (size, size)
    shift = float(config.shift) if config.shift is not None else _base_shift(config.base)
    device = config.resolved_device()
    plan = ExperimentPlan(config=config, cases=cases, conditions=conditions, skipped=skipped, notes=notes,
                          height=height, width=width, shift=shift, device=device, adapters=adapters, jobs={})
    selector = None
    for condition in conditions:
        if not condition.generated:
            continue
        jobs = []
        for case in cases:
            options = render_options(config, condition, plan.render_dir(condition.name, case), height=height,
                                     width=width, shift=shift, device=device, adapters=adapters)
            if selector is None and options.memory_source == "keyframes":
                selector = build_selector(options)  # one pixel embedder for every render
            try:
                jobs.append((case, prepare(case.story, options, selector=selector)))
            except (RenderError, StoryError) as err:
                raise ExperimentError(f"condition {condition.name!r}, {case.stem}: {err}\n(an experiment resumes "
                                      "only with the settings it started with; use another --out to change "
                                      "them)") from None
        plan.jobs[condition.name] = jobs
    return plan
