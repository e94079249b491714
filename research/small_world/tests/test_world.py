"""The toy world: deterministic rendering, captions in the toy vocabulary, stories with a returning character,
clip datasets that train_lora.py prepares, and the identity detector (accuracy before and after H.264)."""

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from research.small_world.datasets import (
    DatasetError,
    make_clip_dataset,
    make_story,
    make_story_set,
    read_labels,
    render_story_truth,
)
from research.small_world.detector import DetectorConfig, IdentityDetector, identity_consistency, same_character
from research.small_world.world import (
    ACCESSORIES,
    BACKGROUND_MAX_SATURATION,
    BACKGROUND_MAX_VALUE,
    BACKGROUNDS,
    CAPTION_MODES,
    MOTIONS,
    SHAPES,
    Character,
    ClipSpec,
    Motion,
    Prop,
    Scene,
    WorldError,
    render_background,
    render_clip,
)
from storymem.builtin.tiny import build_tokenizer
from storymem.story import load_story
from storymem.video import read_video, write_video

ROOT = Path(__file__).resolve().parents[3]  # the repository: train_lora.py


@pytest.fixture(scope="module")
def detector():
    return IdentityDetector(DetectorConfig(max_frames=3))


def _words_ok(tokenizer, texts):
    unk = tokenizer.unk_token_id
    return [t for t in texts if unk in tokenizer(t)["input_ids"]]


def _hsv(frame):
    rgb = frame.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0), mx


# ---------------------------------------------------------------------------------------------- world
@pytest.mark.parametrize("size", [(32, 32), (48, 80), (64, 64)])
def test_render_is_a_function_of_the_seed(size):
    state = np.random.get_state()
    rng = np.random.default_rng(7)
    spec = ClipSpec.random(rng, Character("star", "red", "striped", "hat"))
    a, b = spec.render(9, *size), spec.render(9, *size)
    assert a.shape == (9, *size, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert len({frame.tobytes() for frame in a}) > 2  # it moves
    other = ClipSpec(spec.characters, spec.scene, spec.motions, seed=spec.seed + 1)
    assert not np.array_equal(a, other.render(9, *size))
    # A motion given by kind only takes its direction and start from the seed.
    c = render_clip(Character("circle", "blue"), Scene("desert"), "walk", 5, *size, seed=3)
    assert np.array_equal(c, render_clip(Character("circle", "blue"), Scene("desert"), "walk", 5, *size, seed=3))
    # Specs and captions are functions of the generator's seed too, and global random state is untouched.
    again = ClipSpec.random(np.random.default_rng(7), Character("star", "red", "striped", "hat"))
    assert again == spec and again.caption() == spec.caption()
    assert ClipSpec.random(np.random.default_rng(8), spec.characters[0]) != spec
    assert ClipSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1])


def test_large_frames_and_every_motion():
    rng = np.random.default_rng(1)
    character = Character("heart", "purple", "checkered", "crown")
    for kind in MOTIONS:
        frames = render_clip(character, Scene.random(rng), Motion.random(rng, kinds=(kind,)), 3, 48, 80, seed=1)
        assert frames.shape == (3, 48, 80, 3)
    big = render_clip(character, Scene.random(rng, "city"), "spin", 2, 480, 832, seed=0)
    assert big.shape == (2, 480, 832, 3) and big.std() > 10


def test_captions_use_only_the_toy_vocabulary():
    tokenizer = build_tokenizer()
    rng = np.random.default_rng(0)
    texts = []
    for background in BACKGROUNDS:
        for _ in range(6):
            spec = ClipSpec.random(rng, Character.random(rng), background=background)
            texts += [spec.caption(mode) for mode in CAPTION_MODES]
    texts += [Character(s, "orange", "dotted", a).description(definite) for s in SHAPES for a in ACCESSORIES
              for definite in (False, True)]
    assert texts[0].split()[0] in ("a", "an") and "orange" in texts[-1]
    assert any(t.startswith("an orange") for t in texts)
    for seed in range(5):
        script = make_story(seed, 6 + seed).script
        texts += [script["story_name"], script["story_overview"]]
        for scene in script["scenes"]:
            texts += scene["video_prompts"] + scene["first_frame_prompt"]
    assert _words_ok(tokenizer, texts) == []


def test_backgrounds_are_muted_and_empty_of_characters(detector):
    rng = np.random.default_rng(2)
    scenes = [Scene.random(rng, background) for background in BACKGROUNDS]
    frames = np.stack([render_background(scene, 48, 80) for scene in scenes])
    saturation, value = _hsv(frames)
    assert not ((saturation > BACKGROUND_MAX_SATURATION) & (value > BACKGROUND_MAX_VALUE)).any()
    assert len({frame.tobytes() for frame in frames}) == len(BACKGROUNDS)


def test_bad_attributes_and_settings_are_named():
    with pytest.raises(WorldError, match="shape 'blob'"):
        Character("blob", "red")
    with pytest.raises(WorldError, match="colour 'teal'"):
        Character.from_dict({"shape": "circle", "colour": "teal"})
    with pytest.raises(WorldError, match="background"):
        Scene("moonbase")
    with pytest.raises(WorldError, match="needs a direction"):
        Motion("walk", 0)
    with pytest.raises(WorldError, match="cannot appear together"):
        render_clip([Character("circle", "red"), Character("square", "cyan")], Scene("snow"), "stand", 2, 32, 32)
    with pytest.raises(WorldError, match="at least 16x16"):
        render_clip(Character("circle", "red"), Scene("snow"), "stand", 2, 8, 32)
    with pytest.raises(DatasetError, match="num_shots"):
        make_story(0, 5)
    with pytest.raises(DatasetError, match="even"):
        make_clip_dataset("/nonexistent/never-written", 1, 1, 9, 33, 32)


# ---------------------------------------------------------------------------------------------- stories
def _returns_after_other(shots):
    roles = [s["role"] for s in shots]
    first_other = roles.index("other")
    return [i for i in range(first_other + 1, len(roles)) if roles[i] == "main" and roles[i - 1] == "other"]


@pytest.mark.parametrize("seed,num_shots", [(0, 6), (1, 6), (2, 7), (3, 9), (4, 12)])
def test_story_structure(seed, num_shots):
    story = make_story(seed, num_shots)
    assert story.script == make_story(seed, num_shots).script and story.script != make_story(seed + 100,
                                                                                             num_shots).script
    shots = story.truth["shots"]
    cuts = [c for scene in story.script["scenes"] for c in scene["cut"]]
    assert len(shots) == len(cuts) == num_shots and cuts[0] and not all(cuts)
    main, other = story.truth["identities"]["main"], story.truth["identities"]["other"]
    assert main != other and shots[0]["identity"] == main and other in story.expected_identities()
    returns = _returns_after_other(shots)
    assert returns and returns[0] in story.truth["returns"]
    assert "returns" in shots[returns[0]]["prompt"] and shots[returns[0]]["cut"]
    # A continuation stays in its scene and starts where the previous shot ended.
    for prev, shot in itertools.pairwise(shots):
        if not shot["cut"]:
            a, b = ClipSpec.from_dict(prev["clip"]), ClipSpec.from_dict(shot["clip"])
            assert a.scene == b.scene and a.seed == b.seed and prev["identity"] == shot["identity"]
            assert b.motions[0].start_x == pytest.approx(a.motions[0].end_x, abs=1e-3)


def test_story_set_loads_with_the_story_loader(tmp_path):
    paths = make_story_set(tmp_path, count=3, seed=5, num_shots=6, max_shots=8, exclude=["red-plain-circle-none"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(paths) == 3 and len(index["stories"]) == 3
    mains = set()
    for path, entry in zip(paths, index["stories"]):
        story = load_story(path)
        truth = json.loads((tmp_path / entry["truth"]).read_text())
        assert len(story.shots) == len(truth["shots"]) == entry["num_shots"] >= 6
        assert [s.prompt for s in story.shots] == [s["prompt"] for s in truth["shots"]]
        assert [s.cut for s in story.shots] == [s["cut"] for s in truth["shots"]]
        assert "red-plain-circle-none" not in truth["identities"].values()
        mains.add(truth["identities"]["main"])
    assert len(mains) == 3
    assert sorted(p.name for p in (tmp_path / "stories").iterdir()) == ["story_000.json", "story_001.json",
                                                                         "story_002.json"]


def test_reference_story_keeps_its_identities(detector):
    story = make_story(11, 6)
    shots = render_story_truth(story.truth, 9, 48, 80)
    expected = story.expected_identities()
    assert identity_consistency(shots, expected, detector) == 1.0
    # Swap the two characters' expectations: every shot is now wrong.
    main, other = story.truth["identities"]["main"], story.truth["identities"]["other"]
    swapped = [other if e == main else main for e in expected]
    assert identity_consistency(shots, swapped, detector) == 0.0
    back = story.truth["returns"][0]
    first_other = [s["role"] for s in story.truth["shots"]].index("other")
    assert same_character(shots[0], shots[back], detector).same
    match = same_character(shots[0], shots[first_other], detector)
    assert not match.same and match.agreement < 1.0 and match.confidence > 0.3
    matrix = detector.agreement_matrix(shots)
    assert matrix[0, back] == 1.0 and matrix[0, first_other] < 1.0 and np.allclose(matrix, matrix.T)


# ---------------------------------------------------------------------------------------------- detector
def _random_clips(seed, count, height, width, frames=9):
    rng = np.random.default_rng(seed)
    specs = [ClipSpec.random(rng, Character.random(rng)) for _ in range(count)]
    return specs, [spec.render(frames, height, width) for spec in specs]


def _accuracy(detector, specs, clips):
    hits = {k: 0 for k in ("shape", "colour", "pattern", "accessory", "identity")}
    for spec, frames in zip(specs, clips):
        found = detector.identify(frames)
        truth = spec.characters[0]
        for attribute in ("shape", "colour", "pattern", "accessory"):
            hits[attribute] += found is not None and getattr(found.character, attribute) == getattr(truth, attribute)
        hits["identity"] += found is not None and found.character == truth
    return {k: v / len(specs) for k, v in hits.items()}


def _mp4_round_trip(path, clips):
    """Encode all clips as one H.264 video (crf 18, like the clip datasets) and cut it apart again."""
    write_video(path, np.concatenate(clips), fps=16)
    decoded, _ = read_video(path)
    return np.split(decoded, len(clips))


@pytest.mark.parametrize("size,seed", [((64, 64), 21), ((48, 80), 22)])
def test_detector_recovers_identities_before_and_after_h264(detector, tmp_path, size, seed):
    specs, clips = _random_clips(seed, 32, *size)
    raw = _accuracy(detector, specs, clips)
    decoded = _accuracy(detector, specs, _mp4_round_trip(tmp_path / "clips.mp4", clips))
    print(f"\ndetector accuracy at {size[0]}x{size[1]}: raw {raw}; after H.264 {decoded}")
    for accuracy in (raw, decoded):
        assert accuracy["colour"] >= 0.95 and accuracy["shape"] >= 0.95
        assert accuracy["pattern"] >= 0.9 and accuracy["accessory"] >= 0.9 and accuracy["identity"] >= 0.85


def _box_blur(frames, passes):
    x = frames.astype(np.float32)
    for _ in range(passes):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(p[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    return x.round().astype(np.uint8)


def test_detector_reads_patterns_through_blur(detector):
    """A decoder blurs a pattern's dark shade towards the body colour: the layout must still be read, and
    plain bodies (whose rims blur into the background) must stay plain."""
    specs, clips = _random_clips(5, 40, 64, 64)
    found = [detector.identify(_box_blur(clip, 2)) for clip in clips]
    truth = [spec.characters[0] for spec in specs]
    pattern = np.mean([f is not None and f.character.pattern == t.pattern for f, t in zip(found, truth)])
    plain = [f is not None and f.character.pattern == "plain" for f, t in zip(found, truth) if t.pattern == "plain"]
    assert pattern >= 0.9 and len(plain) >= 5 and all(plain), (pattern, plain)
    with pytest.raises(ValueError, match="pattern_min_fit"):
        DetectorConfig(pattern_min_fit=1.5)


def test_detector_finds_two_characters_reports_poses_and_nothing_on_empty_scenes(detector):
    a, b = Character("circle", "red", "striped", "hat"), Character("triangle", "blue", "dotted", "glasses")
    scene = Scene("meadow", (Prop("tree", 0.5),))
    frames = render_clip([a, b], scene, [Motion("stand", 0, 0.25), Motion("jump", 0, 0.75)], 5, 64, 112, seed=3)
    found = detector.detect(frames)
    assert {d.key for d in found} == {a.key, b.key}
    by_key = {d.key: d for d in found}
    assert by_key[a.key].pose.x < 56 < by_key[b.key].pose.x and all(0 < d.confidence <= 1 for d in found)
    assert detector.detect_frame(render_background(scene, 64, 112)) == []
    # Large frames are reduced before the fit; float frames work too.
    spec = ClipSpec((Character("moon", "green", "checkered", "bow"),), Scene("night"), (Motion("stand", 0, 0.4),), 1)
    large = spec.render(1, 240, 416)
    detection = detector.detect_frame(large.astype(np.float32) / 255.0)[0]
    assert detection.character == spec.characters[0]
    assert detection.pose.x == pytest.approx(0.4 * 416, abs=4)
    with pytest.raises(ValueError, match="shape"):
        detector.detect(np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="2 shots but 1"):
        detector.identity_consistency([frames, frames], [a])


# ---------------------------------------------------------------------------------------------- clip datasets
def test_clip_dataset_groups_labels_resume_and_prepare(tmp_path, capsys):
    out = tmp_path / "toy"
    dataset = make_clip_dataset(out, num_identities=2, clips_per_identity=3, num_frames=9, height=32, width=32,
                                seed=4, referential_prob=0.5)
    assert dataset.rendered == 6 and len(dataset.identities) == 2
    rows = [json.loads(line) for line in dataset.manifest.read_text().splitlines()]
    assert len(rows) == 6 and {len(v) for v in dataset.groups().values()} == {3}
    labels = read_labels(dataset.labels)
    for row, label in zip(rows, labels):
        assert (out / row["file"]).is_file() and (out / row["file"]).with_suffix(".txt").read_text().strip() == \
            row["caption"]
        assert label["file"] == row["file"] and label["group"] == row["group"]
        assert row["group"].endswith(label["identity"]) and label["clip"].characters[0] == label["character"]
    frames, fps = read_video(out / rows[0]["file"])
    assert frames.shape == (9, 32, 32, 3) and fps == 16
    # Same settings: nothing to redo. Other settings in the same folder: refused.
    assert make_clip_dataset(out, 2, 3, 9, 32, 32, seed=4, referential_prob=0.5).rendered == 0
    with pytest.raises(DatasetError, match="seed"):
        make_clip_dataset(out, 2, 3, 9, 32, 32, seed=5, referential_prob=0.5)
    with pytest.raises(DatasetError, match="scenes_per_identity"):
        make_clip_dataset(out, 2, 3, 9, 32, 32, seed=4, referential_prob=0.5, scenes_per_identity=2)
    with pytest.raises(DatasetError, match="scenes_per_identity must be an integer >= 1"):
        make_clip_dataset(tmp_path / "none", 2, 3, 9, 32, 32, scenes_per_identity=0)
    # Clips of one character can share scenes (k=2: clips 0 and 2 in one scene, 1 in the other).
    shared = make_clip_dataset(tmp_path / "shared", 2, 3, 9, 32, 32, seed=4, scenes_per_identity=2)
    for clips in shared.groups().values():
        scenes = [r.spec.scene for r in clips]
        assert scenes[0] == scenes[2] and scenes[0] != scenes[1]
        assert clips[0].spec.motions != clips[2].spec.motions or clips[0].spec.seed != clips[2].spec.seed

    # Subject masks: the world knows where it drew the character; rendering them changes no frame.
    masked = make_clip_dataset(tmp_path / "masked", 2, 3, 9, 32, 32, seed=4, referential_prob=0.5,
                               subject_masks=True)
    masked_rows = [json.loads(line) for line in masked.manifest.read_text().splitlines()]
    assert [r["mask"] for r in masked_rows] == [r["file"].replace("clips/", "masks/", 1) for r in rows]
    record = masked.records[0]
    frames, mask = record.spec.render(9, 32, 32, with_mask=True)
    assert np.array_equal(frames, record.spec.render(9, 32, 32)) and mask.shape == (9, 32, 32)
    background = render_background(record.spec.scene, 32, 32)
    untouched = (frames == background[None]).all(axis=-1)
    assert mask.any(axis=(1, 2)).all() and not (mask & untouched).any()
    written, _ = read_video(tmp_path / "masked" / masked_rows[0]["mask"])
    assert ((written.mean(axis=-1) > 127) == mask).mean() > 0.97
    with pytest.raises(DatasetError, match="subject_masks"):
        make_clip_dataset(out, 2, 3, 9, 32, 32, seed=4, referential_prob=0.5, subject_masks=True)

    spec = importlib.util.spec_from_file_location("train_lora", ROOT / "train_lora.py")
    train_lora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_lora)
    prepared = tmp_path / "prepared"
    code = train_lora.main(["prepare", "--base", "tiny", "--manifest", str(dataset.manifest), "--out", str(prepared),
                            "--height", "32", "--width", "32", "--num-frames", "9", "--embedder", "pixel",
                            "--contexts", "none", "--cache-dtype", "float32", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    index = json.loads((prepared / "index.json").read_text())
    assert sorted(map(sorted, index["clusters"])) == [[0, 1, 2], [3, 4, 5]]
    assert [c["caption"] for c in index["clips"]] == [r["caption"] for r in rows]
