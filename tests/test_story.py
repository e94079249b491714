import json
from pathlib import Path

import pytest

from storymem.story import Shot, Story, StoryError, load_story

ST_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "st-bench"


def st_bench_script(**overrides):
    data = {
        "story_name": "Two scenes",
        "story_overview": "A cat wakes up, then goes outside.",
        "scenes": [
            {
                "scene_num": 1,
                "video_prompts": ["A cat sleeps on a sofa.", "The cat stretches.", "The cat jumps down."],
                "first_frame_prompt": ["Sleeping cat.", "Stretching cat.", "Cat mid-air."],
                "cut": [True, False, True],
            },
            {
                "scene_num": 2,
                "video_prompts": ["The cat walks in the garden.", "The cat chases a butterfly."],
                "first_frame_prompt": ["Garden.", "Butterfly."],
                "cut": [True, False],
            },
        ],
    }
    data.update(overrides)
    return data


def write_json(tmp_path, data, name="story.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_st_bench_form(tmp_path):
    story = load_story(write_json(tmp_path, st_bench_script()))
    assert story.name == "Two scenes"
    assert story.overview.startswith("A cat wakes up")
    assert story.path == tmp_path / "story.json"
    assert len(story) == 5
    assert [s.index for s in story] == [0, 1, 2, 3, 4]
    assert [s.scene for s in story] == [1, 1, 1, 2, 2]
    assert [s.shot_in_scene for s in story] == [0, 1, 2, 0, 1]
    assert [s.cut for s in story] == [True, False, True, True, False]
    assert [s.file_stem for s in story] == ["01_01", "01_02", "01_03", "02_01", "02_02"]
    assert story[4] == Shot(4, 2, 1, "The cat chases a butterfly.", False, "Butterfly.")
    assert story.scene_numbers == [1, 2]
    assert [s.prompt for s in story.scene(2)] == story.prompts[3:]


def test_to_dict_round_trip(tmp_path):
    story = load_story(write_json(tmp_path, st_bench_script()))
    data = story.to_dict()
    assert data["path"] == str(tmp_path / "story.json")
    assert data["scenes"][0]["cut"] == [True, False, True]
    again = Story.from_dict(json.loads(json.dumps(data)))
    assert again.shots == story.shots and again.name == story.name and again.overview == story.overview
    assert again.path == story.path


def test_plain_forms(tmp_path):
    from_list = load_story(write_json(tmp_path, ["a red ball", "a blue ball"], "list.json"))
    assert from_list.prompts == ["a red ball", "a blue ball"]
    assert from_list.name == "list" and [s.cut for s in from_list] == [True, True]
    assert [s.file_stem for s in from_list] == ["01_01", "01_02"]

    obj = {"prompts": ["a", "b", "c"], "cuts": [True, False, True], "name": "abc", "overview": "letters"}
    story = load_story(write_json(tmp_path, obj, "obj.json"))
    assert (story.name, story.overview, [s.cut for s in story]) == ("abc", "letters", [True, False, True])

    txt = tmp_path / "prompts.txt"
    txt.write_text("# my story\nfirst shot\n\n  second shot  \n", encoding="utf-8")
    story = load_story(txt)
    assert story.prompts == ["first shot", "second shot"] and story.name == "prompts"

    story = Story.from_prompts(["x", "y"], cuts=[True, False], name="xy")
    assert [s.cut for s in story] == [True, False] and story.name == "xy" and story.path is None
    assert Story.from_dict(story.to_dict()).shots == story.shots


@pytest.mark.skipif(not ST_BENCH.is_dir(), reason="ST-Bench scripts not available")
def test_all_st_bench_scripts_load():
    paths = sorted(ST_BENCH.glob("*.json"))
    assert len(paths) == 30
    stories = [load_story(p) for p in paths]
    assert sum(len(s) for s in stories) == 300
    for story in stories:
        assert story.shots[0].cut is True
        assert story.overview and story.name
        assert all(shot.first_frame_prompt for shot in story)
        stems = [shot.file_stem for shot in story]
        assert stems == sorted(stems) and len(set(stems)) == len(stems)


def scene(**fields):
    base = {"scene_num": 1, "video_prompts": ["p1", "p2"], "cut": [True, False]}
    base.update(fields)
    return base


@pytest.mark.parametrize(
    "data, message",
    [
        ({"story_name": "x", "scenes": []}, "field 'scenes' is empty"),
        ({"story_name": "x"}, "missing field 'scenes'"),
        ({"scenes": "nope"}, "field 'scenes' must be a list"),
        ({"scenes": [scene(video_prompts=[], cut=[])]}, "scene 1: field 'video_prompts' is empty"),
        ({"scenes": [{"video_prompts": ["a"], "cut": [True]}]}, "scenes[0]: missing field 'scene_num'"),
        ({"scenes": [{"scene_num": 1, "cut": [True]}]}, "scene 1: missing field 'video_prompts'"),
        ({"scenes": [{"scene_num": 1, "video_prompts": ["a"]}]}, "scene 1: missing field 'cut'"),
        ({"scenes": [scene(cut=[True])]}, "scene 1: field 'cut' has 1 entries but there are 2 prompts"),
        ({"scenes": [scene(cut=[True, "false"])]}, "scene 1, shot 2: field 'cut' must be a JSON boolean"),
        ({"scenes": [scene(cut=[True, 0])]}, "scene 1, shot 2: field 'cut' must be a JSON boolean"),
        ({"scenes": [scene(video_prompts=["a", "   "])]}, "scene 1, shot 2: video_prompts entry is empty"),
        (
            {"scenes": [scene(video_prompts=["a", 7])]},
            "scene 1, shot 2: video_prompts entry must be a string, got int",
        ),
        ({"scenes": [scene(), scene()]}, "scenes[1]: duplicate scene_num 1 (also scenes[0])"),
        ({"scenes": [scene(scene_num=2), scene(scene_num=1)]}, "scene numbers must increase"),
        ({"scenes": [scene(scene_num="1")]}, "field 'scene_num' must be a non-negative integer"),
        ({"scenes": [scene(cut=[False, True])]}, "scene 1, shot 1: 'cut' is false, but the first shot"),
        ({"scenes": [scene(first_frame_prompt=["only one"])]}, "field 'first_frame_prompt' has 1 entries"),
        ({"scenes": [scene()], "story_overview": 3}, "field 'story_overview' must be a string"),
        ({"prompts": "one prompt"}, "field 'prompts' must be a list"),
        ({"prompts": []}, "the story has no prompts"),
        ({"prompts": ["a", None]}, "shot 2: prompt must be a string, got null"),
        ({"prompts": ["a", "b"], "cuts": [True]}, "field 'cuts' has 1 entries but there are 2 prompts"),
        ({"prompts": ["a", "b"], "cuts": [False, True]}, "'cut' is false, but the first shot"),
        ({"name": "x"}, "missing field 'prompts'"),
        (42, "a story must be a JSON object or a list of prompts, got int"),
    ],
)
def test_schema_errors_name_file_scene_shot_and_field(tmp_path, data, message):
    path = write_json(tmp_path, data)
    with pytest.raises(StoryError) as info:
        load_story(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(StoryError, match="story file not found"):
        load_story(tmp_path / "missing.json")
    with pytest.raises(StoryError, match="not a file"):
        load_story(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "scenes": [\n    {"scene_num": 1,,}\n  ]\n}', encoding="utf-8")
    with pytest.raises(StoryError, match=r"bad.json: invalid JSON at line 3, column 21"):
        load_story(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(StoryError, match="not UTF-8"):
        load_story(binary)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n", encoding="utf-8")
    with pytest.raises(StoryError, match="the story has no prompts"):
        load_story(empty)


def test_story_error_is_value_error():
    assert issubclass(StoryError, ValueError)
    with pytest.raises(ValueError):
        Story.from_prompts([])


def _scene(**extra):
    return dict({"scene_num": 1, "video_prompts": ["A cat sleeps."], "cut": [True]}, **extra)


UNKNOWN_FIELDS = [
    # (script, the error's end)
    ({"scene": [_scene()]}, "unknown field 'scene'; did you mean 'scenes'?"),
    ({"secnes": [_scene()]}, "unknown field 'secnes'; did you mean 'scenes'?"),
    (st_bench_script(story_overveiw="x"), "unknown field 'story_overveiw'; did you mean 'story_overview'?"),
    (st_bench_script(storyname="x"), "unknown field 'storyname'; did you mean 'story_name'?"),
    ({"scenes": [{"scene_num": 1, "video_prompt": ["A cat."], "cut": [True]}]},
     "scenes[0]: unknown field 'video_prompt'; did you mean 'video_prompts'?"),
    ({"scenes": [_scene(cuts=[True])]}, "scenes[0]: unknown field 'cuts'; did you mean 'cut'?"),
    ({"scenes": [_scene(first_frame_prompts=["x"])]},
     "scenes[0]: unknown field 'first_frame_prompts'; did you mean 'first_frame_prompt'?"),
    ({"scenes": [_scene(duration=5)]}, "scenes[0]: unknown field 'duration'; known fields: scene_num, video_prompts"),
    ({"prompt": ["A cat."]}, "unknown field 'prompt'; did you mean 'prompts'?"),
    ({"prompts": ["A cat."], "cut": [True]}, "unknown field 'cut'; did you mean 'cuts'?"),
    ({"prompts": ["A cat."], "title": "x"}, "unknown field 'title'; known fields: prompts, cuts"),
    ({"prompts": ["A cat."], "scenes": []},
     "unknown field 'prompts'; 'prompts' belongs to the plain form, but this script is in the ST-Bench form"),
    ({"prompts": ["A cat."], "story_name": "x"},
     "unknown field 'story_name'; 'story_name' belongs to the ST-Bench form, but this script is in the plain form"),
]


@pytest.mark.parametrize("data, message", UNKNOWN_FIELDS, ids=[m[:40] for _, m in UNKNOWN_FIELDS])
def test_unknown_fields_are_refused_with_the_nearest_name(tmp_path, data, message):
    path = write_json(tmp_path, data)
    with pytest.raises(StoryError) as caught:
        load_story(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and "\n" not in text and message in text, text


def test_a_manifests_story_record_reads_back():
    story = Story.from_dict(st_bench_script())
    assert Story.from_dict(story.to_dict()).prompts == story.prompts  # 'path' is a known field
