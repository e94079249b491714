"""MemoryBank: sink + window order, references, dedup against the history, save/load."""

import json

import numpy as np
import pytest
import torch

from _memory_helpers import cut_video
from storymem.memory import KeyframeSelector, MemoryBank, MemoryBankError, NullScorer, PixelEmbedder
from storymem.memory.bank import MANIFEST_NAME


def tagged_frame(shot: int, k: int, size=(8, 12)) -> np.ndarray:
    """A frame whose first pixel records where it came from."""
    frame = np.zeros((*size, 3), np.uint8)
    frame[0, 0] = (shot, k, 7)
    return frame


def tags(frames):
    return [(int(f[0, 0, 0]), int(f[0, 0, 1])) for f in frames]


def fill_story(bank: MemoryBank, shots: int = 12, per_shot=(2, 1, 3)):
    added = []
    for shot in range(shots):
        count = per_shot[shot % len(per_shot)]
        frames = [tagged_frame(shot, k) for k in range(count)]
        bank.add(frames, shot=shot, frame_indices=[10 * k for k in range(count)])
        added += [(shot, k) for k in range(count)]
    return added


def test_window_and_sink_over_a_12_shot_story():
    bank = MemoryBank(max_memory=10, sink=3)
    added = []
    for shot in range(12):
        count = (2, 1, 3)[shot % 3]
        bank.add([tagged_frame(shot, k) for k in range(count)], shot=shot, frame_indices=list(range(count)))
        added += [(shot, k) for k in range(count)]
        window = tags(bank.frames())
        if len(added) <= 10:
            assert window == added
        else:
            assert window == added[:3] + added[-7:]  # first sink, then the most recent, in story order
        assert len(bank) == min(len(added), 10)
    assert tags(e.frame for e in bank.history()) == added
    entries = bank.entries()
    assert [(e.shot, e.frame_index) for e in entries[:3]] == [(0, 0), (0, 1), (1, 0)]
    assert entries[-1].shot == 11 and entries[-1].describe() == {"kind": "keyframe", "shot": 11, "frame_index": 2}


@pytest.mark.parametrize("sink", [0, 10])
def test_sink_extremes(sink):
    bank = MemoryBank(max_memory=10, sink=sink)
    added = fill_story(bank)
    assert tags(bank.frames()) == (added[-10:] if sink == 0 else added[:10])


def test_references_count_as_sink_and_stay():
    bank = MemoryBank(max_memory=6, sink=3)
    refs = [tagged_frame(200, k) for k in range(4)]
    bank.add_references(refs)
    added = fill_story(bank, shots=6)
    window = bank.entries()
    assert [e.is_reference for e in window] == [True] * 4 + [False] * 2  # 4 references pinned, sink grows to 4
    assert tags(e.frame for e in window[4:]) == added[-2:]
    assert window[0].shot is None and window[0].kind == "reference"
    with pytest.raises(MemoryBankError, match="before any shot"):
        bank.add_references([tagged_frame(201, 0)])
    with pytest.raises(MemoryBankError, match="do not fit"):
        MemoryBank(max_memory=2, sink=1).add_references(refs)


def test_dedup_against_the_whole_history():
    bank = MemoryBank(max_memory=2, sink=1)
    embedder = PixelEmbedder(8)
    selector = KeyframeSelector(embedder=embedder, scorer=NullScorer())
    story = [cut_video([4, 4], seed=20), cut_video([4], seed=21), cut_video([4], seed=22), cut_video([4, 4], seed=20)]
    kept = []
    for shot, frames in enumerate(story):
        picked = selector.extract(frames, memory=bank.history_embeddings())
        bank.add(frames[picked.indices], shot=shot, embeddings=picked.embeddings, frame_indices=picked.indices)
        kept.append(picked.indices)
    assert kept[:3] == [[0, 4], [0], [0]]
    # Shot 3 repeats shot 0; its keyframes are out of the window (max_memory=2) but still in the history.
    assert selector.last_stats.passes == 1 and kept[3] == []
    # Frames instead of embeddings give the same answer; entries without embeddings get embedded on demand.
    assert selector.select(story[3], memory=bank.history_frames()) == []
    fresh = MemoryBank()
    fresh.add(story[0][[0, 4]], shot=0)
    with pytest.raises(MemoryBankError, match="no embedding"):
        fresh.history_embeddings()
    torch.testing.assert_close(fresh.history_embeddings(embedder), embedder.embed(story[0][[0, 4]]))


def test_last_frames():
    bank = MemoryBank()
    assert bank.last_frame is None
    with pytest.raises(MemoryBankError, match="set_last_frames"):
        bank.last_frames()
    video = np.stack([tagged_frame(3, k) for k in range(9)])
    bank.set_last_frames(video, shot=3)
    assert tags([bank.last_frame]) == [(3, 8)]
    assert tags(bank.last_frames(5)) == [(3, k) for k in range(4, 9)]
    assert tags(bank.last_frames(1)) == [(3, 8)]
    assert bank.last_shot == 3
    with pytest.raises(MemoryBankError, match="only 5"):
        bank.last_frames(6)


def test_save_load_round_trip(tmp_path):
    bank = MemoryBank(max_memory=5, sink=2)
    bank.add_references([tagged_frame(100, 0, size=(16, 20))], embeddings=torch.randn(1, 4))
    for shot in range(4):
        bank.add([tagged_frame(shot, 0), tagged_frame(shot, 1)], shot=shot, embeddings=torch.randn(2, 4),
                 frame_indices=[3, 40])  # fmt: skip
    bank.set_last_frames(np.stack([tagged_frame(3, k) for k in range(7)]), shot=3)
    manifest = bank.save(tmp_path / "bank")
    assert manifest.name == MANIFEST_NAME
    loaded = MemoryBank.load(tmp_path / "bank")
    assert (loaded.max_memory, loaded.sink, loaded.last_shot) == (5, 2, 3)
    for a, b in zip(bank.history(), loaded.history()):
        assert np.array_equal(a.frame, b.frame) and a.describe() == b.describe()
        torch.testing.assert_close(a.embedding, b.embedding)
    assert tags(loaded.frames()) == tags(bank.frames())
    assert tags(loaded.last_frames()) == tags(bank.last_frames())
    # Saving again after changes replaces the state and leaves no stale or temporary files behind.
    loaded.add([tagged_frame(4, 0)], shot=4, embeddings=torch.randn(1, 4))
    loaded.set_last_frames(np.stack([tagged_frame(4, k) for k in range(2)]))
    loaded.save(tmp_path / "bank")
    again = MemoryBank.load(tmp_path / "bank")
    assert tags(again.frames()) == tags(loaded.frames())
    names = sorted(p.name for p in (tmp_path / "bank").iterdir())
    data = json.loads((tmp_path / "bank" / MANIFEST_NAME).read_text())
    referenced = {r["file"] for r in data["entries"] + data["last_frames"]} | {data["embeddings"]["file"]}
    assert set(names) == referenced | {MANIFEST_NAME}


def test_save_without_embeddings(tmp_path):
    bank = MemoryBank()
    bank.add([tagged_frame(0, 0)], shot=0)
    bank.save(tmp_path)
    loaded = MemoryBank.load(tmp_path)
    assert loaded.history()[0].embedding is None and loaded.last_frame is None


# ---------------------------------------------------------------------------------------------- bad states


@pytest.fixture
def saved(tmp_path):
    bank = MemoryBank()
    bank.add([tagged_frame(0, 0), tagged_frame(0, 1)], shot=0, embeddings=torch.randn(2, 4))
    bank.save(tmp_path)
    return tmp_path


def test_missing_manifest(tmp_path):
    with pytest.raises(MemoryBankError, match=MANIFEST_NAME):
        MemoryBank.load(tmp_path)


def test_corrupted_manifest(saved):
    path = saved / MANIFEST_NAME
    path.write_text(path.read_text()[:40])
    with pytest.raises(MemoryBankError, match=f"{MANIFEST_NAME}: corrupted"):
        MemoryBank.load(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format="other"), "not a storymem memory bank"),
        (lambda m: m.update(version=99), "unsupported memory bank version"),
        (lambda m: m.pop("entries"), "'entries' missing"),
        (lambda m: m["entries"][1].update(shot=-2), r"entries\[1\]: field 'shot'"),
        (lambda m: m["entries"][0].update(file="../x.png"), "must not contain a folder"),
        (lambda m: m.update(sink=50), "sink must be in"),
    ],
)
def test_bad_manifest_fields(saved, edit, message):
    path = saved / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(MemoryBankError, match=message):
        MemoryBank.load(saved)


def test_missing_or_damaged_png(saved):
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    png = saved / manifest["entries"][1]["file"]
    png.write_bytes(png.read_bytes()[:30])
    with pytest.raises(MemoryBankError, match=png.name):
        MemoryBank.load(saved)
    png.unlink()
    with pytest.raises(MemoryBankError, match=f"image file missing: .*{png.name}"):
        MemoryBank.load(saved)


def test_altered_png_is_caught(saved):
    from PIL import Image

    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    png = saved / manifest["entries"][0]["file"]
    Image.fromarray(tagged_frame(9, 9)).save(png)
    with pytest.raises(MemoryBankError, match="checksum mismatch"):
        MemoryBank.load(saved)


def test_damaged_embeddings(saved):
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    path = saved / manifest["embeddings"]["file"]
    path.write_bytes(b"\x00" + path.read_bytes()[1:])
    with pytest.raises(MemoryBankError, match="checksum mismatch"):
        MemoryBank.load(saved)


def test_bad_additions():
    bank = MemoryBank()
    with pytest.raises(MemoryBankError, match="max_memory"):
        MemoryBank(max_memory=0)
    with pytest.raises(MemoryBankError, match="sink"):
        MemoryBank(max_memory=4, sink=5)
    bank.add([tagged_frame(2, 0)], shot=2)
    with pytest.raises(MemoryBankError, match="story order"):
        bank.add([tagged_frame(1, 0)], shot=1)
    with pytest.raises(MemoryBankError, match="non-negative int"):
        bank.add([tagged_frame(3, 0)], shot=-1)
    with pytest.raises(MemoryBankError, match=r"tensor \[1, D\]"):
        bank.add([tagged_frame(3, 0)], shot=3, embeddings=torch.zeros(2, 4))
    with pytest.raises(MemoryBankError, match="frame_indices"):
        bank.add([tagged_frame(3, 0)], shot=3, frame_indices=[1, 2])
    with pytest.raises(ValueError, match=r"\[0, 1\] \(uint8 images: 0..255\)"):
        bank.add([np.full((4, 4, 3), 7.0, np.float32)], shot=3)  # a float image not in [0, 1]
