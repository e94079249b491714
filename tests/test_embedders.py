"""Frame embedders: the release's CLIP preprocessing on open_clip models (built offline), and PixelEmbedder."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _memory_helpers import TINY_CLIP_CONFIG, pan_video, register_tiny_clip
from storymem.memory import OpenCLIPEmbedder, PixelEmbedder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    name = register_tiny_clip(tmp_path_factory.mktemp("clip_configs"))
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    return name, model


def release_clip_embedding(model, frame: np.ndarray) -> torch.Tensor:
    """The release's helper: [0, 1] frame squashed to the input size (bilinear, no crop), CLIP mean/std."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = torch.from_numpy(frame).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
    x = F.interpolate(x, size=(TINY_CLIP_CONFIG["vision_cfg"]["image_size"],) * 2, mode="bilinear", align_corners=False)
    with torch.no_grad():
        return F.normalize(model.encode_image((x - mean) / std), dim=-1)[0]


def test_open_clip_matches_release_preprocessing(tiny_clip):
    name, model = tiny_clip
    embedder = OpenCLIPEmbedder(name, model=model, device="cpu", batch_size=3)
    frames = pan_video(num_frames=5, height=48, width=80, speed=4.0)
    out = embedder.embed(frames)
    assert out.shape == (5, TINY_CLIP_CONFIG["embed_dim"]) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    expected = torch.stack([release_clip_embedding(model, f) for f in frames])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert embedder.input_size == (32, 32)
    assert (embedder.num_forwards, embedder.num_images) == (2, 5)  # batches of 3


def test_open_clip_input_forms_and_mixed_sizes(tiny_clip):
    from PIL import Image

    name, model = tiny_clip
    embedder = OpenCLIPEmbedder(name, model=model, device="cpu")
    small, large = pan_video(num_frames=1, height=30, width=40)[0], pan_video(num_frames=1, height=64, width=90)[0]
    mixed = embedder.embed([small, Image.fromarray(large), small])
    torch.testing.assert_close(mixed[0], mixed[2])
    torch.testing.assert_close(mixed[1], embedder.embed(large[None])[0])
    as_float = torch.from_numpy(small).permute(2, 0, 1).float().div(255.0)[None]  # [N, 3, H, W] in [0, 1]
    torch.testing.assert_close(embedder.embed(as_float)[0], mixed[0])
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed([small.astype(np.float32)])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        embedder.embed([np.zeros((8, 8, 4), np.uint8)])


def test_open_clip_uses_the_models_preprocess_config(tiny_clip):
    import open_clip

    name, _ = tiny_clip
    model = open_clip.create_model(name, pretrained=None)
    frame = pan_video(num_frames=1)
    before = OpenCLIPEmbedder(name, model=model, device="cpu").embed(frame)
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    after = OpenCLIPEmbedder(name, model=model, device="cpu").embed(frame)
    assert not torch.allclose(before, after, atol=1e-4)


def test_open_clip_local_checkpoint(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    name, model = tiny_clip
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    from_file = OpenCLIPEmbedder(name, pretrained=str(path), device="cpu")
    assert from_file._model is None  # loaded lazily, once
    frames = pan_video(num_frames=3)
    torch.testing.assert_close(from_file.embed(frames), OpenCLIPEmbedder(name, model=model, device="cpu").embed(frames))
    loaded = from_file._model
    from_file.embed(frames)
    assert from_file._model is loaded


def test_open_clip_text(tiny_clip):
    name, model = tiny_clip
    embedder = OpenCLIPEmbedder(name, model=model, device="cpu", batch_size=2)
    text = embedder.embed_text(["a red cat", "a blue dog", "a red cat"])
    assert text.shape == (3, TINY_CLIP_CONFIG["embed_dim"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text[0], text[2])
    assert not torch.allclose(text[0], text[1])
    with pytest.raises(ValueError, match="list of strings"):
        embedder.embed_text("a red cat")


def test_open_clip_bad_sources(tiny_clip, tmp_path):
    name, _ = tiny_clip
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        OpenCLIPEmbedder(name, pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope'"):
        OpenCLIPEmbedder("ViT-B-32", pretrained="nope")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenCLIPEmbedder("ViT-Q-99", pretrained=None)
    with pytest.raises(ValueError, match="batch_size"):
        OpenCLIPEmbedder(name, pretrained=None, batch_size=0)


def test_openai_tag_uses_quick_gelu():
    import open_clip

    assert open_clip.get_pretrained_cfg("ViT-B-32", "openai").get("quick_gelu") is True
    OpenCLIPEmbedder("ViT-B-32", pretrained="openai")  # a known tag passes the checks without any download


def test_pixel_embedder():
    embedder = PixelEmbedder(size=4)
    frames = pan_video(num_frames=4, speed=6.0)
    out = embedder.embed(frames)
    assert out.shape == (4, 48)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.sum(dim=-1), torch.zeros(4), atol=1e-5, rtol=0)  # centred
    torch.testing.assert_close(embedder.embed(frames), out)  # deterministic
    torch.testing.assert_close(embedder.embed(list(frames[::-1])), out.flip(0))  # batch-independent
    # A brightness/contrast change leaves the (correlation) embedding unchanged.
    brighter = np.clip(frames[:1].astype(np.int32) // 2 + 60, 0, 255).astype(np.uint8)
    assert float(embedder.embed(brighter)[0] @ out[0]) > 0.99
    # Flat frames: one fixed embedding, orthogonal to textured ones.
    flat = embedder.embed([np.full((9, 9, 3), v, np.uint8) for v in (0, 200)])
    torch.testing.assert_close(flat[0], flat[1])
    assert abs(float(flat[0] @ out[0])) < 1e-5
    assert embedder.embed([]).shape == (0, 48)
