"""train_lora.py end to end on the tiny components: prepare, condition parity with inference, training,
checkpoints, resume, bad data."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from storymem import StoryMemPipeline
from storymem.lora import StoryMemLoraConfig
from storymem.training import PreparedDataset, TrainConfig, train
from storymem.training.data import MemoryClipDataset, SampleSpec, collate_samples
from storymem.training.errors import DataError
from storymem.training.loss import build_training_condition, flow_matching_loss
from storymem.training.models import load_expert
from storymem.training.sources import resize_and_crop
from storymem.video import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_lora", ROOT / "train_lora.py")
train_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_lora)

SIZE, FRAMES = 32, 9
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}


def _clip(colour, k, n=14, h=40, w=48):
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[:] = np.array(colour) // 4
    for t in range(n):
        x = 2 + 2 * t + k
        frames[t, 12:28, x:x + 12] = colour
    return frames


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for name, colour in COLOURS.items():
        for k in range(3):
            write_video(root / f"{name}{k}.mp4", _clip(colour, k), fps=16)
            (root / f"{name}{k}.txt").write_text(f"a {name} square moves right")
    write_video(root / "short.mp4", _clip((200, 200, 0), 0, n=5), fps=16)  # 5 frames < 9
    (root / "short.txt").write_text("a yellow square")
    write_video(root / "nocaption.mp4", _clip((0, 200, 0), 0), fps=16)
    (root / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    (root / "broken.txt").write_text("a broken clip")
    return root


@pytest.fixture(scope="module")
def prepared(clips_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    code = train_lora.main(["prepare", "--clips", str(clips_dir), "--out", str(out), "--base", "tiny",
                            "--height", str(SIZE), "--width", str(SIZE), "--num-frames", str(FRAMES),
                            "--embedder", "pixel", "--cluster-size", "3", "--memory-candidates", "3",
                            "--contexts", "mi2v,mm2v", "--cache-dtype", "float32", "--shard-size", "3",
                            "--no-progress", "--overwrite"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def lora_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "adapter.json"
    StoryMemLoraConfig(rank=8, alpha=8.0, dropout=0.0, conditioning="mi2v").save(path)
    return path


def _train_config(prepared, lora_config_file, out, **kw):
    args = dict(lora_config=str(lora_config_file), data_dir=str(prepared), output_dir=str(out), base="tiny",
                report_to="none", learning_rate=1e-3, checkpointing_steps=1000, max_train_steps=3)
    args.update(kw)
    return TrainConfig(**args)


# ---------------------------------------------------------------------------------------------- command line
def test_help_is_grouped_with_each_default_once(capsys):
    from storymem.training.cli import main_prepare, main_train

    assert main_prepare(["--help"]) == 0
    text = capsys.readouterr().out
    for group in ("clips:", "prepared dataset:", "clusters:", "run:"):
        assert group in text
    flat = " ".join(text.split())  # as read, not as wrapped
    assert flat.count("(default: 480; 64 with a built-in --base)") == 1 and "(default: None)" not in text
    assert flat.count("(default: 81; 17 with a built-in --base)") == 1
    assert "(default: Wan-AI/Wan2.2-I2V-A14B-Diffusers)" in text and "--no-progress" in text
    assert main_train(["--help"]) == 0
    text = capsys.readouterr().out
    for group in ("run:", "optimisation:", "recipe:", "checkpoints and logs:", "data checks:"):
        assert group in text
    assert text.count("(default: 2000)") == 1 and "(default: None)" not in text
    assert "--no-gradient-checkpointing" in text and "--resume CHECKPOINT" in text
    assert train_lora.main(["--help"]) == 0 and "{prepare,train}" in capsys.readouterr().out


def test_flags_map_onto_the_configs_and_the_default_base_is_wan():
    from storymem.arguments import from_args
    from storymem.defaults import WAN_I2V_BASE
    from storymem.training import PrepareConfig
    from storymem.training.cli import build_prepare_parser, build_train_parser

    args = build_train_parser().parse_args(["--config", "c.json", "--data", "d", "--output", "o"])
    assert from_args(TrainConfig, args) == TrainConfig(lora_config="c.json", data_dir="d", output_dir="o")
    assert TrainConfig(lora_config="c", data_dir="d", output_dir="o").base == WAN_I2V_BASE
    args = build_train_parser().parse_args(["--config", "c.json", "--data", "d", "--output", "o", "--resume",
                                            "latest", "--no-gradient-checkpointing", "--mi2v-prob", "0.25"])
    config = from_args(TrainConfig, args)
    assert config.resume_from_checkpoint == "latest" and not config.gradient_checkpointing
    assert config.mi2v_prob == 0.25 and config.max_train_minutes is None

    def prepare_config(*argv):
        return from_args(PrepareConfig, build_prepare_parser().parse_args(["--out", "x", *argv]))

    config = prepare_config()
    assert config == PrepareConfig(output_dir=Path("x")) and config.base == WAN_I2V_BASE
    assert config.contexts == ("mi2v",) and config.output_dir == Path("x") and config.clips_dir is None
    assert prepare_config("--contexts", "mi2v,mm2v").contexts == ("mi2v", "mm2v")
    assert prepare_config("--contexts", "mi2v", "mm2v").contexts == ("mi2v", "mm2v")
    assert prepare_config("--contexts", "none").contexts == ()
    assert prepare_config("--clips", "c", "--no-progress").clips_dir == Path("c")


def test_bad_input_is_one_line_naming_the_flag_or_file(clips_dir, lora_config_file, tmp_path, capsys):
    from storymem.training.cli import main_prepare, main_train

    def error(code):
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    base = ["--out", str(tmp_path / "o"), "--base", "tiny", "--no-progress"]
    assert "error: --cluster-size: must be >= 2" in error(main_prepare([*base, "--clips", str(clips_dir),
                                                                        "--cluster-size", "1"]))
    assert "error: --clips: give a clips folder" in error(main_prepare(base))
    assert "error: --contexts: unknown ['mx2v']" in error(main_prepare([*base, "--clips", str(clips_dir),
                                                                        "--contexts", "mx2v"]))
    assert "error: --num-frames: must be of the form 4n+1" in error(
        main_prepare([*base, "--clips", str(clips_dir), "--num-frames", "8"]))
    run = ["--data", str(tmp_path / "d"), "--output", str(tmp_path / "r"), "--base", "tiny", "--report-to", "none"]
    assert "nope.json: adapter config not found" in error(main_train(["--config", str(tmp_path / "nope.json"), *run]))
    assert "error: --caption-dropout: must be in [0, 1], got 2.0" in error(
        main_train(["--config", str(lora_config_file), *run, "--caption-dropout", "2"]))
    assert "no index.json" in error(main_train(["--config", str(lora_config_file), *run]))
    # Flags the parser refuses: its usage and message, exit code 2.
    assert main_train(["--config", str(lora_config_file)]) == 2
    assert "the following arguments are required: --data, --output" in capsys.readouterr().err
    assert train_lora.main([]) == 2 and "usage:" in capsys.readouterr().err
    assert train_lora.main(["render"]) == 2 and "unknown command 'render'" in capsys.readouterr().err


def test_the_default_base_that_cannot_be_loaded_is_named(clips_dir, tmp_path, capsys):
    # Offline (as in every test) the hub's Wan2.2-I2V cannot be fetched: the error names it and how to get it,
    # before the scan.
    from storymem.training.cli import main_prepare

    code = main_prepare(["--clips", str(clips_dir), "--out", str(tmp_path / "o"), "--height", str(SIZE),
                         "--width", str(SIZE), "--num-frames", str(FRAMES), "--embedder", "pixel",
                         "--cluster-size", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: Wan-AI/Wan2.2-I2V-A14B-Diffusers: the base model is not in the local Hugging "
                          "Face cache")
    assert "hf download Wan-AI/Wan2.2-I2V-A14B-Diffusers" in err and "--base" in err


def test_ctrl_c_is_exit_code_130(monkeypatch, clips_dir, tmp_path, capsys):
    import storymem.training.prepare as prepare
    from storymem.training.cli import main_prepare

    def interrupted(config, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "prepare_dataset", interrupted)
    assert main_prepare(["--clips", str(clips_dir), "--out", str(tmp_path / "o"), "--base", "tiny"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_time_range_of_a_clip_is_read_by_seeking(tmp_path):
    from storymem.training.sources import read_clip

    frames = np.zeros((16, 32, 32, 3), np.uint8)
    for t in range(16):
        frames[t] = 10 + 15 * t  # brightness says which frame it is
    path = write_video(tmp_path / "ramp.mp4", frames, fps=16, crf=0)
    part, fps = read_clip(path, 0.25, 0.75)
    assert fps == 16 and len(part) == 8
    assert np.abs(part.reshape(8, -1).mean(1) - (10 + 15 * np.arange(4, 12))).max() < 4
    assert len(read_clip(path)[0]) == 16


# ---------------------------------------------------------------------------------------------- prepare
def test_prepare_summary_clusters_and_skips(prepared, clips_dir):
    index = json.loads((prepared / "index.json").read_text())
    captions = [c["caption"] for c in index["clips"]]
    assert len(captions) == 6
    # Clusters by pixel similarity: the red clips together, the blue ones together.
    groups = [{captions[i].split()[1] for i in members} for members in index["clusters"]]
    assert sorted(len(m) for m in index["clusters"]) == [3, 3] and all(len(g) == 1 for g in groups)
    reasons = {(s["source"].rsplit("/", 1)[-1], s["reason"]) for s in index["skipped"]}
    assert reasons == {("short.mp4", "too short"), ("nocaption.mp4", "missing caption"),
                       ("broken.mp4", "unreadable")}
    assert index["latent_shape"] == [16, 3, 4, 4] and index["contexts"] == ["mi2v", "mm2v"]
    assert len(index["shards"]) == 2 and (prepared / index["shards"][1]["file"]).is_file()
    data = PreparedDataset(prepared, verify_checksums=True)
    assert len(data) == 6 and data.memory_count == 3
    assert data.tensor(0, "memory").shape == (16, 3, 4, 4)
    assert data.pad_text(data.tensor(0, "text")).shape == (512, 32)


def test_prepare_refuses_to_overwrite_and_needs_clusters(prepared, clips_dir, tmp_path, capsys):
    assert train_lora.main(["prepare", "--clips", str(clips_dir), "--out", str(prepared), "--base", "tiny"]) == 2
    assert "already holds a prepared dataset" in capsys.readouterr().err
    # A manifest whose groups leave one clip alone: it is skipped as a cluster of one; two groups of one
    # leave nothing to train on.
    manifest = tmp_path / "m.jsonl"
    rows = [{"file": str(clips_dir / "red0.mp4"), "caption": "a", "group": "x"},
            {"file": str(clips_dir / "blue0.mp4"), "caption": "b", "group": "y"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = train_lora.main(["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--base", "tiny",
                            "--height", "32", "--width", "32", "--num-frames", "9", "--embedder", "pixel",
                            "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing to train on" in err and "skipped 2 cluster of one (e.g. " in err


def test_prepare_is_the_same_with_one_decoding_thread_and_batched_encoding(prepared, clips_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "serial"
    code = train_lora.main(["prepare", "--clips", str(clips_dir), "--out", str(out), "--base", "tiny",
                            "--height", str(SIZE), "--width", str(SIZE), "--num-frames", str(FRAMES),
                            "--embedder", "pixel", "--cluster-size", "3", "--memory-candidates", "3",
                            "--contexts", "mi2v,mm2v", "--cache-dtype", "float32", "--shard-size", "3",
                            "--no-progress", "--decode-workers", "1", "--encode-batch-size", "4"])
    assert code == 0
    threaded, serial = (json.loads((p / "index.json").read_text()) for p in (prepared, out))
    assert threaded["prepare_config"]["decode_workers"] == 4 and serial["prepare_config"]["decode_workers"] == 1
    assert serial["prepare_config"]["encode_batch_size"] == 4
    for key in ("clips", "clusters", "skipped"):
        assert threaded[key] == serial[key]
    assert len(threaded["shards"]) == len(serial["shards"])
    for a, b in zip(threaded["shards"], serial["shards"]):
        ta, tb = load_file(prepared / a["file"]), load_file(out / b["file"])
        assert ta.keys() == tb.keys()
        for k in ta:  # one clip per encoder call vs four: the same tensors up to float rounding
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-5)


def test_manifest_groups_time_ranges_and_cluster_of_one(clips_dir, tmp_path):
    from storymem.training import PrepareConfig, prepare_dataset

    manifest = tmp_path / "m.jsonl"
    rows = [{"file": str(clips_dir / "red0.mp4"), "caption": "a red square", "group": "g"},
            {"file": str(clips_dir / "red1.mp4"), "caption": "a red square", "group": "g", "start": 0.1},
            {"file": str(clips_dir / "blue0.mp4"), "caption": "a blue square", "group": "lonely"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = prepare_dataset(PrepareConfig(output_dir=tmp_path / "o", manifest=manifest, base="tiny", height=32,
                                            width=32, num_frames=9, embedder="pixel", contexts=()), progress=False)
    assert summary.num_clips == 2 and summary.num_clusters == 1
    assert summary.skipped_counts() == {"cluster of one": 1}
    assert "1 cluster of one" in summary.format()
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert index["clips"][1]["start"] == 0.1 and index["contexts"] == []


def test_folder_mode_pairs_mask_sidecars(tmp_path):
    from storymem.training import PrepareConfig, prepare_dataset
    from storymem.training.sources import discover_sources

    clips = tmp_path / "clips"
    for k in range(3):
        write_video(clips / f"red.{k}.mp4", _clip(COLOURS["red"], k), fps=16)
        (clips / f"red.{k}.txt").write_text("a red square")
        write_video(clips / f"red.{k}.mask.mp4", _square_mask(k), fps=16)
    sources = discover_sources(clips)
    # Mask videos are not clips; each pairs with the clip of its name (dots in the name too).
    assert [s.path.name for s in sources] == ["red.0.mp4", "red.1.mp4", "red.2.mp4"]
    assert [s.mask.name for s in sources] == ["red.0.mask.mp4", "red.1.mask.mp4", "red.2.mask.mp4"]
    summary = prepare_dataset(PrepareConfig(output_dir=tmp_path / "o", clips_dir=clips, base="tiny", height=SIZE,
                                            width=SIZE, num_frames=FRAMES, embedder="pixel", cluster_size=3,
                                            contexts=(), cache_dtype="float32"), progress=False)
    assert summary.num_clips == 3 and not summary.skipped
    data = PreparedDataset(tmp_path / "o")
    assert data.has_subject_masks and all(0 < data.tensor(i, "subject").mean() < 1 for i in range(3))

    (clips / "red.2.mask.mp4").unlink()
    with pytest.raises(DataError, match=r"2 of 3 clips have a mask video.*red\.2\.mp4"):
        discover_sources(clips)


def test_scan_embeds_clips_in_batches_with_the_same_result(clips_dir, tmp_path, monkeypatch):
    import storymem.training.prepare as prepare
    from storymem.memory import PixelEmbedder
    from storymem.training import PrepareConfig, prepare_dataset

    results, forwards = [], []
    for batch in (1, 4):
        monkeypatch.setattr(prepare, "EMBED_BATCH_CLIPS", batch)
        embedder = PixelEmbedder()
        summary = prepare_dataset(PrepareConfig(output_dir=tmp_path / f"o{batch}", clips_dir=clips_dir, base="tiny",
                                                height=SIZE, width=SIZE, num_frames=FRAMES, embedder="pixel",
                                                cluster_size=3, contexts=(), cache_dtype="float32"),
                                  embedder=embedder, progress=False)
        index = json.loads((tmp_path / f"o{batch}" / "index.json").read_text())
        results.append((index["clusters"], [c["source"] for c in index["clips"]],
                        [s["sha256"] for s in index["shards"]]))
        forwards.append(embedder.num_forwards)
        assert 0 < summary.scan_seconds < summary.seconds and 0 < summary.encode_seconds < summary.seconds
        assert "(scan " in summary.format()
    assert results[0] == results[1]
    assert sorted(len(members) for members in results[0][0]) == [3, 3]  # the red clips and the blue ones
    assert forwards == [6, 2]  # six usable clips: one call each, or batches of four


def _square_mask(k, n=14, h=40, w=48):
    """Where :func:`_clip` draws its square: white on black."""
    mask = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        x = 2 + 2 * t + k
        mask[t, 12:28, x:x + 12] = 255
    return mask


def test_prepare_with_subject_masks_and_bad_masks(clips_dir, tmp_path):
    from storymem.training import PrepareConfig, prepare_dataset
    from storymem.training.sources import mask_latent_cells

    masks = tmp_path / "masks"
    for k in range(3):
        write_video(masks / f"red{k}.mp4", _square_mask(k), fps=16)
    write_video(masks / "short.mp4", _square_mask(0, n=9), fps=16)
    write_video(masks / "small.mp4", _square_mask(0)[:, :32, :32], fps=16)
    manifest = tmp_path / "m.jsonl"
    rows = [{"file": str(clips_dir / f"red{k}.mp4"), "caption": "a red square", "group": "g",
             "mask": str(masks / f"red{k}.mp4")} for k in range(3)]
    rows += [{"file": str(clips_dir / "blue0.mp4"), "caption": "a blue square", "group": "g", "mask": "short.mp4"},
             {"file": str(clips_dir / "blue1.mp4"), "caption": "a blue square", "group": "g", "mask": "none.mp4"},
             {"file": str(clips_dir / "blue2.mp4"), "caption": "a blue square", "group": "g", "mask": "small.mp4"}]
    (masks / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = PrepareConfig(output_dir=tmp_path / "o", manifest=masks / "m.jsonl", base="tiny", height=SIZE,
                           width=SIZE, num_frames=FRAMES, embedder="pixel", contexts=(), cache_dtype="float32")
    summary = prepare_dataset(config, progress=False)
    # A mask of another length or size, or none on disk: the clip is skipped, named, before any encoding.
    assert summary.num_clips == 3 and summary.skipped_counts() == {"bad mask": 3}
    details = " ".join(s.detail for s in summary.skipped)
    assert "short.mp4: 9 frames, the video has 14" in details and "none.mp4: mask video not found" in details
    assert "small.mp4: 32x32 pixels, the video is 48x40" in details

    data = PreparedDataset(tmp_path / "o")
    assert data.has_subject_masks
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    _, f, h, w = data.latent_shape
    for i, clip in enumerate(index["clips"]):
        k = int(Path(clip["source"]).stem[-1])
        expected = resize_and_crop(_square_mask(k)[clip["frames"]], SIZE, SIZE)[..., 0] > 127
        cells = data.tensor(i, "subject")
        assert cells.shape == (f, h, w)
        assert torch.equal(cells, mask_latent_cells(torch.from_numpy(expected), 4, SIZE // h))
        # The square spans rows 12-28 of 40, so after the 0.8 resize the middle two of four cell rows.
        assert cells[:, 1:3].amax() == 1 and cells[:, 0].amax() == 0 and cells[:, 3].amax() == 0
    batch = collate_samples([MemoryClipDataset(data)[SampleSpec(clip=0, memory=((1, 0),))]])
    assert batch["subject_mask"].shape == (1, f, h, w)

    # A mask on some entries only is refused, naming the manifest.
    (masks / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + [
        {"file": str(clips_dir / "red2.mp4"), "caption": "a red square", "group": "g"}]))
    with pytest.raises(DataError, match="half.jsonl: 'mask' must be given on every entry or on none"):
        prepare_dataset(dataclasses.replace(config, manifest=masks / "half.jsonl", output_dir=tmp_path / "p"),
                        progress=False)


def test_subject_loss_weight_is_a_weighted_mean_over_the_masked_cells(tiny_components):
    transformer = tiny_components["transformer"]
    z = transformer.config.out_channels
    g = torch.Generator().manual_seed(1)
    subject = torch.zeros(2, 3, 4, 4)
    subject[0, :, 1:3, 1:3] = 1
    subject[1, 2, 0, 0] = 1
    batch = {"latents": torch.randn(2, z, 3, 4, 4, generator=g),
             "memory_latents": torch.randn(2, z, 2, 4, 4, generator=g),
             "video_condition": torch.randn(2, z, 3, 4, 4, generator=g), "num_frames": 9, "num_context_frames": 0,
             "prompt_embeds": torch.randn(2, 8, transformer.config.text_dim, generator=g), "subject_mask": subject}

    def loss(**kw):
        with torch.no_grad():
            return flow_matching_loss(transformer, batch, generator=torch.Generator().manual_seed(0),
                                      return_errors=True, **kw)

    plain, info = loss()
    weighted, _ = loss(subject_loss_weight=6.0)
    weights = (1 + 5 * subject).unsqueeze(1).expand_as(info["errors"])
    assert torch.allclose(weighted, (info["errors"] * weights).sum() / weights.sum(), rtol=1e-5)
    assert torch.allclose(loss(subject_loss_weight=1.0)[0], plain)
    # The subject's errors are larger here than the rest's, so weighting them raises the loss.
    inside = info["errors"][subject.unsqueeze(1).expand_as(info["errors"]) > 0].mean()
    assert (weighted > plain) == bool(inside > info["errors"].mean())
    # With memory frames in the loss they weigh 1.
    on_memory, _ = loss(subject_loss_weight=6.0, loss_on_memory=True)
    assert torch.isfinite(on_memory) and not torch.allclose(on_memory, weighted)
    with pytest.raises(ValueError, match="subject_mask"):
        flow_matching_loss(transformer, {k: v for k, v in batch.items() if k != "subject_mask"},
                           subject_loss_weight=2.0)


def test_preserve_base_weight_holds_memory_free_batches_to_the_base(tiny_components):
    from peft import LoraConfig

    from storymem.training.trainer import _base_only

    transformer = tiny_components["transformer"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="t")
    z = transformer.config.out_channels
    g = torch.Generator().manual_seed(2)
    batch = {"latents": torch.randn(1, z, 3, 4, 4, generator=g),
             "memory_latents": torch.zeros(1, z, 0, 4, 4), "video_condition": torch.randn(1, z, 3, 4, 4, generator=g),
             "num_frames": 9, "num_context_frames": 0,
             "prompt_embeds": torch.randn(1, 8, transformer.config.text_dim, generator=g)}

    def loss(batch, **kw):
        with torch.no_grad():
            return flow_matching_loss(transformer, batch, generator=torch.Generator().manual_seed(0),
                                      base_only=lambda: _base_only(transformer), return_errors=True, **kw)

    plain, plain_info = loss(batch)
    held, info = loss(batch, preserve_base_weight=2.0)
    assert torch.allclose(held, plain + 2.0 * info["preserve_loss"], rtol=1e-5)
    # The distance is to the base's own prediction, the same model with its adapter off: the two predictions'
    # difference is what separates their errors against the same target.
    with _base_only(transformer):
        _, base_info = loss(batch)
        _, off_info = loss(batch, preserve_base_weight=2.0)
    assert float(info["preserve_loss"]) > 1e-6
    assert not torch.allclose(plain_info["errors"], base_info["errors"])
    assert float(off_info["preserve_loss"]) == 0.0  # adapter off: nothing to hold back
    # Batches with memory frames are left to the data's loss.
    with_memory = dict(batch, memory_latents=torch.randn(1, z, 2, 4, 4, generator=g))
    a, _ = loss(with_memory)
    b, b_info = loss(with_memory, preserve_base_weight=2.0)
    assert torch.equal(a, b) and "preserve_loss" not in b_info
    with pytest.raises(ValueError, match="base_only"):
        flow_matching_loss(transformer, batch, preserve_base_weight=1.0)


# ---------------------------------------------------------------------------------------------- parity
def test_training_condition_equals_the_pipelines(prepared, tiny_pipe):
    """The cached memory / first-frame latents, assembled by the trainer, give the tensors StoryMemPipeline
    builds at inference from the same images."""
    data = PreparedDataset(prepared)
    target, refs = 0, [(4, 2), (3, 0)]
    spec = SampleSpec(clip=target, memory=tuple(refs), context="mi2v")
    batch = collate_samples([MemoryClipDataset(data)[spec]])
    condition = build_training_condition(batch)

    def frames_of(clip):
        entry = data.clips[clip]
        video, _ = read_video(entry["source"])
        return resize_and_crop(video[entry["frames"]], SIZE, SIZE)

    positions = data.index["memory_positions"]
    memory_images = [frames_of(c)[positions[j]] for c, j in refs]
    expected = tiny_pipe.prepare_memory_condition(memory_images, None, frames_of(target)[0], None, 1, SIZE, SIZE,
                                                  FRAMES, torch.device("cpu"))
    assert condition.num_memory_frames == expected.num_memory_frames == 2
    assert condition.num_context_frames == expected.num_context_frames == 1
    assert torch.equal(condition.mask, expected.mask)
    torch.testing.assert_close(condition.latents, expected.latents, rtol=1e-5, atol=1e-5)

    # M2V samples use the shared all-zeros condition: the pipeline's M2V condition.
    m2v = build_training_condition(collate_samples([MemoryClipDataset(data)[SampleSpec(0, tuple(refs))]]))
    expected = tiny_pipe.prepare_memory_condition(memory_images, None, None, None, 1, SIZE, SIZE, FRAMES,
                                                  torch.device("cpu"))
    torch.testing.assert_close(m2v.tensor, expected.tensor, rtol=1e-5, atol=1e-5)


def test_dataset_refuses_memory_from_the_target(prepared):
    data = PreparedDataset(prepared)
    with pytest.raises(ValueError, match="its own frames"):
        MemoryClipDataset(data)[SampleSpec(clip=1, memory=((1, 0),))]


# ---------------------------------------------------------------------------------------------- training
def _eval_loss(model, data, specs, seed=0):
    """Loss at fixed noise and timesteps over fixed samples."""
    dataset = MemoryClipDataset(data)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for spec in specs:
            batch = collate_samples([dataset[spec]])
            t = torch.randint(900, 1001, (1,), generator=gen)
            loss, _ = flow_matching_loss(model, batch, generator=gen, timesteps=t)
            total += float(loss)
    return total / len(specs)


@pytest.fixture(scope="module")
def trained(prepared, lora_config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = _train_config(prepared, lora_config_file, out, max_train_steps=40, learning_rate=3e-3,
                           validation_steps=40, validation_shots=2, validation_inference_steps=2,
                           validation_other_expert="none", min_memory=1, max_memory=4)
    return out, train(config)


def test_training_reduces_the_loss(prepared, trained, lora_config_file):
    out, result = trained
    data = PreparedDataset(prepared)
    specs = [SampleSpec(clip=c, memory=((m, 1),), context=ctx)
             for c, m, ctx in [(0, 1, None), (1, 2, "mi2v"), (3, 4, None), (5, 3, "mi2v")]]
    base = load_expert("tiny", "transformer", dtype=torch.float32)
    before = _eval_loss(base, data, specs)
    pipe = StoryMemPipeline(**_tiny_parts())
    pipe.load_storymem_lora(result.adapter_dir)
    after = _eval_loss(pipe.transformer, data, specs)
    assert after < 0.8 * before, (before, after)
    assert len(result.losses) == 40 and result.global_step == 40
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])


def _tiny_parts():
    """The components `--base tiny` trains on."""
    from storymem.builtin import builtin_components

    return builtin_components("tiny")


def test_checkpoint_loads_into_the_pipeline_and_changes_its_output(trained):
    out, result = trained
    adapter = json.loads((result.adapter_dir / "storymem_adapter.json").read_text())
    assert adapter["experts"] == ["transformer"] and adapter["memory_rope"] == "negative"
    assert adapter["memory_rope_stride"] == 5 and adapter["rank"] == 8
    assert (out / "checkpoint-40" / "adapter" / "high_noise.safetensors").is_file()
    assert not (result.adapter_dir / "low_noise.safetensors").exists()

    memory = [np.random.RandomState(i).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(2)]
    kwargs = dict(prompt="a red square moves right", memory_images=memory, height=SIZE, width=SIZE,
                  num_frames=FRAMES, num_inference_steps=2, output_type="latent")
    stock = StoryMemPipeline(**_tiny_parts())
    stock.set_progress_bar_config(disable=True)
    plain = stock(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe = StoryMemPipeline(**_tiny_parts())
    pipe.set_progress_bar_config(disable=True)
    config = pipe.load_storymem_lora(result.adapter_dir)
    assert pipe.memory_rope == "negative" and config.experts == ["transformer"]
    adapted = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert adapted.shape == plain.shape
    assert (adapted - plain).abs().max() > 1e-3
    # The validation story was rendered and written.
    assert result.validation_videos == [out / "validation" / "step-000040.mp4"]
    frames, _ = read_video(result.validation_videos[0])
    assert frames.shape[1:3] == (SIZE, SIZE) and len(frames) == 2 * FRAMES


def test_resume_gives_the_same_next_steps(prepared, lora_config_file, tmp_path):
    kw = dict(max_train_steps=4, checkpointing_steps=2, mi2v_prob=0.5, caption_dropout=0.2)
    full = train(_train_config(prepared, lora_config_file, tmp_path / "full", **kw))
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train(_train_config(prepared, lora_config_file, tmp_path / "resumed",
                                  resume_from_checkpoint="latest", **kw))
    assert resumed.global_step == 4 and len(resumed.losses) == 2
    assert resumed.losses == full.losses[2:]


# ---------------------------------------------------------------------------------------------- bad data
def test_corrupted_shard_is_reported_or_skipped(prepared, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    index = json.loads((copy / "index.json").read_text())
    shard = copy / index["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated
    with pytest.raises(DataError, match=r"shard-00001.safetensors: corrupted or incomplete cache shard"):
        PreparedDataset(copy)
    data = PreparedDataset(copy, skip_bad_shards=True)
    lost = sum(1 for c in index["clips"] if c["shard"] == 1)
    assert data.dropped == {"bad shard": lost} and len(data) == 6 - lost == 3
    assert len(data.clusters) == 1
    # A changed byte is caught by the checksum.
    shutil.copy(prepared / index["shards"][1]["file"], shard)
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    PreparedDataset(copy)  # the header is intact
    with pytest.raises(DataError, match="checksum mismatch"):
        PreparedDataset(copy, verify_checksums=True)


def test_train_rejects_mismatched_settings_before_loading_models(prepared, lora_config_file, tmp_path):
    m2v = tmp_path / "m2v.json"
    StoryMemLoraConfig(rank=4, alpha=4.0, conditioning="m2v").save(m2v)
    with pytest.raises(ValueError, match="mi2v-prob must be 0"):
        train(_train_config(prepared, m2v, tmp_path / "a", mi2v_prob=0.5))
    mm2v = tmp_path / "mm2v.json"
    StoryMemLoraConfig(rank=4, alpha=4.0, conditioning="mm2v").save(mm2v)
    only_mi2v = tmp_path / "data"
    shutil.copytree(prepared, only_mi2v)
    index = json.loads((only_mi2v / "index.json").read_text())
    index["contexts"] = ["mi2v"]
    (only_mi2v / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="'mm2v' condition"):
        train(_train_config(only_mi2v, mm2v, tmp_path / "b"))
    with pytest.raises(DataError, match="no index.json"):
        train(_train_config(tmp_path / "missing", lora_config_file, tmp_path / "c"))
    with pytest.raises(DataError, match="subject-loss-weight needs subject masks"):
        train(_train_config(prepared, lora_config_file, tmp_path / "d", subject_loss_weight=4.0))
    with pytest.raises(ValueError, match="subject_loss_weight: must be > 0"):
        train(_train_config(prepared, lora_config_file, tmp_path / "e", subject_loss_weight=0.0))
    with pytest.raises(ValueError, match="no_memory_prob"):
        train(_train_config(prepared, lora_config_file, tmp_path / "f", preserve_base_weight=1.0))


def test_training_with_memory_free_batches_held_to_the_base_and_distractors(prepared, lora_config_file, tmp_path):
    logged = []
    config = _train_config(prepared, lora_config_file, tmp_path / "run", max_train_steps=6, min_memory=3,
                           max_memory=4, no_memory_prob=0.5, distractor_prob=1.0, preserve_base_weight=1.0)
    from storymem.training import trainer

    original = trainer.flow_matching_loss

    def spy(model, batch, **kw):
        loss, info = original(model, batch, **kw)
        logged.append((info["num_memory_frames"], "preserve_loss" in info, [int(c) for c in batch["clips"]]))
        return loss, info

    trainer.flow_matching_loss = spy
    try:
        result = train(config)
    finally:
        trainer.flow_matching_loss = original
    assert result.global_step == 6 and all(np.isfinite(result.losses))
    assert {fm == 0 for fm, _, _ in logged} == {True, False}  # both kinds of batch occurred
    assert all(held == (fm == 0) for fm, held, _ in logged)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]
    assert saved["preserve_base_weight"] == 1.0 and saved["distractor_prob"] == 1.0


def test_bench_train_step_runs_tiny():
    import runpy

    bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_train_step.py"))
    result = bench["main"](["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0"])
    assert result["tokens"] == (2 + 3) * 2 * 2 and np.isfinite(result["loss"])


def test_lora_state_dict_from_wrapped_names_matches_peft():
    """The FSDP export path names tensors as peft does, FSDP wrapper prefixes or not."""
    from peft.utils import get_peft_model_state_dict

    from storymem.lora import add_storymem_adapter
    from storymem.training.checkpoints import lora_state_dict_from

    model = load_expert("tiny", "transformer", dtype=torch.float32)
    add_storymem_adapter(model, StoryMemLoraConfig(rank=4, alpha=4.0), adapter_name="storymem")
    expected = get_peft_model_state_dict(model, adapter_name="storymem")
    wrapped = ((k.replace("blocks.1.", "blocks.1._fsdp_wrapped_module._checkpoint_wrapped_module."), v)
               for k, v in model.state_dict().items())
    got = lora_state_dict_from(wrapped)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_time_limit_stops_with_a_checkpoint_and_all_expert_samples_every_timestep(prepared, lora_config_file,
                                                                                  tmp_path):
    from storymem.training.flow import EXPERTS, sample_timesteps

    # A time limit already spent: training stops after its first step, saving a resumable checkpoint.
    result = train(_train_config(prepared, lora_config_file, tmp_path / "run", max_train_steps=50,
                                 max_train_minutes=1e-9))
    assert result.global_step == 1
    assert (tmp_path / "run" / "checkpoint-1").is_dir() and (tmp_path / "run" / "adapter").is_dir()
    resumed = train(_train_config(prepared, lora_config_file, tmp_path / "run", max_train_steps=3,
                                  resume_from_checkpoint="latest"))
    assert resumed.global_step == 3
    # "all" trains the single transformer of a one-expert base on both sides of the boundary.
    assert EXPERTS["all"] == "transformer"
    t, _ = sample_timesteps(4000, "all", shift=3.0, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) < 900 <= int(t.max())


def test_flow_matching_loss_returns_the_errors_it_averages(tiny_components):
    from storymem.training.loss import flow_matching_loss

    transformer = tiny_components["transformer"]
    z = transformer.config.out_channels
    batch = {"latents": torch.randn(2, z, 3, 4, 4), "memory_latents": torch.randn(2, z, 2, 4, 4),
             "video_condition": torch.randn(2, z, 3, 4, 4), "num_frames": 9, "num_context_frames": 0,
             "prompt_embeds": torch.randn(2, 8, transformer.config.text_dim)}
    with torch.no_grad():
        loss, info = flow_matching_loss(transformer, batch, generator=torch.Generator().manual_seed(0),
                                        return_errors=True)
    # Target frames only: the two memory frames are left out, as they are of the loss.
    assert info["errors"].shape == (2, z, 3, 4, 4)
    assert torch.allclose(info["errors"].mean(), loss)
    assert "errors" not in flow_matching_loss(transformer, batch)[1]
