import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from storymem import evaluation
from storymem.evaluation import cli
from storymem.evaluation import (
    EvalConfig,
    EvalError,
    ViCLIPEncoder,
    collect_shots,
    evaluate,
    format_report,
    sample_frame_indices,
    write_report,
)
from storymem.story import Story
from storymem.video import VideoError, write_video

# A tiny joint "video-text" space for tests: one dimension per palette colour. A video embeds as the share of
# its pixels nearest each colour, a text as the count of each colour word; both L2-normalised. Flat colours
# survive H.264, so similarities are known in advance.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 40),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
COLOURS = np.array(list(PALETTE.values()), dtype=float)


class PaletteEncoder:
    name = "palette test encoder"
    num_frames = None

    def __init__(self):
        self.video_calls = []

    def embed_video(self, frames):
        self.video_calls.append(len(frames))
        pixels = frames.reshape(-1, 3).astype(float)
        nearest = np.argmin(((pixels[:, None, :] - COLOURS[None]) ** 2).sum(-1), axis=1)
        hist = np.bincount(nearest, minlength=len(PALETTE)).astype(np.float32)
        return torch.nn.functional.normalize(torch.from_numpy(hist), dim=0)

    def embed_text(self, texts):
        counts = torch.tensor(
            [[re.findall(r"[a-z]+", t.lower()).count(c) for c in PALETTE] for t in texts], dtype=torch.float32
        )
        return torch.nn.functional.normalize(counts, dim=-1)


class BrightnessScorer:
    name = "mean brightness"
    scale = "mean pixel value / 255"

    def score_frames(self, frames, prompt):
        return [float(f.mean() / 255.0) for f in frames]


def flat_video(colours, frames=8, size=(16, 16)):
    """A video whose frames are split into vertical bands of the given palette colours."""
    h, w = size
    out = np.zeros((frames, h, w, 3), np.uint8)
    bands = np.array_split(np.arange(w), len(colours))
    for colour, cols in zip(colours, bands, strict=True):
        out[:, :, cols] = PALETTE[colour]
    return out


def render(tmp_path, story, videos, manifest=True, fps=16):
    """Write shot videos the way the renderer lays them out (shots/SS_NN.mp4 + manifest.json)."""
    out = tmp_path / "out"
    for shot, colours in zip(story, videos, strict=True):
        write_video(out / "shots" / f"{shot.file_stem}.mp4", flat_video(colours), fps=fps)
    if manifest:
        data = {
            "story": {**story.to_dict(), "path": str(story.path) if story.path else None},
            "shots": [{"index": s.index, "file": f"shots/{s.file_stem}.mp4", "prompt": s.prompt} for s in story],
        }
        (out / "manifest.json").write_text(json.dumps(data), encoding="utf-8")
    return out


def write_story(tmp_path, story, name="story.json"):
    path = tmp_path / name
    path.write_text(json.dumps(story.to_dict()), encoding="utf-8")
    return path


FOX = Story.from_prompts(
    [
        "a red fox in a red forest",
        "a blue lake under a blue sky",
        "the red fox comes back to the red forest",
        "a green field",
        "a yellow sun",
    ],
    name="fox",
    overview="red fox, blue lake, green field",
)
# Shot 2 returns to shot 0's look; shot 4 does not show what its prompt says.
FOX_VIDEOS = [["red"], ["blue"], ["red"], ["green"], ["black"]]


def test_sample_frame_indices_matches_vbench_middle_sampling():
    assert sample_frame_indices(81, 8) == [4, 14, 24, 34, 44, 54, 64, 75]
    assert sample_frame_indices(16, 4) == [1, 5, 9, 13]
    assert sample_frame_indices(3, 5) == [0, 1, 2, 2, 2]  # short video: padded with the last frame
    assert sample_frame_indices(1, 1) == [0]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 8)


def test_scores_order_as_the_videos_are_built(tmp_path):
    out = render(tmp_path, FOX, FOX_VIDEOS)
    inputs = collect_shots(out)
    assert [v.path.name for v in inputs.videos] == ["01_01.mp4", "01_02.mp4", "01_03.mp4", "01_04.mp4", "01_05.mp4"]
    report = evaluate(inputs, PaletteEncoder(), BrightnessScorer(), EvalConfig(frames_per_shot=4, top_k=1))
    sim = np.array(report["similarity_matrix"])
    assert sim[0, 2] > 0.99  # the shot that returns looks like the first one
    assert sim[0, 1] < 0.05 and sim[1, 3] < 0.05  # unrelated shots
    # Top-1: the most similar prompts are the two red-fox shots, whose videos match.
    assert report["top_pairs"][0]["indices"] == [0, 2]
    metrics = report["metrics"]
    assert metrics["cross_shot_consistency_top_k"] > 0.99
    assert metrics["cross_shot_consistency"] == pytest.approx(sim[np.triu_indices(5, 1)].mean())
    assert metrics["cross_shot_consistency"] < 0.2
    following = [row["prompt_following"] for row in report["shots"]]
    assert min(following[:4]) > 0.99 and following[4] < 0.05  # shot 4 ignores its prompt
    assert metrics["prompt_following_single_shot"] == pytest.approx(np.mean(following))
    # Global: the story is mostly red, blue and green, like its overview, so it scores far above chance.
    assert metrics["prompt_following_global"] > 0.8
    # Aesthetic stand-in: the black shot is the darkest.
    aesthetic = [row["aesthetic"] for row in report["shots"]]
    assert int(np.argmin(aesthetic)) == 4 and metrics["aesthetic_quality"] == pytest.approx(np.mean(aesthetic))
    assert report["encoders"] == {
        "video_text": "palette test encoder",
        "aesthetic": "mean brightness",
        "aesthetic_scale": "mean pixel value / 255",
    }
    assert report["shots"][2]["file"] == "shots/01_03.mp4"
    assert report["shots"][2]["consistency_mean"] == pytest.approx(np.delete(sim[2], 2).mean())


def test_global_prompt_following_uses_the_whole_story(tmp_path):
    wrong = Story.from_prompts(FOX.prompts, name="fox", overview="a white and yellow desert")
    out = render(tmp_path, wrong, FOX_VIDEOS, manifest=False)
    story_path = write_story(tmp_path, wrong)
    encoder = PaletteEncoder()
    report = evaluate(collect_shots(out, story_path), encoder, config=EvalConfig(frames_per_shot=2))
    assert report["metrics"]["prompt_following_global"] < 0.05
    # One 2-frame embedding per shot, then the whole story sampled at 2 x 5 frames.
    assert encoder.video_calls == [2, 2, 2, 2, 2, 10]
    assert report["metrics"]["aesthetic_quality"] is None
    assert any("aesthetic quality is skipped" in note for note in report["notes"])

    no_overview = Story.from_prompts(FOX.prompts, name="fox")
    report = evaluate(collect_shots(out, write_story(tmp_path, no_overview, "plain.json")), PaletteEncoder())
    assert report["metrics"]["prompt_following_global"] is None
    assert any("no story_overview" in note for note in report["notes"])


def test_top_k_picks_the_pairs_with_the_most_similar_prompts(tmp_path):
    prompts = [
        "red red red blue",
        "red red blue",
        "blue blue green",
        "green green green yellow",
        "yellow white",
        "white white black red",
        "black green red",
    ]
    story = Story.from_prompts(prompts, name="pairs")
    videos = [["red"], ["red", "blue"], ["blue"], ["green"], ["yellow"], ["white"], ["black"]]
    out = render(tmp_path, story, videos)
    encoder = PaletteEncoder()
    report = evaluate(collect_shots(out), encoder)

    text = encoder.embed_text(prompts).numpy()
    pairs = [(i, j) for i in range(7) for j in range(i + 1, 7)]
    ranked = sorted(pairs, key=lambda p: -float(text[p[0]] @ text[p[1]]))
    sims = [float(text[i] @ text[j]) for i, j in ranked]
    assert sims[9] > sims[10] + 1e-3  # the 10th and 11th pairs are not tied, so the top 10 is well defined
    assert [tuple(p["indices"]) for p in report["top_pairs"]] == ranked[:10]
    video = np.array(report["similarity_matrix"])
    assert report["metrics"]["cross_shot_consistency_top_k"] == pytest.approx(np.mean([video[p] for p in ranked[:10]]))
    assert report["settings"]["top_k_pairs_used"] == 10
    assert not any("pairs" in note for note in report["notes"])


def test_short_story_uses_all_pairs_and_says_so(tmp_path):
    story = Story.from_prompts(["a red thing", "a blue thing", "a red thing again"], name="short")
    out = render(tmp_path, story, [["red"], ["blue"], ["red"]])
    report = evaluate(collect_shots(out), PaletteEncoder())
    assert len(report["top_pairs"]) == 3 and report["settings"]["top_k_pairs_used"] == 3
    assert "the story has 3 shots, so only 3 pairs: top-10 uses all 3 of them" in report["notes"]
    assert report["metrics"]["cross_shot_consistency_top_k"] == pytest.approx(
        report["metrics"]["cross_shot_consistency"]
    )

    single = Story.from_prompts(["a red thing"], name="one")
    out = render(tmp_path / "one", single, [["red"]])
    report = evaluate(collect_shots(out), PaletteEncoder())
    assert report["metrics"]["cross_shot_consistency"] is None
    assert any("cross-shot consistency is undefined" in note for note in report["notes"])


def test_bad_inputs_fail_clearly(tmp_path):
    story_path = write_story(tmp_path, FOX)
    with pytest.raises(EvalError, match="output folder not found"):
        collect_shots(tmp_path / "nowhere", story_path)

    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match=r"empty: no shot videos \(SS_NN.mp4, e.g. 01_01.mp4\) found"):
        collect_shots(tmp_path / "empty", story_path)

    out = render(tmp_path, FOX, FOX_VIDEOS, manifest=False)
    with pytest.raises(EvalError, match="no manifest.json; pass --story FILE"):
        collect_shots(out)

    (out / "shots" / "01_02.mp4").unlink()
    with pytest.raises(
        EvalError, match=r"story and folder disagree: .* has 5 shots, .* has 4 shot videos \(missing 01_02.mp4\)"
    ):
        collect_shots(out, story_path)

    write_video(out / "shots" / "01_02.mp4", flat_video(["blue"]))
    write_video(out / "shots" / "01_06.mp4", flat_video(["blue"]))
    with pytest.raises(EvalError, match=r"has 6 shot videos \(not in the story 01_06.mp4\)"):
        collect_shots(out, story_path)
    (out / "shots" / "01_06.mp4").unlink()

    (out / "shots" / "01_03.mp4").write_text("garbage")
    with pytest.raises(VideoError, match="01_03.mp4: cannot read video"):
        collect_shots(out, story_path)


def test_manifest_inputs(tmp_path):
    out = render(tmp_path, FOX, FOX_VIDEOS)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    # The story comes from the manifest; --story overrides it, and prompt differences are reported.
    assert collect_shots(out).story.prompts == FOX.prompts
    edited = Story.from_prompts(["a white fox"] + FOX.prompts[1:], name="fox", overview=FOX.overview)
    inputs = collect_shots(out, write_story(tmp_path, edited))
    assert inputs.story.prompts[0] == "a white fox"
    assert any(note.startswith("shot 01_01: the prompt in manifest.json differs") for note in inputs.notes)

    # An unfinished render: the manifest lists fewer shots than the story has.
    partial = dict(manifest, shots=manifest["shots"][:3])
    manifest_path.write_text(json.dumps(partial))
    with pytest.raises(EvalError, match=r"2 of the story's 5 shots have no video .*: 01_04, 01_05"):
        collect_shots(out)

    # Story and folder disagree on the shot count.
    shorter = Story.from_prompts(FOX.prompts[:4], name="fox")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EvalError, match="lists 5 shots but the story .* has 4"):
        collect_shots(out, write_story(tmp_path, shorter, "short.json"))

    manifest_path.write_text(json.dumps(dict(manifest, shots=manifest["shots"] + [manifest["shots"][0]])))
    with pytest.raises(EvalError, match="lists 6 shots"):
        collect_shots(out)
    manifest_path.write_text(json.dumps(dict(manifest, shots=[manifest["shots"][0]] * 2 + manifest["shots"][2:])))
    with pytest.raises(EvalError, match=r"shots\[1\]: shot index 0 is listed twice"):
        collect_shots(out)
    manifest_path.write_text(json.dumps(dict(manifest, shots=[{"index": "0", "file": "x.mp4"}])))
    with pytest.raises(EvalError, match=r"shots\[0\]: field 'index' must be an integer"):
        collect_shots(out)
    manifest_path.write_text('{"story": ')
    with pytest.raises(EvalError, match="manifest.json: invalid JSON at line 1, column 11"):
        collect_shots(out)


def test_cli_checks_inputs_before_loading_models(tmp_path, monkeypatch, capsys):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "build_encoder", no_models)
    monkeypatch.setattr(cli, "build_aesthetic", no_models)
    story_path = write_story(tmp_path, FOX)
    assert evaluation.main([str(tmp_path / "missing"), "--story", str(story_path)]) == 2
    assert "output folder not found" in capsys.readouterr().err

    out = render(tmp_path, FOX, FOX_VIDEOS, manifest=False)
    (out / "shots" / "01_05.mp4").unlink()
    assert evaluation.main([str(out), "--story", str(story_path)]) == 2
    assert "missing 01_05.mp4" in capsys.readouterr().err
    assert evaluation.main([str(out), "--story", str(tmp_path / "nope.json")]) == 2
    assert "story file not found" in capsys.readouterr().err
    assert evaluation.main([str(out), "--story", str(story_path), "--viclip-checkpoint", str(tmp_path / "v.pth")]) == 2
    assert "--viclip-checkpoint" in capsys.readouterr().err
    assert evaluation.main([str(out), "--story", str(story_path), "--frames", "0"]) == 2
    assert "storymem eval: error: --frames 0: must be >= 1\n" == capsys.readouterr().err
    assert evaluation.main([str(out), "--story", str(story_path), "--aesthetic-head", str(story_path),
                            "--hpsv3", "MizzenAI/HPSv3"]) == 2
    assert "--aesthetic-head (LAION) or --hpsv3, not both" in capsys.readouterr().err


def test_cli_writes_report_table_and_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "build_encoder", lambda options: PaletteEncoder())
    monkeypatch.setattr(cli, "build_aesthetic", lambda options, encoder: BrightnessScorer())
    out = render(tmp_path, FOX, FOX_VIDEOS)
    assert evaluation.main([str(out), "--frames", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Video-text encoder: palette test encoder" in printed
    assert "Cross-shot consistency (top-10)" in printed and "01_05" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["frames_per_shot"] == 4
    assert set(report["metrics"]) == {
        "aesthetic_quality",
        "prompt_following_global",
        "prompt_following_single_shot",
        "cross_shot_consistency",
        "cross_shot_consistency_top_k",
    }
    chart = out / "metrics_similarity.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "metrics.json",
        "metrics_similarity.png",
        "shots",
    ]

    custom = tmp_path / "reports" / "fox.json"
    assert evaluation.main([str(out), "--output", str(custom), "--no-plot", "--quiet"]) == 0
    assert custom.is_file() and not (custom.parent / "fox_similarity.png").exists()


def test_format_report_lists_every_shot(tmp_path):
    out = render(tmp_path, FOX, FOX_VIDEOS)
    report = evaluate(collect_shots(out), PaletteEncoder())
    table = format_report(report)
    assert all(f"01_0{i}" in table for i in range(1, 6))
    assert "Aesthetic quality" in table and "note: no aesthetic model given" in table
    written = write_report(report, tmp_path / "r.json")
    assert [p.name for p in written] == ["r.json", "r_similarity.png"]
    assert json.loads(written[0].read_text())["similarity_matrix"] == report["similarity_matrix"]


# ---------------------------------------------------------------------------------------------- ViCLIP


def tiny_viclip_checkpoint(path, width=32, text_width=32, frames=8, patch=14, grid=2, out_dim=16, layers=2):
    """A random ViCLIP checkpoint in the release's layout ({"model": {vision_encoder.*, text_encoder.*, temp}})."""
    from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer

    torch.manual_seed(0)
    image = VisionTransformer(grid * patch, patch, width, layers, 1, 4.0, output_dim=out_dim, act_layer=QuickGELU)
    text = TextTransformer(
        context_length=32, width=text_width, heads=1, layers=layers, output_dim=out_dim, act_layer=QuickGELU
    )
    state = {}
    for key, value in image.state_dict().items():
        if key == "conv1.weight":
            value = value.unsqueeze(2)  # Conv2d -> the release's Conv3d with temporal kernel 1
        state["vision_encoder." + key] = value
    state["vision_encoder.temporal_positional_embedding"] = torch.randn(1, frames, width) * 0.02
    state.update({"text_encoder." + k: v for k, v in text.state_dict().items()})
    state["temp"] = torch.tensor(0.01)
    torch.save({"model": state}, path)
    return image, text, state


def test_viclip_loads_release_layout_and_matches_clip_on_one_frame(tmp_path):
    image, text, _ = tiny_viclip_checkpoint(tmp_path / "viclip.pth")
    encoder = ViCLIPEncoder(tmp_path / "viclip.pth", device="cpu")
    assert encoder.num_frames == 8 and encoder.resolution == 28
    assert "ViCLIP viclip.pth" in encoder.name

    # One frame: the temporal embedding enters as its mean; with that removed the tower is CLIP's image ViT.
    with torch.no_grad():
        encoder.vision.temporal_positional_embedding.zero_()
        pixels = torch.randn(2, 3, 28, 28)
        expected = image.eval()(pixels)
        got = encoder.vision(pixels.unsqueeze(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # The text tower: CLIP's, with a 32-token context (long prompts are truncated, EOT kept).
    long_prompt = " ".join(["word"] * 100)
    tokens = encoder.tokenizer([long_prompt])
    assert tokens.shape == (1, 32) and tokens[0, -1] == encoder.tokenizer.eot_token_id
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.embed_text([long_prompt])[0], torch.nn.functional.normalize(text.eval()(tokens), dim=-1)[0]
        )

    video = encoder.embed_video(np.random.default_rng(0).integers(0, 255, (20, 36, 48, 3), dtype=np.uint8))
    assert video.shape == (16,) and float(video.norm()) == pytest.approx(1.0, abs=1e-5)


def test_viclip_through_evaluate_uses_its_8_frames(tmp_path):
    tiny_viclip_checkpoint(tmp_path / "viclip.pth")
    encoder = ViCLIPEncoder(tmp_path / "viclip.pth", device="cpu")
    out = render(tmp_path, FOX, FOX_VIDEOS)
    report = evaluate(collect_shots(out), encoder, config=EvalConfig(frames_per_shot=3))
    assert report["settings"]["frames_per_shot"] == 8 and report["settings"]["global_frames"] == 8
    sim = np.array(report["similarity_matrix"])
    assert sim[0, 2] == pytest.approx(1.0, abs=1e-4)  # identical videos
    assert all(v is not None and -1 <= v <= 1 for v in report["metrics"].values() if v is not None)


def test_viclip_checkpoint_errors(tmp_path):
    _, _, state = tiny_viclip_checkpoint(tmp_path / "viclip.pth")
    broken = dict(state)
    del broken["vision_encoder.ln_post.weight"]
    torch.save({"model": broken}, tmp_path / "missing.pth")
    with pytest.raises(EvalError, match="missing vision_encoder.ln_post.weight"):
        ViCLIPEncoder(tmp_path / "missing.pth", device="cpu")
    torch.save({"model": dict(state, **{"text_encoder.extra": torch.zeros(1)})}, tmp_path / "extra.pth")
    with pytest.raises(EvalError, match="unexpected text_encoder.extra"):
        ViCLIPEncoder(tmp_path / "extra.pth", device="cpu")
    torch.save({"model": {"something.else": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(EvalError, match="unexpected keys in the ViCLIP checkpoint: something.else"):
        ViCLIPEncoder(tmp_path / "other.pth", device="cpu")
    torch.save({"model": {"temp": torch.zeros(())}}, tmp_path / "empty.pth")
    with pytest.raises(EvalError, match="not a ViCLIP checkpoint"):
        ViCLIPEncoder(tmp_path / "empty.pth", device="cpu")
    torch.save({"model": state, "config": object()}, tmp_path / "pickled.pth")
    with pytest.raises(EvalError, match=r"weights_only=True.*re-save its state dict as .safetensors"):
        ViCLIPEncoder(tmp_path / "pickled.pth", device="cpu")
    with pytest.raises(EvalError, match="ViCLIP checkpoint file not found"):
        ViCLIPEncoder(tmp_path / "nope.pth", device="cpu")

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "viclip.safetensors"))
    assert ViCLIPEncoder(tmp_path / "viclip.safetensors", device="cpu").num_frames == 8


# ---------------------------------------------------------------------------------------------- open_clip


TINY_CLIP = "storymem-test-tiny-clip"


@pytest.fixture
def tiny_clip_name(tmp_path):
    """Register a tiny open_clip architecture (random weights, built from this config)."""
    import open_clip

    config = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
    }
    path = tmp_path / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return TINY_CLIP


def test_open_clip_path_end_to_end(tmp_path, tiny_clip_name, capsys):
    head = torch.nn.Linear(16, 1)
    torch.save(head.state_dict(), tmp_path / "aesthetic_head.pth")
    out = render(tmp_path, FOX, FOX_VIDEOS)
    argv = [
        str(out),
        "--clip-model",
        tiny_clip_name,
        "--clip-pretrained",
        "none",
        "--aesthetic-head",
        str(tmp_path / "aesthetic_head.pth"),
        "--aesthetic-clip-model",
        tiny_clip_name,
        "--aesthetic-clip-pretrained",
        "none",
        "--device",
        "cpu",
        "--frames",
        "2",
        "--aesthetic-frames",
        "3",
        "--quiet",
    ]
    assert evaluation.main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "metrics.json").read_text())
    # Random weights are named so, not "MODEL/None".
    assert report["encoders"]["video_text"] == f"open_clip {tiny_clip_name} (random weights), frame-averaged"
    assert report["encoders"]["aesthetic"].startswith("LAION aesthetic aesthetic_head.pth on open_clip")
    metrics = report["metrics"]
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    sim = np.array(report["similarity_matrix"])
    assert np.allclose(np.diag(sim), 1, atol=1e-5) and sim[0, 2] == pytest.approx(1.0, abs=1e-5)
    assert report["shots"][0]["aesthetic"] == pytest.approx(report["shots"][2]["aesthetic"], abs=1e-5)

    # The LAION head shares the similarity encoder's CLIP when both name the same model.
    options = cli.parse_options(argv)
    assert options.encoder == "openclip" and options.dtype == "float32"
    encoder = evaluation.build_encoder(options)
    scorer = evaluation.build_aesthetic(options, encoder)
    assert scorer.embedder is encoder.embedder

    # Aesthetic = head(normalised CLIP embedding of the centre-cropped frame) / 10, frame by frame.
    frames = flat_video(["red", "blue"], frames=3, size=(48, 64))
    crops = evaluation.clip_center_crop(frames, 32)
    assert crops.shape == (3, 32, 32, 3)
    pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(evaluation.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(evaluation.CLIP_STD).view(
        1, 3, 1, 1
    )
    embeddings = torch.nn.functional.normalize(encoder.embedder.model.encode_image(pixels), dim=-1)
    expected = (scorer.head(embeddings).squeeze(-1) / 10).tolist()
    assert scorer.score_frames(frames, "") == pytest.approx(expected, abs=1e-5)
    video = encoder.embed_video(frames)
    assert torch.allclose(video, torch.nn.functional.normalize(embeddings.mean(0), dim=0), atol=1e-5)


def test_aesthetic_head_loading(tmp_path, tiny_clip_name):
    from safetensors.torch import save_file

    from storymem.memory.embedders import OpenCLIPEmbedder

    head = torch.nn.Linear(768, 1)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    loaded = evaluation.load_aesthetic_head(tmp_path / "head.safetensors")
    assert torch.equal(loaded.weight, head.weight) and loaded.in_features == 768

    embedder = OpenCLIPEmbedder(tiny_clip_name, pretrained=None, device="cpu")
    scorer = evaluation.LaionAestheticScorer.load(tmp_path / "head.safetensors", embedder=embedder)
    with pytest.raises(EvalError, match="expects 768-d CLIP embeddings but the CLIP model gives 16-d"):
        scorer.score_frames(flat_video(["red"], frames=1), "")

    torch.save({"weight": torch.zeros(1, 8), "bias": torch.zeros(1), "extra": torch.zeros(1)}, tmp_path / "keys.pth")
    with pytest.raises(
        EvalError, match=r"keys.pth: expected a Linear state dict .* got \['bias', 'extra', 'weight'\]"
    ):
        evaluation.load_aesthetic_head(tmp_path / "keys.pth")
    torch.save({"weight": torch.zeros(2, 8), "bias": torch.zeros(2)}, tmp_path / "shape.pth")
    with pytest.raises(EvalError, match=r"expected weight \[1, D\]"):
        evaluation.load_aesthetic_head(tmp_path / "shape.pth")
    with pytest.raises(EvalError, match="aesthetic head file not found"):
        evaluation.load_aesthetic_head(tmp_path / "nope.pth")


def test_cli_runs_viclip(tmp_path, capsys):
    tiny_viclip_checkpoint(tmp_path / "viclip.pth")
    out = render(tmp_path, FOX, FOX_VIDEOS)
    assert (
        evaluation.main([str(out), "--viclip-checkpoint", str(tmp_path / "viclip.pth"), "--device", "cpu", "--quiet"])
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["encoders"]["video_text"].startswith("ViCLIP viclip.pth (8 frames, 28px)")
    assert evaluation.main([str(out), "--encoder", "viclip"]) == 2
    assert "needs --viclip-checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- benchmark


SKY = Story.from_prompts(["a blue sky", "a white cloud in the blue sky", "a yellow sun in the blue sky"], name="sky",
                         overview="blue sky, white cloud, yellow sun")
SKY_VIDEOS = [["blue"], ["white", "blue"], ["yellow", "blue"]]
NIGHT = Story.from_prompts(["a black night", "a white moon at night"], name="night")  # no overview
NIGHT_VIDEOS = [["black"], ["white", "black"]]


def render_batch_folder(tmp_path, record=True):
    """A batch folder as `storymem render --story stories/` leaves it: one render folder per story, batch.json."""
    batch = tmp_path / "batch"
    batch.mkdir()
    for name, story, videos in (("fox", FOX, FOX_VIDEOS), ("night", NIGHT, NIGHT_VIDEOS), ("sky", SKY, SKY_VIDEOS)):
        render(tmp_path / name, story, videos).rename(batch / name)
    unfinished = render(tmp_path / "late", FOX, FOX_VIDEOS)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps(dict(manifest, shots=manifest["shots"][:2])))
    unfinished.rename(batch / "late")
    if record:
        stories = [{"name": n, "status": "finished"} for n in ("fox", "night", "sky")]
        stories += [{"name": "late", "status": "incomplete"},
                    {"name": "broken", "status": "invalid", "error": "broken.json: invalid JSON"}]
        (batch / "batch.json").write_text(json.dumps({"format": "storymem-batch", "stories": stories,
                                                      "settings": {"steps": 40, "lora": "m2v"},
                                                      "seeds": {"seed": 0}, "versions": {}, "launch": {},
                                                      "hardware": {"world_size": 8, "processes": [{}] * 8}}))
    return batch


def test_batch_benchmark_means_are_the_story_means(tmp_path, monkeypatch, capsys):
    batch = render_batch_folder(tmp_path)
    assert evaluation.is_batch_folder(batch) and not evaluation.is_batch_folder(batch / "fox")
    built = []
    monkeypatch.setattr(cli, "build_encoder", lambda options: built.append("encoder") or PaletteEncoder())
    monkeypatch.setattr(cli, "build_aesthetic", lambda options, encoder: built.append("aesthetic") or BrightnessScorer())
    assert evaluation.main([str(batch), "--frames", "4", "--quiet"]) == 0
    assert built == ["encoder", "aesthetic"]  # loaded once for every story
    table = json.loads((batch / "benchmark.json").read_text())
    assert [row["name"] for row in table["stories"]] == ["fox", "night", "sky"]
    assert [(m["name"], m["reason"].split(":")[0]) for m in table["missing"]] == [
        ("late", f"{batch / 'late' / 'manifest.json'}"), ("broken", "broken story script")]
    assert "3 of the story's 5 shots have no video" in table["missing"][0]["reason"]

    # Each story scored on its own, then averaged here, gives the table's means.
    per_story = {name: evaluate(collect_shots(batch / name), PaletteEncoder(), BrightnessScorer(),
                                EvalConfig(frames_per_shot=4))["metrics"] for name in ("fox", "night", "sky")}
    for key in evaluation.benchmark.METRIC_KEYS:
        values = [m[key] for m in per_story.values() if m[key] is not None]
        assert table["mean"][key] == pytest.approx(np.mean(values)), key
        for row in table["stories"]:
            expected = per_story[row["name"]][key]
            assert row["metrics"][key] == (None if expected is None else pytest.approx(expected)), (row["name"], key)
    # The night story has no overview: the global mean is over the two stories that have one, and says so.
    assert table["stories_with_metric"]["prompt_following_global"] == 2
    assert "prompt_following_global: the mean is over the 2 of 3 stories that have it" in table["notes"]
    assert table["produced_by"]["render"]["settings"] == {"steps": 40, "lora": "m2v"}
    assert "processes" not in table["produced_by"]["render"]["hardware"]
    assert table["produced_by"]["eval"]["settings"]["frames_per_shot"] == 4
    # Each story's own report sits in its folder; the chart beside the table.
    assert json.loads((batch / "sky" / "metrics.json").read_text())["metrics"] == per_story["sky"]
    assert (batch / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert any(line.split()[:2] == ["sky", "3"] for line in lines)
    mean_line = next(line for line in lines if line.strip().startswith("mean"))
    assert f"{table['mean']['cross_shot_consistency']:.4f}" in mean_line
    assert "missing: late:" in printed and "missing: broken: broken story script" in printed


def test_batch_folder_without_record_and_bad_inputs(tmp_path, monkeypatch, capsys):
    batch = render_batch_folder(tmp_path, record=False)
    monkeypatch.setattr(cli, "build_encoder", lambda options: PaletteEncoder())
    monkeypatch.setattr(cli, "build_aesthetic", lambda options, encoder: None)
    assert evaluation.main([str(batch), "--quiet", "--no-plot"]) == 0
    table = json.loads((batch / "benchmark.json").read_text())
    assert [row["name"] for row in table["stories"]] == ["fox", "night", "sky"]
    assert table["produced_by"]["render"]["source"] == "fox/manifest.json"
    assert table["mean"]["aesthetic_quality"] is None and not (batch / "benchmark.png").exists()
    assert "no aesthetic model given (--aesthetic-head or --hpsv3): aesthetic quality is skipped" in table["notes"]
    capsys.readouterr()

    assert evaluation.main([str(batch), "--story", str(write_story(tmp_path, FOX))]) == 2
    assert "--story applies to one render folder" in capsys.readouterr().err
    for name in ("fox", "night", "sky"):
        (batch / name / "shots" / "01_01.mp4").unlink()
    assert evaluation.main([str(batch)]) == 2
    assert "no story can be scored" in capsys.readouterr().err
    assert evaluation.main([]) == 2
    assert "give RENDER_DIR" in capsys.readouterr().err


def test_compare_prints_two_tables_side_by_side(tmp_path, monkeypatch, capsys):
    batch = render_batch_folder(tmp_path)
    monkeypatch.setattr(cli, "build_encoder", lambda options: PaletteEncoder())
    monkeypatch.setattr(cli, "build_aesthetic", lambda options, encoder: BrightnessScorer())
    assert evaluation.main([str(batch), "--quiet", "--no-plot"]) == 0
    a = json.loads((batch / "benchmark.json").read_text())
    # Method B: other render settings, one story fewer, shifted figures, another encoder.
    b = json.loads(json.dumps(a))
    b["stories"] = [row for row in b["stories"] if row["name"] != "night"]
    for row in b["stories"]:
        row["metrics"]["cross_shot_consistency"] += 0.1
    b["produced_by"]["render"]["settings"]["lora"] = "mm2v"
    b["encoders"]["video_text"] = "another encoder"
    (tmp_path / "b.json").write_text(json.dumps(b))
    capsys.readouterr()
    assert evaluation.main(["--compare", str(batch), str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    assert "warning: the encoders differ" in printed
    assert "warning: the tables scored different stories: the means below are over the 2 both have (only in A: " \
           "night; only in B: -)" in printed
    assert 'lora: "m2v" -> "mm2v"' in printed
    common = [row for row in a["stories"] if row["name"] != "night"]
    mean_a = np.mean([row["metrics"]["cross_shot_consistency"] for row in common])
    line = next(l for l in printed.splitlines() if l.strip().startswith("Cross-shot consistency (all pairs)"))
    assert line.split()[-3:] == [f"{mean_a:.4f}", f"{mean_a + 0.1:.4f}", "+0.1000"]
    assert any(l.split()[0] == "sky" and "/" in l for l in printed.splitlines() if l.strip())
    # One story's report compares too; a file that is neither is refused by name.
    assert evaluation.main(["--compare", str(batch / "fox" / "metrics.json"), str(tmp_path / "b.json")]) == 0
    assert evaluation.main(["--compare", str(batch / "fox" / "manifest.json"), str(tmp_path / "b.json")]) == 2
    assert "manifest.json: not a storymem benchmark table" in capsys.readouterr().err
    assert evaluation.main(["--compare", str(tmp_path / "b.json")]) == 2
    assert "--compare takes two tables (A B), got 1" in capsys.readouterr().err
