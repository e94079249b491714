"""The small world's memory experiment: its metrics, a run on two short stories, and its input checks."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from research.small_world import experiment
from research.small_world.datasets import make_story, render_story_truth
from research.small_world.detector import Detection, IdentityDetector
from research.small_world.experiment import ExperimentConfig, ExperimentError, aggregate_scores, score_story
from research.small_world.world import Character
from storymem import render
from storymem.evaluation import PixelBagOfWordsEncoder

FAST = dict(area=32 * 32, frames=5, steps=1, device="cpu", progress=False, count=2)


# ---------------------------------------------------------------------------------------------- metrics
def _found(key):
    return Detection(Character.from_key(key), confidence=0.9)


def test_scores_of_perfect_and_swapped_detections():
    story = make_story(seed=3, num_shots=7)
    truth = story.truth
    identities = story.expected_identities()
    main, other = truth["identities"]["main"], truth["identities"]["other"]
    n = len(identities)
    mains = [i for i, k in enumerate(identities) if k == main]
    others = [i for i, k in enumerate(identities) if k == other]
    assert truth["returns"] and set(mains) | set(others) == set(range(n))

    perfect = score_story([_found(k) for k in identities], truth)
    m = perfect["metrics"]
    assert m["identity_consistency"] == m["identity_consistency_returns"] == m["identity_consistency_after_first"] == 1
    assert m["self_consistency"] == m["distinct"] == 1 and set(m["attribute_accuracy"].values()) == {1.0}

    # The main character's return shot shows the other character instead.
    k = truth["returns"][0]
    swapped = [_found(other if i == k else key) for i, key in enumerate(identities)]
    m = score_story(swapped, truth)["metrics"]
    assert m["identity_consistency"] == pytest.approx((n - 1) / n)
    assert m["identity_consistency_after_first"] == pytest.approx((n - 2) / (n - 1))
    assert m["identity_consistency_returns"] == pytest.approx((len(truth["returns"]) - 1) / len(truth["returns"]))
    same_pairs = len(mains) * (len(mains) - 1) / 2 + len(others) * (len(others) - 1) / 2
    assert m["self_consistency"] == pytest.approx(1 - (len(mains) - 1) / same_pairs)
    assert m["distinct"] == pytest.approx(1 - 1 / len(mains))  # shot k now matches every shot of the other
    assert m["attribute_accuracy"]["shape"] == pytest.approx((n - 1) / n)  # the two never share a shape

    # A shot that continues the previous one draws the other character: only `continued` (and the totals) drop.
    shots = truth["shots"]
    intros = [i for i in range(n) if identities[i] not in identities[:i]]
    continued = [i for i in range(1, n) if i not in intros and shots[i]["cut"] is False]
    assert intros == [0, others[0]] and continued
    c = continued[0]
    drifted = [_found(other if i == c else key) for i, key in enumerate(identities)] if identities[c] == main else \
        [_found(main if i == c else key) for i, key in enumerate(identities)]
    m = score_story(drifted, truth)["metrics"]
    assert m["identity_consistency_introductions"] == 1 and m["identity_consistency_returns"] == 1
    assert m["identity_consistency_continued"] == pytest.approx((len(continued) - 1) / len(continued))
    assert score_story([_found(k) for k in identities], truth)["metrics"]["identity_consistency_continued"] == 1
    # The second character's introduction drifts to the first: only `intro.` (and the totals) drop.
    m = score_story([_found(main if i == others[0] else key) for i, key in enumerate(identities)], truth)["metrics"]
    assert m["identity_consistency_introductions"] == 0.5 and m["identity_consistency_continued"] == 1

    # No detection: wrong, and it neither agrees with nor tells apart anything.
    missing = [None if i == 0 else _found(key) for i, key in enumerate(identities)]
    scored = score_story(missing, truth)
    assert scored["metrics"]["identity_consistency"] == pytest.approx((n - 1) / n)
    assert scored["metrics"]["detection_rate"] == pytest.approx((n - 1) / n)
    assert scored["shots"][0]["detected"] is None and not scored["shots"][0]["correct"]

    pooled = aggregate_scores({"a": perfect, "b": score_story(swapped, truth)})
    assert pooled["identity_consistency"] == pytest.approx((2 * n - 1) / (2 * n))
    assert pooled["counts"]["shots"] == 2 * n and pooled["identity_consistency_story_stderr"] > 0
    with pytest.raises(ExperimentError, match="detections"):
        score_story(swapped[:-1], truth)


def test_identity_metric_on_ground_truth_renders():
    story = make_story(seed=5, num_shots=6)
    shots = render_story_truth(story.truth, 9, 64, 64)
    detector = IdentityDetector()
    found = [detector.identify(frames) for frames in shots]
    assert score_story(found, story.truth)["metrics"]["identity_consistency"] == 1.0
    assert detector.identity_consistency(shots, story.expected_identities()) == 1.0
    # Shot 1 replaced by the other character's first shot: one of six shots is wrong.
    other = next(i for i, s in enumerate(story.truth["shots"]) if s["role"] == "other")
    found[0] = found[other]
    assert score_story(found, story.truth)["metrics"]["identity_consistency"] == pytest.approx(5 / 6)


def test_pixel_bag_of_words_encoder_is_not_clip():
    encoder = PixelBagOfWordsEncoder(["a", "the", "red", "blue", "circle", "square"])
    assert "not CLIP" in encoder.name and encoder.aligned is False
    text = encoder.embed_text(["a red circle", "the red circle", "a blue square", "zebra"])
    assert torch.allclose(text[:3].norm(dim=-1), torch.ones(3)) and text[3].abs().sum() == 0
    assert float(text[0] @ text[1]) > float(text[0] @ text[2])
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    a, b = encoder.embed_video(video), encoder.embed_video(video[::-1].copy())
    assert a.shape == text[0].shape and float(a @ b) == pytest.approx(1.0, abs=1e-5)
    assert float(a @ text[0]) == 0.0  # separate blocks: no video-text similarity
    assert float(a @ encoder.embed_video(255 - video)) < 0.5


# ---------------------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved one-expert tiny base (the toy base's layout) and two adapters (negative and contiguous RoPE)."""
    from storymem.lora import StoryMemLoraConfig, add_storymem_adapter, save_storymem_lora
    from storymem.pipeline import StoryMemPipeline
    from storymem.builtin.tiny import TinyConfig, build_tiny_components

    tmp = tmp_path_factory.mktemp("models")
    StoryMemPipeline(**build_tiny_components(TinyConfig(two_experts=False))).save_pretrained(tmp / "base")
    for name, rope in (("adapter", "negative"), ("contiguous", "contiguous")):
        transformer = build_tiny_components(TinyConfig(two_experts=False))["transformer"]
        config = StoryMemLoraConfig(rank=4, alpha=4.0, memory_rope=rope, experts=["transformer"])
        add_storymem_adapter(transformer, config)
        with torch.no_grad():  # a non-zero update, so the adapter changes something
            for param_name, param in transformer.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, 0.02)
        save_storymem_lora(tmp / name, {"transformer": transformer}, config)
    return tmp


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_experiment_on_two_stories(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = ExperimentConfig(base=str(models / "base"), adapter=str(models / "adapter"), stories=tmp_path / "stories",
                              out=out, conditions=["m2v", "independent", "ground_truth"], **FAST)
    results = experiment.run_experiment(config)

    assert (tmp_path / "stories" / "index.json").is_file()  # made, since the folder was missing
    assert results["conditions"] == ["ground_truth", "independent", "m2v"]
    assert results["settings"]["height"] == results["settings"]["width"] == 32
    assert results["settings"]["shift"] == 4.0  # the base's own scheduler shift
    assert results["device"]["kind"] == "cpu"
    saved = json.loads((out / "results.json").read_text())
    assert saved["conditions"] == results["conditions"] and len(saved["stories"]) == 2
    for name in results["conditions"]:
        row = saved["rows"][name]
        assert row["status"] == "done" and set(row["stories"]) == {"story_000", "story_001"}
        aggregate = row["aggregate"]
        assert aggregate["counts"]["stories"] == 2
        shots = [s for story in row["stories"].values() for s in story["shots"]]
        assert aggregate["counts"]["shots"] == len(shots) == sum(s["num_shots"] for s in saved["stories"])
        # The pooled share is the share of the per-shot records.
        assert aggregate["identity_consistency"] == pytest.approx(np.mean([s["correct"] for s in shots]))
        assert set(aggregate["attribute_accuracy"]) == {"shape", "colour", "pattern", "accessory"}
        assert -1 <= aggregate["pixel_consistency_all"] <= 1 and -1 <= aggregate["pixel_consistency_top_k"] <= 1
        assert (out / "contact_sheets" / f"{name}.png").is_file()
        assert all((out / s["file"]).is_file() for s in shots)
        if name == "ground_truth":
            assert aggregate["seconds_per_shot"] is None
        else:
            assert aggregate["seconds_per_shot"] > 0 and aggregate["counts"]["timed_shots"] == len(shots)

    manifests = {name: json.loads((out / "renders" / name / "story_000" / "manifest.json").read_text())
                 for name in ("independent", "m2v")}
    assert manifests["independent"]["settings"]["memory_source"] == "none"
    assert manifests["independent"]["settings"]["lora"] is None
    assert all(s["memory"] == [] and s["mode"] == "m2v" for s in manifests["independent"]["shots"])
    assert manifests["m2v"]["settings"]["lora"] == str((models / "adapter").resolve())
    assert manifests["m2v"]["settings"]["negative_prompt"] == ""
    assert "mi2v" in [s["mode"] for s in manifests["m2v"]["shots"]]

    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| condition | identity | returns | after 1st | intro. | continued | self-cons.")
    assert [line.split(" | ")[0] for line in table.splitlines()[2:5]] == ["| ground_truth", "| independent", "| m2v"]
    assert "on CPU" in table and "not CLIP" in table

    # The pixel consistency is what `storymem eval` reports for the same folder with the same encoder.
    from storymem.evaluation import EvalConfig, collect_shots, evaluate
    from storymem.builtin.tiny import TOY_VOCABULARY

    story = saved["rows"]["m2v"]["stories"]["story_000"]
    report = evaluate(collect_shots(out / "renders" / "m2v" / "story_000"), PixelBagOfWordsEncoder(TOY_VOCABULARY),
                      None, EvalConfig(top_k=10))
    assert story["pixel"]["all"] == pytest.approx(report["metrics"]["cross_shot_consistency"], abs=1e-6)
    assert story["pixel"]["top_k"] == pytest.approx(report["metrics"]["cross_shot_consistency_top_k"], abs=1e-6)
    assert report["metrics"]["prompt_following_single_shot"] is None  # not CLIP: no video-text space

    # Planned again, every story is finished: a rerun renders nothing and loads no model.
    monkeypatch.setattr(render, "load_render_pipeline", _must_not_load)
    plan = experiment.plan_experiment(config)
    assert all(p.start == len(case.story) for jobs in plan.jobs.values() for case, p in jobs)
    experiment.render_all(plan)


def test_default_conditions_and_the_contiguous_rows(models, tmp_path):
    stories = tmp_path / "stories"
    base = dict(base=str(models / "base"), adapter=str(models / "adapter"), stories=stories, out=tmp_path / "out",
                limit_stories=1, **FAST)
    plan = experiment.plan_experiment(ExperimentConfig(**base))
    assert [c.name for c in plan.conditions] == ["ground_truth", "independent", "m2v", "base_memory",
                                                 "first_frame_memory", "no_sink", "negative_adapter_contiguous_rope",
                                                 "m2v_retrieval", "base_memory_retrieval"]
    assert "contiguous_rope" in plan.skipped and len(plan.cases) == 1
    options = {name: jobs[0][1].options for name, jobs in plan.jobs.items()}
    assert (options["first_frame_memory"].memory_source, options["no_sink"].sink, options["m2v"].sink) == (
        "first-frame", 0, 3)
    assert options["negative_adapter_contiguous_rope"].memory_rope == "contiguous"
    assert options["independent"].lora is None and options["independent"].continuation == "none"
    # The base alone with m2v's memory and continuation: the row that says what the adapter adds.
    assert options["base_memory"].lora is None
    assert dataclasses.replace(options["base_memory"], lora=options["m2v"].lora, out_dir=None) == dataclasses.replace(
        options["m2v"], out_dir=None)
    # The retrieval rows differ from m2v / base_memory only in how memory frames are picked.
    retrieval = dict(memory_retrieval="prompt", memory_min_relevance=0.3, memory_relative_relevance=0.5)
    for row, plain in (("m2v_retrieval", "m2v"), ("base_memory_retrieval", "base_memory")):
        assert dataclasses.replace(options[row], out_dir=None) == dataclasses.replace(options[plain], out_dir=None,
                                                                                       **retrieval)

    plan = experiment.plan_experiment(ExperimentConfig(**base, contiguous_adapter=str(models / "contiguous")))
    assert not plan.skipped
    contiguous = plan.jobs["contiguous_rope"][0][1].options
    assert contiguous.lora == str((models / "contiguous").resolve()) and contiguous.memory_rope == "contiguous"
    assert not (tmp_path / "out").exists()  # planning writes no render folder

    plan = experiment.plan_experiment(ExperimentConfig(**base, memory_guidance=2.0, first_shot="base"))
    m2v = plan.jobs["m2v"][0][1].options
    assert (m2v.memory_guidance, m2v.first_shot) == (2.0, "base")
    # The adapter's weight goes to the adapter rows only.
    plan = experiment.plan_experiment(ExperimentConfig(**base, lora_scale=0.5))
    scales = {name: jobs[0][1].options.lora_scale for name, jobs in plan.jobs.items()}
    assert scales["m2v"] == scales["no_sink"] == 0.5 and scales["base_memory"] == scales["independent"] == 1.0
    with pytest.raises(ExperimentError, match="--lora-scale -1"):
        experiment.plan_experiment(ExperimentConfig(**base, lora_scale=-1.0))
    # 'toy' names the shipped adapter, as --base toy names the shipped base.
    from storymem.builtin import ADAPTER_DIR
    # (with the shipped base: the adapter's files are checked against the base's blocks before anything loads)
    plan = experiment.plan_experiment(ExperimentConfig(**{**base, "base": "toy", "adapter": "toy"}))
    assert plan.jobs["m2v"][0][1].options.lora == str(ADAPTER_DIR.resolve())
    assert plan.adapters["adapter"]["memory_rope"] == "negative"


# ---------------------------------------------------------------------------------------------- bad input
BAD = {
    "stories folder without index": (["--conditions", "ground_truth"], "index.json"),
    "unknown condition": (["--conditions", "m2v,telepathy"], "'telepathy'"),
    "contiguous row without its adapter": (["--conditions", "contiguous_rope"], "--contiguous-adapter"),
    "memory row without an adapter": (["--conditions", "independent,no_sink"], "--adapter"),
    "missing adapter folder": (["--adapter", "ADAPTER_MISSING"], "adapter folder not found"),
    "frames not 4n+1": (["--conditions", "independent", "--frames", "6"], "--frames 6"),
    "negative memory guidance": (["--conditions", "independent", "--memory-guidance", "-1"], "--memory-guidance"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_before_rendering(case, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(render, "load_render_pipeline", _must_not_load)
    monkeypatch.setattr(render, "load_pipeline", _must_not_load)
    stories = tmp_path / "stories"
    stories.mkdir()
    (stories / "notes.txt").write_text("not a story set")
    extra, expected = BAD[case]
    extra = [str(tmp_path / "nowhere") if e == "ADAPTER_MISSING" else e for e in extra]
    args = ["--base", str(models / "base"), "--stories", str(stories), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--no-progress", *extra]
    assert experiment.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and expected in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- memory check
def test_memory_check_inputs_and_run(models, tmp_path):
    from research.small_world import memory_check as check

    cases = check.make_cases(3, seed=4, frames=5, size=32)
    again = check.make_cases(3, seed=4, frames=5, size=32)
    assert [c["character"].key for c in cases] == [c["character"].key for c in again]
    assert all(np.array_equal(a["memory"], b["memory"]) for a, b in zip(cases, again))
    case = cases[0]
    assert case["other"].key != case["character"].key
    # Each condition gives the model exactly what its description says, and names who memory shows.
    prompt, kwargs, remembered = check.shot_inputs("same+memory", case, 5)
    assert prompt.startswith("the same character") and len(kwargs["memory_images"]) == 3 and "first_frame" not in kwargs
    assert remembered == case["character"]
    assert np.array_equal(np.asarray(kwargs["memory_images"][0]), case["memory"][0])
    prompt, kwargs, remembered = check.shot_inputs("named+other-memory", case, 5)
    assert prompt == case["target"].caption("first") and remembered == case["other"]
    assert np.array_equal(np.asarray(kwargs["memory_images"][-1]), case["other_memory"][4])  # frame 16 -> last
    # Scene memory: the same character in the target's scene, another motion; the older cases stay as they were.
    prompt, kwargs, remembered = check.shot_inputs("same+scene-memory", case, 5)
    assert prompt.startswith("the same character") and remembered == case["character"]
    assert np.array_equal(np.asarray(kwargs["memory_images"][1]), case["scene_memory"][4])
    assert not np.array_equal(case["scene_memory"], case["truth"]) and not np.array_equal(case["scene_memory"],
                                                                                            case["memory"])
    corners = (slice(0, 4), slice(0, 4))  # sky corner: background only, shared within a scene
    assert np.array_equal(case["scene_memory"][0][corners], case["truth"][0][corners])
    prompt, kwargs, remembered = check.shot_inputs("same+first-frame", case, 5)
    assert np.array_equal(np.asarray(kwargs["first_frame"]), case["truth"][0]) and remembered is None
    with pytest.raises(ValueError, match="unknown condition"):
        check.shot_inputs("memory", case, 5)

    out = tmp_path / "check"
    results = check.main(["--base", str(models / "base"), "--adapter", str(models / "adapter"), "--count", "2",
                          "--steps", "1", "--frames", "5", "--size", "32", "--device", "cpu", "--out", str(out),
                          "--conditions", "same,same+memory"])
    saved = json.loads((out / "memory_check.json").read_text())
    assert list(saved["results"]) == ["same", "same+memory"] and saved["results"] == json.loads(json.dumps(results))
    assert saved["results"]["same"]["memory"] is None and 0 <= saved["results"]["same+memory"]["memory"] <= 1
    assert (out / "memory_check.png").is_file()
    with pytest.raises(SystemExit):
        check.main(["--base", str(models / "base"), "--conditions", "same,copy"])


def test_base_check_cut_mode_judges_after_the_cut(models, tmp_path, monkeypatch):
    from research.small_world import base_check as check

    judged = []
    real_identify = check.IdentityDetector.identify

    def identify(self, frames):
        judged.append(len(frames))
        return real_identify(self, frames)

    monkeypatch.setattr(check.IdentityDetector, "identify", identify)
    out = tmp_path / "base_check"
    results = check.main(["--base", str(models / "base"), "--modes", "i2v,i2v-cut", "--count", "3", "--steps", "1",
                          "--frames", "9", "--size", "32", "--device", "cpu", "--out", str(out)])
    assert list(results) == ["i2v", "i2v-cut"]
    assert json.loads((out / "base_check.json").read_text()) == json.loads(json.dumps(results))
    # i2v shots are judged whole (the given first frame dropped); cut shots only on the frames after the cut
    # (9 frames cut at 5: 4 left).
    assert judged[:3] == [8, 8, 8] and judged[3:] == [4, 4, 4]
    with pytest.raises(SystemExit):
        check.main(["--base", str(models / "base"), "--modes", "t2v,cut"])


def test_latent_character_mask_marks_the_cells_a_character_is_in():
    from research.small_world.base_clips import latent_character_mask

    video = torch.zeros(1, 3, 9, 32, 32)  # mid grey: no character
    video[0, 0, 3, 8:12, 20:24] = 1.0  # a saturated red block in pixel frame 3 (latent frame 1), cells (2, 5)
    video[0, 1:, 3, 8:12, 20:24] = -1.0
    mask = latent_character_mask(video, temporal_scale=4, spatial_scale=4)
    assert mask.shape == (1, 1, 3, 8, 8)
    assert mask.sum() == 1 and mask[0, 0, 1, 2, 5] == 1
    with pytest.raises(ValueError, match="4n\\+1"):
        latent_character_mask(torch.zeros(1, 3, 8, 32, 32))


def test_loss_probe_conditions_differ_only_where_they_say(models, tmp_path, monkeypatch):
    from research.small_world import loss_probe as probe

    cases = probe.make_cut_cases(3, seed=1, frames=9, size=32)
    again = probe.make_cut_cases(3, 1, 9, 32)
    assert all(np.array_equal(a["swapped"]["other-shape"], b["swapped"]["other-shape"]) for a, b in zip(cases, again))
    attributes = ("shape", "colour", "pattern", "accessory")

    def check_stand_ins(case):
        truth = case["character"]
        assert set(case["stand_ins"]) == {"other", "other-shape", "other-colour", "other-pattern", "other-accessory"}
        for name, who in case["stand_ins"].items():
            differs = {a for a in attributes if getattr(who, a) != getattr(truth, a)}
            assert differs == {name[len("other-"):]} if name != "other" else differs

    def same_layout(a, b):  # the same scene and motion: few pixels differ, all of them near a character
        changed = (a != b).any(axis=-1)
        return 0 < changed.mean() < 0.2

    for case in cases:
        cut = case["cut"]
        check_stand_ins(case)
        for name, swapped in case["swapped"].items():
            assert np.array_equal(swapped[cut:], case["video"][cut:])
            assert same_layout(swapped[:cut], case["video"][:cut])
        before, after = case["caption"].split(" then ", 1)
        assert before.startswith("the same character") and case["named_caption"].endswith(" then " + after)
        assert not case["named_caption"].startswith("the same character")

    from storymem import StoryMemPipeline
    from storymem.devices import dtype_kwargs

    pipe = StoryMemPipeline.from_pretrained(str(models / "base"), **dtype_kwargs(torch.float32))
    prober = probe.Prober(pipe, "cpu", seed=0)
    calls = []
    real = probe.Prober.cell_losses

    def record(self, latents, condition, context_frames, prompt_embeds, weights, memory=None):
        calls.append((latents, condition, prompt_embeds, weights, memory))
        return real(self, latents, condition, context_frames, prompt_embeds, weights, memory)

    monkeypatch.setattr(probe.Prober, "cell_losses", record)
    losses = probe.probe_cut(prober, cases)
    assert list(losses) == list(probe.PROBES["cut"]) and losses["seen"].shape == (3, len(probe.TIMESTEPS))
    (seen, c_seen, p_same, w, _), (other, c_other, p_other, _, _) = calls[:2]
    p_named = calls[-1][2]
    first_after = (cases[0]["cut"] - 1) // 4 + 1
    # After the cut the latents are the very same; before it they show the stand-in; loss only after.
    assert torch.equal(seen[0, :, first_after:], other[0, :, first_after:])
    assert not torch.equal(seen[0, :, :first_after], other[0, :, :first_after])
    assert w[0, :, :first_after].sum() == 0 and w[0, :, first_after:].sum() > 0
    assert not torch.equal(c_seen, c_other) and torch.equal(p_same, p_other) and not torch.equal(p_same, p_named)
    # Fixed noise and timesteps: the same inputs give the same losses.
    assert torch.equal(real(prober, seen, c_seen, 1, p_same, w), losses["seen"])

    for case in probe.make_memory_cases(2, seed=1, frames=9, size=32):
        check_stand_ins(case)
        assert set(case["memory"]) == {"memory", *(f"{name}-memory" for name in case["stand_ins"])}
        assert all(same_layout(m, case["memory"]["memory"]) for k, m in case["memory"].items() if k != "memory")

    out = tmp_path / "probe"
    results = probe.main(["--base", str(models / "base"), "--adapter", str(models / "adapter"), "--count", "2",
                          "--frames", "9", "--size", "32", "--device", "cpu", "--out", str(out)])
    assert set(results) == {"cut", "memory"}
    assert set(results["memory"]["gap"]) == {f"{c}/memory" for c in probe.PROBES["memory"][1:]}
    assert all(np.isfinite(v) and v > 0 for r in results.values() for v in r["loss"].values())
    assert json.loads((out / "loss_probe.json").read_text())["results"] == json.loads(json.dumps(results))
    with pytest.raises(SystemExit):
        probe.main(["--base", str(models / "base"), "--probes", "cut,recall"])


def test_detection_tally_counts_misses_as_wrong_and_reads_memory():
    from research.small_world.checks import DetectionTally
    from research.small_world.detector import Detection
    from research.small_world.world import Character

    meant = Character("circle", "red", "plain", "none")
    other = Character("square", "blue", "striped", "hat")
    near = Character("circle", "red", "striped", "none")
    tally = DetectionTally()
    tally.add(Detection(meant, 1.0), meant, seconds=1.0, remembered=other)
    tally.add(Detection(near, 1.0), meant, seconds=2.0, remembered=other)
    tally.add(Detection(other, 1.0), meant, seconds=3.0, remembered=other)
    tally.add(None, meant, seconds=2.0, remembered=other)
    r = tally.results()
    assert r["identity"] == 0.25 and r["shape"] == 0.5 and r["pattern"] == 0.25 and r["memory"] == 0.25
    assert r["detected"] == 0.75 and r["seconds_per_shot"] == 2.0
    assert tally.line().startswith("identity 0.250  shape 0.500") and "remembered character 0.250" in tally.line()
    no_memory = DetectionTally()
    no_memory.add(Detection(meant, 1.0), meant)
    assert no_memory.results()["memory"] is None and "remembered" not in no_memory.line()


def test_default_story_seed_is_the_recipes_held_out_set():
    import re
    from pathlib import Path

    recipe = (Path(experiment.__file__).resolve().parent / "train_small_world.sh").read_text()
    stage = re.search(r"make_story_set\('\$RUN/stories', [^)]*seed=(\d+)", recipe)
    assert stage, "the recipe's stories stage no longer calls make_story_set"
    assert int(stage.group(1)) == experiment.HELD_OUT_STORY_SEED
    assert ExperimentConfig(base="toy", stories=Path("s"), out=Path("o")).story_seed == experiment.HELD_OUT_STORY_SEED
    assert experiment.build_parser().parse_args(["--base", "toy", "--stories", "s", "--out", "o"]).seed == \
        experiment.HELD_OUT_STORY_SEED


def test_the_shipped_base_samples_with_its_own_scheduler_shift(tmp_path):
    from research.small_world.experiment_plan import _base_shift
    from storymem.builtin import BASE_DIR, BUILTIN_SAMPLING

    shipped = json.loads((BASE_DIR / "scheduler" / "scheduler_config.json").read_text())["flow_shift"]
    assert _base_shift("toy") == shipped == BUILTIN_SAMPLING["shift"]
    # A folder without a scheduler config falls back to the release's shift.
    assert _base_shift(str(tmp_path)) == 4.0
    config = ExperimentConfig(base="toy", stories=tmp_path / "s", out=tmp_path / "o")
    assert (config.area, config.frames, config.steps) == (BUILTIN_SAMPLING["area"], BUILTIN_SAMPLING["frames"],
                                                           BUILTIN_SAMPLING["steps"])
