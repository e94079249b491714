"""The render manifest's schema: version 3 records each shot's settings and memory RoPE mode; versions 1 and 2
are migrated; other versions are refused; a resume that would change the memory layout is refused by name."""

import json
import shutil

import numpy as np
import pytest

from storymem import render
from storymem.lora import StoryMemLoraConfig
from storymem.render import models as render_models
from storymem.render.cli import build_parser, options_from_args
from storymem.render.plan import MANIFEST_VERSION, migrate_manifest, read_manifest
from storymem.video import read_video

STORY = {"prompts": ["a red circle in a green meadow", "the red circle walks to the tree", "a blue square"],
         "cuts": [True, False, True]}
FAST = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "1", "--no-progress",
        "--device", "cpu"]


def _args(story, out, *extra):
    return ["--story", str(story), "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def contiguous_render(tmp_path_factory):
    """A finished 3-shot render with --memory-rope contiguous."""
    tmp = tmp_path_factory.mktemp("contiguous")
    story = tmp / "story.json"
    story.write_text(json.dumps(STORY))
    out = tmp / "out"
    assert render.main(_args(story, out, "--memory-rope", "contiguous")) == 0
    return story, out


def _interrupted_copy(contiguous_render, tmp_path, shots=2):
    """A copy of the render whose manifest lists only its first ``shots`` shots (as if interrupted)."""
    story, out = contiguous_render
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shots"] = manifest["shots"][:shots]
    manifest["finished"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return story, copy, manifest


def _as_version_1(manifest: dict) -> dict:
    """The manifest as version 1 wrote it: one RoPE mode for the render (runtime) and the option among the
    settings, no per-shot mode, four settings left out at their defaults."""
    old = json.loads(json.dumps(manifest))
    old["version"] = 1
    old["settings"]["memory_rope"] = "contiguous"
    for key in ("lora_scale", "first_shot", "memory_guidance", "memory_retrieval"):
        del old["settings"][key]
    for shot in old["shots"]:
        del shot["memory_rope"]
    assert old["runtime"]["memory_rope"] == "contiguous"
    return old


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_shots_record_their_memory_rope(contiguous_render):
    _, out = contiguous_render
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "storymem-render" and manifest["version"] == MANIFEST_VERSION == 3
    assert [s["memory_rope"] for s in manifest["shots"]] == ["contiguous"] * 3
    assert "memory_rope" not in manifest["settings"]  # per shot: it may come from the adapter


def test_migration_of_version_1():
    old = {"format": "storymem-render", "version": 1, "settings": {"seed": 0, "memory_rope": None},
           "runtime": {"memory_rope": "contiguous"},
           "shots": [{"index": 0, "mode": "t2v"}, {"index": 1, "mode": "mi2v"}]}
    new = migrate_manifest(old)
    assert new["version"] == 3 and old["version"] == 1  # a new dict
    assert [s["memory_rope"] for s in new["shots"]] == [None, "contiguous"]  # the T2V model has no memory layout
    assert new["settings"] == {"seed": 0, "lora_scale": 1.0, "first_shot": "m2v", "memory_guidance": 1.0,
                               "memory_retrieval": {"mode": "window", "min_relevance": 0.0,
                                                    "relative_relevance": 0.0}}
    # The one record of the settings becomes every shot's (a copy each).
    assert [s["settings"] for s in new["shots"]] == [new["settings"]] * 2
    assert new["shots"][0]["settings"] is not new["settings"]


def test_migration_of_version_2_records_the_settings_per_shot(contiguous_render):
    _, out = contiguous_render
    manifest = json.loads((out / "manifest.json").read_text())
    old = json.loads(json.dumps(manifest))
    old["version"] = 2
    for shot in old["shots"]:
        del shot["settings"]
    new = migrate_manifest(old)
    assert new["version"] == 3 and [s["settings"] for s in new["shots"]] == [old["settings"]] * 3
    assert [s["memory_rope"] for s in new["shots"]] == ["contiguous"] * 3  # kept as version 2 recorded it
    assert migrate_manifest(manifest) == manifest  # version 3 stays as it is


def test_version_1_render_resumes_only_with_its_recorded_mode(contiguous_render, tmp_path, spy, capsys):
    story, out, manifest = _interrupted_copy(contiguous_render, tmp_path)
    (out / "manifest.json").write_text(json.dumps(_as_version_1(manifest)))
    before = _snapshot(out)

    # Without --memory-rope the tiny base (no adapter) would use "negative": refused, nothing written.
    assert render.main(_args(story, out)) == 2
    err = capsys.readouterr().err
    assert "memory_rope: shots 1-2 were rendered with 'contiguous', this run would use 'negative'" in err
    assert "--memory-rope contiguous" in err and str(out / "manifest.json") in err
    assert spy == [] and _snapshot(out) == before

    # With the recorded mode it resumes: shot 3 only, exactly as the uninterrupted render drew it.
    assert render.main(_args(story, out, "--memory-rope", "contiguous")) == 0
    assert len(spy) == 1 and spy[0]["kwargs"]["memory_rope"] == "contiguous"
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["version"] == 3 and resumed["finished"]
    assert [s["memory_rope"] for s in resumed["shots"]] == ["contiguous"] * 3
    assert "memory_rope" not in resumed["settings"] and resumed["settings"]["lora_scale"] == 1.0
    _, reference = contiguous_render
    last = resumed["shots"][2]["file"]
    np.testing.assert_array_equal(read_video(out / last)[0], read_video(reference / last)[0])


def test_changed_memory_rope_is_refused_before_any_model_loads(contiguous_render, tmp_path, monkeypatch, capsys):
    story, out, _ = _interrupted_copy(contiguous_render, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    assert render.main(_args(story, out, "--memory-rope", "negative")) == 2
    err = capsys.readouterr().err
    assert "memory_rope: shots 1-2 were rendered with 'contiguous', this run would use 'negative'" in err
    assert "--from-shot" in err and "--force" in err
    assert _snapshot(out) == before
    # --from-shot re-renders from there with the new mode; --force starts over.
    for extra, start in ((["--from-shot", "3"], 2), (["--force"], 0)):
        story_obj, options = options_from_args(build_parser().parse_args(
            _args(story, out, "--memory-rope", "negative", *extra)))
        assert render.prepare(story_obj, options).start == start


def _save_adapter(folder, **config):
    """A rank-4 storymem adapter for the tiny base (untrained: B is zero)."""
    from storymem.builtin import load_builtin_pipeline
    from storymem.lora import add_storymem_adapter, save_storymem_lora

    pipe = load_builtin_pipeline("tiny")
    config = StoryMemLoraConfig(rank=4, alpha=4.0, **config)
    for model in (pipe.transformer, pipe.transformer_2):
        add_storymem_adapter(model, config)
    save_storymem_lora(folder, {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}, config)
    return folder


def test_adapter_metadata_is_read_before_loading(contiguous_render, tmp_path, monkeypatch):
    story, out, manifest = _interrupted_copy(contiguous_render, tmp_path)
    adapters = {mode: _save_adapter(tmp_path / mode, memory_rope=mode) for mode in ("negative", "contiguous")}
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    for mode, adapter in adapters.items():
        for shot in manifest["shots"]:
            shot["settings"].update(lora=str(adapter), fuse=True)  # an adapter is fused by default
        (out / "manifest.json").write_text(json.dumps(manifest))
        story_obj, options = options_from_args(build_parser().parse_args(_args(story, out, "--lora", str(adapter))))
        if mode == "negative":
            with pytest.raises(render.RenderError, match="memory_rope: shots 1-2 .* 'contiguous', this run would "
                                                          "use 'negative'"):
                render.prepare(story_obj, options)
        else:
            assert render.prepare(story_obj, options).start == 2


@pytest.mark.parametrize("change, expected", [
    ({"version": 4}, "render manifest version 4 is not supported; this storymem reads version 3"),
    ({"version": None}, "render manifest version null is not supported"),
    ({"format": "other"}, "not a storymem render manifest"),
])
def test_other_manifest_versions_are_refused(change, expected, contiguous_render, tmp_path, monkeypatch, capsys):
    story, out, manifest = _interrupted_copy(contiguous_render, tmp_path)
    (out / "manifest.json").write_text(json.dumps(dict(manifest, **change)))
    before = _snapshot(out)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    assert render.main(_args(story, out)) == 2
    err = capsys.readouterr().err
    assert f"{out / 'manifest.json'}: {expected}" in err and "--force" in err
    assert _snapshot(out) == before
    with pytest.raises(render.RenderError, match=expected):
        read_manifest(out / "manifest.json")
    # --force starts over in the folder.
    story_obj, options = options_from_args(build_parser().parse_args(_args(story, out, "--force")))
    plan = render.prepare(story_obj, options)
    assert plan.start == 0 and plan.previous is None
