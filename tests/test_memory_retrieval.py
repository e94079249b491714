"""Text-aware retrieval of memory frames: take texts, TF-IDF relevance, selection, the bank, the renderer."""

import json

import numpy as np
import pytest

from storymem import render
from storymem.memory import (
    MemoryBank,
    MemoryBankError,
    RetrievalError,
    TextRelevance,
    select_relevant,
    story_take_texts,
    take_texts,
)
from storymem.memory.retrieval import text_terms
from storymem.render import main
from storymem.story import Story


def _frame(value):
    return np.full((8, 8, 3), value, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- texts


def test_take_texts_chain_continued_shots_back_to_their_cut():
    prompts = ["a red circle in the meadow", "the same character jumps", "it rolls on", "a blue square"]
    assert take_texts(prompts, [True, False, False, True]) == [
        prompts[0],
        f"{prompts[0]}\n{prompts[1]}",
        f"{prompts[0]}\n{prompts[1]}\n{prompts[2]}",
        prompts[3],
    ]
    # The first shot opens a take whatever its flag says; a prompt's own line breaks do not split it.
    assert take_texts(["x\ny", "z"], [False, False]) == ["x y", "x y\nz"]
    story = Story.from_prompts(prompts, cuts=[True, False, False, True])
    assert story_take_texts(story) == take_texts(prompts, [True, False, False, True])
    with pytest.raises(RetrievalError, match="2 prompts but 1 cut"):
        take_texts(["a", "b"], [True])


def test_text_terms_drop_function_words_and_camera_vocabulary():
    assert text_terms("A wide shot: The Red-Circle walks INTO the meadow near 2 trees") == [
        "red", "circle", "walks", "meadow", "2", "trees"]
    assert text_terms("Émile rêve") == ["émile", "rêve"]  # letters of any script count
    assert text_terms("") == []


def test_relevance_weighs_rare_words_above_common_ones():
    corpus = ["red circle meadow", "red square city", "red star beach", "blue circle city"]
    relevance = TextRelevance(corpus)
    # "red" is in three takes, "meadow" in one: sharing the rare word is worth more.
    scores = relevance("red meadow", ["red square city", "green meadow pond"])
    assert scores[1] > scores[0] > 0
    same = relevance("red circle meadow", ["red circle meadow", "tall tower", None, ""])
    assert same[0] == pytest.approx(1.0)
    assert same[1:].tolist() == [0.0, 0.0, 0.0]
    # A word no take has weighs like a word of one take.
    assert relevance.idf("meadow") == relevance.idf("unseen") > relevance.idf("red") > 0
    # Function words alone relate nothing.
    assert relevance("the and of", ["the and of"]).tolist() == [0.0]


# ---------------------------------------------------------------------------------------------- selection


def test_select_relevant_ranks_fills_the_budget_and_keeps_story_order():
    # Two references (None) always stay, first in the budget.
    scores = [None, 0.1, 0.9, None, 0.5, 0.9, 0.0]
    assert select_relevant(scores, max_memory=10) == [0, 1, 2, 3, 4, 5, 6]
    assert select_relevant(scores, max_memory=4) == [0, 2, 3, 5]
    # Ties go to the later entry; the result is in story order.
    assert select_relevant(scores, max_memory=3) == [0, 3, 5]
    assert select_relevant([None, None, 0.4], max_memory=1) == [0]


def test_select_relevant_thresholds_leave_unlike_takes_out():
    scores = [0.05, 0.2, 0.6, 0.5, 0.45]
    assert select_relevant(scores, 10, min_relevance=0.3) == [2, 3, 4]
    assert select_relevant(scores, 10, relative_relevance=0.8) == [2, 3]  # >= 0.48
    assert select_relevant(scores, 10, min_relevance=0.3, relative_relevance=0.8) == [2, 3]
    # Nothing like the prompt: no memory at all (a character's first shot).
    assert select_relevant([0.1, 0.05], 10, min_relevance=0.3, relative_relevance=0.8) == []
    assert select_relevant([None, 0.1], 10, min_relevance=0.3) == [0]
    with pytest.raises(RetrievalError, match="max_memory"):
        select_relevant([0.1], 0)
    with pytest.raises(RetrievalError, match="finite"):
        select_relevant([float("nan")], 3)


# ---------------------------------------------------------------------------------------------- bank


TWO_CHARACTERS = ["a red circle in the meadow", "the same character rolls on", "a blue square in the city",
                  "the red circle returns to the beach"]
TWO_CUTS = [True, False, True, True]


def _two_character_bank(max_memory=10, sink=3):
    texts = take_texts(TWO_CHARACTERS, TWO_CUTS)
    bank = MemoryBank(max_memory=max_memory, sink=sink)
    for shot in range(3):
        bank.add([_frame(10 * shot + 1), _frame(10 * shot + 2)], shot=shot, frame_indices=[0, 4], text=texts[shot])
    return bank, texts


def test_bank_retrieves_the_character_the_prompt_names():
    bank, texts = _two_character_bank()
    relevance = TextRelevance(texts)
    # The window shows everything (6 frames fit); retrieval by prompt leaves the blue square out.
    assert [e.shot for e in bank.entries()] == [0, 0, 1, 1, 2, 2]
    kept = bank.retrieve(texts[3], relevance, min_relevance=0.3, relative_relevance=0.8)
    assert [e.shot for e in kept] == [0, 0, 1, 1]
    scores = bank.relevance(texts[3], relevance)
    assert scores[0] == scores[1] > 0.3 > scores[4]
    # The blue square's own later shot retrieves its own frames only.
    kept = bank.retrieve("the blue square in the city at night", relevance, 0.3, 0.8)
    assert [e.shot for e in kept] == [2, 2]
    # Without thresholds the budget decides: the 3 most relevant frames (ties: the later one).
    small = MemoryBank(max_memory=3, sink=0)
    for entry in bank.history():
        small.add([entry.frame], shot=entry.shot, frame_indices=[entry.frame_index], text=entry.text)
    assert [(e.shot, e.frame_index) for e in small.retrieve(texts[3], relevance)] == [(0, 4), (1, 0), (1, 4)]


def test_bank_references_stay_and_texts_survive_save_and_load(tmp_path):
    bank = MemoryBank(max_memory=4, sink=1)
    bank.add_references([_frame(200)])
    texts = take_texts(TWO_CHARACTERS, TWO_CUTS)
    for shot in range(3):
        bank.add([_frame(shot)], shot=shot, text=texts[shot])
    relevance = TextRelevance(texts)
    kept = bank.retrieve(texts[3], relevance, 0.3, 0.8)
    assert [e.kind for e in kept] == ["reference", "keyframe", "keyframe"]
    bank.save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / "memory_bank.json").read_text())
    assert [r.get("text") for r in manifest["entries"]] == [None, *texts[:3]]
    loaded = MemoryBank.load(tmp_path / "bank")
    assert [e.text for e in loaded.history()] == [None, *texts[:3]]
    assert [e.shot for e in loaded.retrieve(texts[3], relevance, 0.3, 0.8)] == [None, 0, 1]
    manifest["entries"][1]["text"] = 7
    (tmp_path / "bank" / "memory_bank.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryBankError, match=r"entries\[1\]: field 'text'"):
        MemoryBank.load(tmp_path / "bank")


def test_bank_without_texts_says_which_shots_lack_them():
    bank = MemoryBank()
    bank.add([_frame(1)], shot=0)
    bank.add([_frame(2)], shot=1, text="a blue square")
    relevance = TextRelevance(["a red circle", "a blue square"])
    with pytest.raises(MemoryBankError, match=r"shot\(s\) \[0\] have no text"):
        bank.retrieve("a red circle", relevance)
    bank.fill_texts(lambda shot: ["a red circle", "a blue square"][shot])
    assert [e.shot for e in bank.retrieve("a red circle", relevance, 0.3)] == [0]
    with pytest.raises(MemoryBankError, match="text must be a string"):
        bank.add([_frame(3)], shot=2, text=["a", "list"])


# ---------------------------------------------------------------------------------------------- renderer


FAST = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "1", "--no-progress",
        "--device", "cpu", "--memory-source", "first-frame"]
STORY = {"story_name": "two characters", "scenes": [
    {"scene_num": 1, "video_prompts": ["a red circle in a green meadow", "the same character rolls on"],
     "cut": [True, False]},
    {"scene_num": 2, "video_prompts": ["a blue square in a gray city"], "cut": [True]},
    {"scene_num": 3, "video_prompts": ["the red circle returns to the green meadow"], "cut": [True]},
    {"scene_num": 4, "video_prompts": ["a yellow star on a beach"], "cut": [True]},
]}


def _story(tmp_path):
    path = tmp_path / "story.json"
    path.write_text(json.dumps(STORY))
    return path


def test_render_retrieves_memory_by_prompt(tmp_path, spy):
    story = _story(tmp_path)
    out = tmp_path / "prompt"
    flags = ["--memory-retrieval", "prompt", "--memory-min-relevance", "0.3", "--memory-relative-relevance", "0.5"]
    assert main(["--story", str(story), "--out", str(out), *FAST, *flags]) == 0
    firsts = [c["frames"][0] for c in spy]
    seen = []
    for call in spy:
        memory = call["kwargs"].get("memory_images") or []
        seen.append([next(i for i, f in enumerate(firsts) if np.array_equal(f, image)) for image in memory])
    # Shot 2 continues shot 1; the blue square's shot 3 has nothing like it in memory; the red circle's return
    # sees its own two shots and not the square's; the yellow star, new to the story, sees nothing.
    assert seen == [[], [0], [], [0, 1], []]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["memory_retrieval"] == {"mode": "prompt", "min_relevance": 0.3,
                                                        "relative_relevance": 0.5}
    returns = manifest["shots"][3]["memory"]
    assert [m["shot"] for m in returns] == [0, 1] and all(m["relevance"] >= 0.3 for m in returns)
    saved = json.loads((out / "memory" / "after_03_01" / "memory_bank.json").read_text())
    assert [r["text"] for r in saved["entries"]] == story_take_texts(Story.from_dict(STORY))[:4]

    # The window (default) shows every earlier shot and records no relevance or retrieval setting.
    spy.clear()
    window = tmp_path / "window"
    assert main(["--story", str(story), "--out", str(window), *FAST]) == 0
    assert [len(c["kwargs"].get("memory_images") or []) for c in spy] == [0, 1, 2, 3, 4]
    manifest = json.loads((window / "manifest.json").read_text())
    assert manifest["settings"]["memory_retrieval"]["mode"] == "window"
    assert all("relevance" not in m for s in manifest["shots"] for m in s["memory"])

    # A finished window render cannot be resumed with retrieval by prompt.
    assert main(["--story", str(story), "--out", str(window), *FAST, *flags]) == 2


def test_resumed_render_fills_texts_of_an_older_bank(tmp_path, spy):
    story = _story(tmp_path)
    out = tmp_path / "out"
    flags = ["--memory-retrieval", "prompt", "--memory-min-relevance", "0.3", "--memory-relative-relevance", "0.5"]
    assert main(["--story", str(story), "--out", str(out), *FAST, *flags]) == 0
    # As if the bank had been saved before texts were kept: drop them, then re-render the last two shots.
    folder = out / "memory" / "after_02_01"
    saved = json.loads((folder / "memory_bank.json").read_text())
    for record in saved["entries"]:
        record.pop("text")
    (folder / "memory_bank.json").write_text(json.dumps(saved))
    spy.clear()
    assert main(["--story", str(story), "--out", str(out), *FAST, *flags, "--from-shot", "4"]) == 0
    assert [len(c["kwargs"].get("memory_images") or []) for c in spy] == [2, 0]


@pytest.mark.parametrize("flags, expected", [
    (["--memory-retrieval", "prompt", "--memory-min-relevance", "1.5"], "--memory-min-relevance 1.5"),
    (["--memory-relative-relevance", "0.5"], "only applies with --memory-retrieval prompt"),
    (["--memory-retrieval", "prompt", "--memory-source", "none"], "without memory"),
])
def test_bad_retrieval_flags_fail_before_any_model_loads(flags, expected, tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(render.models, "load_pipeline", must_not_load)
    out = tmp_path / "out"
    assert main(["--story", str(_story(tmp_path)), "--out", str(out), *FAST[:-2], *flags]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()
