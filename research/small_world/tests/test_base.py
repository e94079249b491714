"""Training the small world's base model (research.small_world.train_base) at CPU sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from research.small_world.base_clips import cut_clip, render_training_clips
from research.small_world.base_steps import train_transformer
from research.small_world.train_base import ToyBaseConfig, build_base_components, story_identities, train_base

TINY = dict(num_clips=24, height=32, width=32, num_frames=9, vae_steps=12, vae_batch_size=4, vae_window=5,
            steps=40, batch_size=8, layers=1, heads=2, head_dim=24, ffn_dim=48, text_dim=32, warmup_steps=4,
            lr=2e-3)


def test_training_clips_are_deterministic_and_respect_exclusions():
    a = render_training_clips(6, 5, 32, 32, seed=3, chunk=4)
    b = render_training_clips(6, 5, 32, 32, seed=3, chunk=4, workers=2)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert a[0].shape == (6, 5, 32, 32, 3) and a[0].dtype == np.uint8
    c = render_training_clips(6, 5, 32, 32, seed=4, chunk=4)
    assert not np.array_equal(a[0], c[0])
    excluded = render_training_clips(40, 5, 32, 32, seed=3, exclude=a[2][:3])
    assert not set(a[2][:3]) & set(excluded[2])


def test_cut_clips_keep_the_character_across_a_latent_aligned_cut():
    from research.small_world.detector import IdentityDetector
    from research.small_world.world import Character, ClipSpec

    rng = np.random.default_rng(7)
    detector = IdentityDetector()
    cuts = set()
    for _ in range(6):
        character = Character.random(rng)
        first = ClipSpec.random(rng, character)
        video, caption, cut = cut_clip(rng, first, "first", 17, 64, 64)
        cuts.add(cut)
        assert video.shape == (17, 64, 64, 3) and cut in (5, 9, 13)  # after pixel frame 4j: latent-aligned
        whole_first = first.render(17, 64, 64)
        assert np.array_equal(video[:cut], whole_first[:cut]) and not np.array_equal(video[cut:], whole_first[cut:])
        assert caption.startswith(first.caption("first") + " then the same character ")
        # Both shots show the one character; only the first part of the caption names it.
        assert detector.identify(video[:cut]).character.key == character.key
        assert detector.identify(video[cut:]).character.key == character.key
    assert len(cuts) > 1
    with pytest.raises(ValueError, match="a cut needs"):
        cut_clip(rng, first, "first", 5, 64, 64)

    plain = render_training_clips(6, 9, 32, 32, seed=3, chunk=4)
    assert all(np.array_equal(x, y) for x, y in zip(plain, render_training_clips(6, 9, 32, 32, seed=3, chunk=4,
                                                                                  cut_prob=0.0)))
    cut = render_training_clips(6, 9, 32, 32, seed=3, chunk=4, cut_prob=1.0)
    again = render_training_clips(6, 9, 32, 32, seed=3, chunk=4, cut_prob=1.0, workers=2)
    assert np.array_equal(cut[0], again[0]) and cut[1] == again[1] and cut[2][0] == plain[2][0]
    assert all(" then the same character " in c for c in cut[1])
    # The part before the cut is captioned in its own mix of modes.
    named = render_training_clips(6, 9, 32, 32, seed=3, chunk=4, cut_prob=1.0, cut_mode_probs=(1, 0, 0, 0))
    blind = render_training_clips(6, 9, 32, 32, seed=3, chunk=4, cut_prob=1.0, cut_mode_probs=(0, 0, 0, 1))
    assert all(c.startswith("the same character ") for c in blind[1])
    assert not any(c.startswith("the same character ") for c in named[1])
    assert named[2] == blind[2]
    with pytest.raises(ValueError, match="cut_mode_probs must be 4 probabilities"):
        render_training_clips(2, 9, 32, 32, cut_prob=0.5, cut_mode_probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="cut_caption_mode_probs"):
        ToyBaseConfig(cut_caption_mode_probs=(0.5, 0.5, 0.5, -0.5)).validate()
    with pytest.raises(ValueError, match="cut_prob"):
        render_training_clips(2, 9, 32, 32, cut_prob=1.5)
    with pytest.raises(ValueError, match="cut_prob"):
        ToyBaseConfig(cut_prob=-0.1).validate()


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiples of 16"):
        ToyBaseConfig(height=40).validate()
    with pytest.raises(ValueError, match="vae_window"):
        ToyBaseConfig(vae_window=6).validate()


def test_story_identities_names_a_bad_index(tmp_path):
    with pytest.raises(ValueError, match="index.json"):
        story_identities(tmp_path)
    from research.small_world.datasets import make_story_set

    make_story_set(tmp_path / "s", count=2, seed=1)
    keys = story_identities(tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert set(keys) == {k for s in index["stories"] for k in s["identities"].values()}


def test_train_base_writes_a_pipeline_folder_that_loads_and_renders(tmp_path):
    from storymem import StoryMemPipeline
    from storymem.devices import dtype_kwargs

    config = ToyBaseConfig(**TINY)
    summary = train_base(config, tmp_path / "run", device="cpu")
    assert summary["vae"]["steps"] == TINY["vae_steps"] and summary["transformer"]["steps"] == TINY["steps"]
    pipe = StoryMemPipeline.from_pretrained(tmp_path / "run" / "base", **dtype_kwargs(torch.float32))
    assert pipe.transformer_2 is None and pipe.vae_scale_factor_spatial == 4
    # The latent statistics were measured and stored where Wan pipelines read them.
    assert pipe.vae.config.latents_std != [1.0] * 16 and all(s > 0 for s in pipe.vae.config.latents_std)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt="a red circle walks", negative_prompt="", height=32, width=32, num_frames=9,
                  num_inference_steps=2, guidance_scale=2.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames[0]
    assert frames.shape == (9, 32, 32, 3) and np.isfinite(frames).all()
    # A second run reuses the finished VAE stage.
    again = train_base(ToyBaseConfig(**{**TINY, "steps": 2}), tmp_path / "run", device="cpu")
    assert "reused" in again["vae"]


def test_transformer_loss_falls_on_a_trivial_dataset():
    config = ToyBaseConfig(**{**TINY, "steps": 100, "batch_size": 4, "caption_dropout": 0.0, "ema_decay": 0.0})
    components = build_base_components(config, seed=0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 3, 8, 8, generator=generator)
    conditions = torch.randn(2, 16, 3, 8, 8, generator=generator)
    losses = train_transformer(components, latents, conditions, torch.zeros(1, 16, 3, 8, 8),
                               ["a red circle walks", "a blue square runs"], config, "cpu", log_every=0)
    assert len(losses) == 100
    assert np.mean(losses[-20:]) < 0.85 * np.mean(losses[:20])


def test_continuing_from_a_base_keeps_its_vae_or_trains_only_its_decoder(tmp_path):
    from research.small_world.base_clips import character_weight
    from research.small_world.train_base import load_base_components

    first = train_base(ToyBaseConfig(**{**TINY, "steps": 4}), tmp_path / "a", device="cpu")
    assert first["transformer"]["steps"] == 4
    before = load_base_components(tmp_path / "a" / "base")
    # Continue the transformer on new clips, half of them with a cut; the VAE is the init's, untouched.
    cont = train_base(ToyBaseConfig(**{**TINY, "steps": 3, "seed": 5, "cut_prob": 0.5}), tmp_path / "b",
                      device="cpu", init=str(tmp_path / "a" / "base"))
    assert cont["init"].endswith("base") and "reused" in cont["vae"] and cont["transformer"]["steps"] == 3
    assert cont["config"]["cut_prob"] == 0.5
    after = load_base_components(tmp_path / "b" / "base")
    sd_before, sd_after = before["vae"].state_dict(), after["vae"].state_dict()
    assert all(torch.equal(sd_before[k], sd_after[k]) for k in sd_before)
    moved = [k for k, v in before["transformer"].state_dict().items()
             if not torch.equal(v, after["transformer"].state_dict()[k])]
    assert moved
    # Decoder-only VAE training: the encoder and the latent statistics stay, the decoder moves.
    train_base(ToyBaseConfig(**{**TINY, "vae_decoder_only": True, "vae_steps": 3}), tmp_path / "c", device="cpu",
               init=str(tmp_path / "a" / "base"), retrain_vae=True, vae_only=True)
    from diffusers import AutoencoderKLWan

    tuned = AutoencoderKLWan.from_pretrained(tmp_path / "c" / "stages" / "vae")
    sd_tuned = tuned.state_dict()
    assert all(torch.equal(sd_before[k], sd_tuned[k]) for k in sd_before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(sd_before[k], sd_tuned[k]) for k in sd_before if k.startswith("decoder."))
    assert tuned.config.latents_std == before["vae"].config.latents_std
    with pytest.raises(FileNotFoundError, match="needs a base folder"):
        load_base_components(tmp_path / "c")
    # The loss weight covers the darker pattern shade of a body, not the dark backgrounds.
    video = torch.tensor([[0.9, 0.1, 0.1], [0.45, 0.05, 0.05], [0.25, 0.2, 0.2], [0.2, 0.02, 0.02]])
    weight = character_weight(video.T.reshape(1, 3, 1, 1, 4) * 2 - 1, 1.0).flatten().tolist()
    assert weight == [2.0, 2.0, 1.0, 1.0]


def _torchrun(args, tmp_path, timeout=240):
    """Two CPU processes (gloo) under torchrun, importing this checkout's storymem and research packages."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import research
    import storymem

    roots = {str(Path(package.__file__).resolve().parents[1]) for package in (storymem, research)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*sorted(roots), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)


def test_processes_share_start_weights_average_gradients_and_agree_on_the_clock(tmp_path):
    script = tmp_path / "sync.py"
    script.write_text(
        "import json, torch, torch.distributed as dist\n"
        "from research.small_world.base_steps import init_processes\n"
        "processes, device = init_processes('cpu')\n"
        "r = processes.rank\n"
        "p, q = torch.nn.Parameter(torch.full((3,), r + 5.0)), torch.nn.Parameter(torch.zeros(2, 2))\n"
        "processes.broadcast([p, q])\n"
        "p.grad = torch.full((3,), r + 1.0)  # q has no gradient on either process\n"
        "processes.average_gradients([p, q])\n"
        "row = [r, processes.world, p.data.tolist(), p.grad.tolist(), q.grad.tolist(),\n"
        "       processes.agree(0.25 + r, device)]\n"
        "open(f'rank{r}.json', 'w').write(json.dumps(row))\n"
        "dist.destroy_process_group()\n")
    out = _torchrun([str(script)], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [row[0] for row in rows] == [0, 1]
    for _, world, weights, grad, zero_grad, progress in rows:
        assert world == 2 and weights == [5.0] * 3  # rank 0's start
        assert grad == [1.5] * 3 and zero_grad == [[0.0, 0.0], [0.0, 0.0]] and progress == 1.25


def test_a_data_parallel_continuation_trains_and_rank_0_saves(tmp_path):
    from research.small_world.base_steps import Processes
    from research.small_world.train_base import load_base_components

    train_base(ToyBaseConfig(**{**TINY, "steps": 2}), tmp_path / "a", device="cpu")
    # The VAE trains in one process: a multi-process run that would train it is refused before any work.
    with pytest.raises(ValueError, match="2 processes trains the text encoder and transformer only"):
        train_base(ToyBaseConfig(**TINY), tmp_path / "x", device="cpu", processes=Processes(rank=0, world=2))
    assert not (tmp_path / "x").exists()

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "steps": 3}.items()]
    out = _torchrun(["-m", "research.small_world.train_base", "--out", str(tmp_path / "b"), "--init",
                     str(tmp_path / "a" / "base"), "--device", "cpu", *flags], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "b" / "train_base_summary.json").read_text())
    assert summary["processes"] == 2 and summary["transformer"]["steps"] == 3
    before = load_base_components(tmp_path / "a" / "base")["transformer"].state_dict()
    after = load_base_components(tmp_path / "b" / "base")["transformer"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_reference_frames_show_the_clip_character_elsewhere_and_referential_captions_name_nobody():
    from research.small_world.detector import IdentityDetector
    from research.small_world.base_clips import render_reference_frames

    frames, captions, identities, referential = render_training_clips(6, 9, 64, 64, seed=3, chunk=4)
    # The referential forms change nothing else: the clips of a seed are what they were.
    assert np.array_equal(frames, render_training_clips(6, 9, 64, 64, seed=3, chunk=4, cut_prob=0.0)[0])
    for caption, same in zip(captions, referential):
        assert same.startswith("the same character ") and same.split(" ", 3)[3] in caption
    refs = render_reference_frames(identities, 3, 9, 64, 64, seed=5, chunk=4)
    assert refs.shape == (6, 3, 64, 64, 3) and refs.dtype == np.uint8
    assert np.array_equal(refs, render_reference_frames(identities, 3, 9, 64, 64, seed=5, chunk=4, workers=2))
    assert not np.array_equal(refs, render_reference_frames(identities, 3, 9, 64, 64, seed=6, chunk=4))
    detector = IdentityDetector()
    for key, clip, own in zip(identities, frames, refs):
        assert all(detector.identify(frame[None]).character.key == key for frame in own)
        assert not any(np.array_equal(frame, f) for frame in own for f in clip)  # drawn in other clips
    with pytest.raises(ValueError, match="per_clip must be >= 1"):
        render_reference_frames(identities, 0, 9, 64, 64)


def _recording(transformer, calls):
    forward = transformer.forward

    def record(*args, **kwargs):
        calls.append((kwargs["hidden_states"].shape[2], kwargs["encoder_hidden_states"].detach().clone()))
        return forward(*args, **kwargs)

    transformer.forward = record


def test_memory_steps_put_references_before_the_clip_and_referential_captions_replace_names():
    from research.small_world.base_steps import prompt_embeddings, tokenize

    config = ToyBaseConfig(**{**TINY, "steps": 12, "batch_size": 2, "memory_prob": 0.5, "memory_frames": 3,
                              "referential_prob": 1.0, "i2v_prob": 0.0, "caption_dropout": 0.0,
                              "freeze_text_encoder": True})  # fixed embeddings: comparable across steps
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 3, 8, 8, generator=generator)
    memory = torch.randn(2, 16, 3, 8, 8, generator=generator)
    captions, referential = ["a red circle walks", "a blue square runs"], ["the same character walks"] * 2
    components = build_base_components(config, seed=0)
    calls = []
    _recording(components["transformer"], calls)
    losses = train_transformer(components, latents, latents, torch.zeros(1, 16, 3, 8, 8), captions, config, "cpu",
                               log_every=0, referential_captions=referential, memory_latents=memory)
    assert len(losses) == 12 and np.isfinite(losses).all()
    lengths = [length for length, _ in calls]
    with_memory = [n for n in lengths if n > 3]
    assert 0 < len(with_memory) < 12 and all(4 <= n <= 6 for n in with_memory)
    assert len(set(with_memory)) > 1  # 1..3 references a step
    # Text-to-video steps keep the names; memory steps (text-to-video here) say only "the same character".
    text = components["text_encoder"]
    ids, mask = tokenize(components["tokenizer"], referential[:1])
    used = int(mask.sum())
    same = prompt_embeddings(text, ids[:, :used], mask[:, :used])
    for length, embeds in calls:
        is_same = torch.allclose(embeds[:, :used], same.expand(2, -1, -1), atol=1e-5)
        assert is_same == (length > 3)

    # Without the settings, memory latents given or not, the run is the one it always was.
    plain = ToyBaseConfig(**{**TINY, "steps": 5, "batch_size": 2})
    runs = [train_transformer(build_base_components(plain, seed=0), latents, latents, torch.zeros(1, 16, 3, 8, 8),
                              captions, plain, "cpu", log_every=0, **extra)
            for extra in ({}, {"memory_latents": memory, "referential_captions": referential})]
    assert runs[0] == runs[1]
    # With a distractor, a memory step has one more reference, and its captions keep the names.
    config = ToyBaseConfig(**{**TINY, "steps": 10, "batch_size": 2, "memory_prob": 1.0, "memory_frames": 2,
                              "memory_distractor_prob": 0.5, "referential_prob": 1.0, "i2v_prob": 0.0,
                              "caption_dropout": 0.0, "freeze_text_encoder": True})
    components = build_base_components(config, seed=0)
    calls = []
    _recording(components["transformer"], calls)
    train_transformer(components, latents, latents, torch.zeros(1, 16, 3, 8, 8), captions, config, "cpu",
                      log_every=0, referential_captions=referential, memory_latents=memory[:, :, :2])
    same = prompt_embeddings(components["text_encoder"], ids[:, :used], mask[:, :used])
    kinds = set()
    for length, embeds in calls:
        named = not torch.allclose(embeds[:, :used], same.expand(2, -1, -1), atol=1e-5)
        kinds.add((length, named))
    # 1-2 references alone with referential captions, or 2-3 with a distractor and the names.
    assert kinds <= {(4, False), (5, False), (5, True), (6, True)} and any(n for _, n in kinds)
    assert any(not n for _, n in kinds)
    with pytest.raises(ValueError, match="needs memory_latents"):
        train_transformer(build_base_components(config, seed=0), latents, latents, torch.zeros(1, 16, 3, 8, 8),
                          captions, config, "cpu", referential_captions=referential)
    with pytest.raises(ValueError, match="do not match latents"):
        train_transformer(build_base_components(config, seed=0), latents, latents, torch.zeros(1, 16, 3, 8, 8),
                          captions, config, "cpu", referential_captions=referential, memory_latents=memory[:1])
    with pytest.raises(ValueError, match="memory_prob must be in"):
        ToyBaseConfig(memory_prob=1.5).validate()


def test_a_memory_round_from_the_command_line_keeps_the_text_encoder_when_frozen(tmp_path):
    from research.small_world.train_base import load_base_components, main

    train_base(ToyBaseConfig(**{**TINY, "steps": 2}), tmp_path / "a", device="cpu")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "steps": 3, "seed": 4}.items()]
    main(["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "base"), "--device", "cpu", *flags,
          "--memory-prob", "1", "--memory-frames", "2", "--referential-prob", "0.5", "--freeze-text-encoder"])
    summary = json.loads((tmp_path / "b" / "train_base_summary.json").read_text())
    assert summary["transformer"]["steps"] == 3
    assert (summary["config"]["memory_prob"], summary["config"]["memory_frames"]) == (1.0, 2)
    assert summary["config"]["freeze_text_encoder"] is True
    before, after = load_base_components(tmp_path / "a" / "base"), load_base_components(tmp_path / "b" / "base")
    text_before, text_after = before["text_encoder"].state_dict(), after["text_encoder"].state_dict()
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    moved = before["transformer"].state_dict()
    assert any(not torch.equal(v, after["transformer"].state_dict()[k]) for k, v in moved.items())
