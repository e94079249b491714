"""StoryMemPipeline against Wan I2V and against the memory layout of the transformer input (the published release's)."""

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from storymem import StoryMemPipeline
from storymem.conditioning import normalize_latents
from storymem.builtin.tiny import build_tiny_components

H = W = 32
F = 9  # 3 latent frames
PROMPT = "the same red circle walks into the desert"


def _image(seed, size=(H, W)):
    return np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)


def _capture_inputs(pipe):
    """Record every transformer input (hidden states, timestep) of both experts."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((module, kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone()))

    for model in (pipe.transformer, pipe.transformer_2):
        model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _one_frame_latent(vae, image_uint8):
    """Reference: one memory image, resized to the shot size, VAE-encoded on its own as a one-frame video."""
    x = torch.from_numpy(image_uint8).permute(2, 0, 1).float()[None] / 255.0
    x = torch.nn.functional.interpolate(x, size=(H, W), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0, 1) * 2 - 1
    latent = vae.encode(x[:, :, None]).latent_dist.mode()  # [1, 16, 1, h, w]
    return normalize_latents(vae, latent)[0, :, 0]


def test_no_memory_first_frame_equals_wan_i2v():
    first = Image.fromarray(_image(1))
    stock = WanImageToVideoPipeline(**build_tiny_components(seed=0))
    ours = StoryMemPipeline(**build_tiny_components(seed=0))
    for p in (stock, ours):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", height=H, width=W, num_frames=F, num_inference_steps=3,
                  guidance_scale=3.5, output_type="latent")
    expected = stock(image=first, generator=torch.Generator().manual_seed(7), **kwargs).frames
    got = ours(first_frame=first, generator=torch.Generator().manual_seed(7), **kwargs).frames
    assert got.shape == expected.shape == (1, 16, 3, H // 8, W // 8)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode,num_memory", [("m2v", 1), ("m2v", 3), ("mi2v", 2), ("mm2v", 3)])
def test_transformer_input_layout(tiny_pipe, mode, num_memory):
    pipe = tiny_pipe
    memory = [_image(10 + j, size=(24 + 8 * j, 40)) for j in range(num_memory)]  # other sizes: resized
    previous = [_image(50 + j) for j in range(5)]
    extra = {"m2v": {}, "mi2v": {"first_frame": previous[-1]}, "mm2v": {"motion_frames": previous}}[mode]
    calls = _capture_inputs(pipe)
    out = pipe(PROMPT, memory_images=memory, height=H, width=W, num_frames=F, num_inference_steps=2,
               generator=torch.Generator().manual_seed(3), output_type="np", **extra)

    f, fm = 3, num_memory
    _, x, _ = calls[0]
    assert x.shape == (1, 36, fm + f, H // 8, W // 8)
    mask, y = x[:, 16:20], x[:, 20:]

    # Mask: memory latent frames all ones; video frames per mode.
    conditioned = {"m2v": set(), "mi2v": {0}, "mm2v": {0, 1}}[mode]
    for t in range(fm + f):
        expected = 1.0 if t < fm or (t - fm) in conditioned else 0.0
        assert torch.all(mask[:, :, t] == expected), f"latent frame {t}"

    # Memory latents: each image encoded on its own as a one-frame video.
    for j in range(fm):
        torch.testing.assert_close(y[0, :, j], _one_frame_latent(pipe.vae, memory[j]), rtol=1e-4, atol=1e-4)

    # Video condition: the context frames then zeros, encoded as one clip.
    ctx = {"m2v": [], "mi2v": [previous[-1]], "mm2v": previous}[mode]
    video = torch.zeros(1, 3, F, H, W)
    for k, im in enumerate(ctx):
        video[0, :, k] = torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1
    expected_video = normalize_latents(pipe.vae, pipe.vae.encode(video).latent_dist.mode())
    torch.testing.assert_close(y[:, :, fm:], expected_video, rtol=1e-4, atol=1e-4)

    # The noise covers the memory frames too: step 0's latents are the generator's draw over fm + f frames.
    noise = randn_tensor((1, 16, fm + f, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(x[:, :16], noise)

    # 2 steps x (cond + uncond); output = the new shot only, context frames dropped.
    assert len(calls) == 4
    dropped = {"m2v": 0, "mi2v": 1, "mm2v": 5}[mode]
    assert out.frames.shape == (1, F - dropped, H, W, 3)


def test_experts_switch_at_boundary(tiny_pipe):
    calls = _capture_inputs(tiny_pipe)
    tiny_pipe(PROMPT, memory_images=[_image(0)], height=H, width=W, num_frames=F, num_inference_steps=6,
              guidance_scale=1.0, output_type="latent")
    boundary = 0.9 * tiny_pipe.scheduler.config.num_train_timesteps
    assert len(calls) == 6
    for module, _, t in calls:
        expected = tiny_pipe.transformer if t.item() >= boundary else tiny_pipe.transformer_2
        assert module is expected
    assert {id(c[0]) for c in calls} == {id(tiny_pipe.transformer), id(tiny_pipe.transformer_2)}


def test_single_transformer_and_negative_rope_are_used():
    components = build_tiny_components(seed=0)
    components.update(transformer_2=None, boundary_ratio=None)
    pipe = StoryMemPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.rope.register_forward_hook(
        lambda m, a, o: seen.append((m.num_memory_frames, m.mode)))
    out = pipe(PROMPT, memory_images=[_image(0), _image(1)], height=H, width=W, num_frames=F,
               num_inference_steps=2, output_type="pt")
    assert out.frames.shape == (1, F, 3, H, W)
    assert seen and all(s == (2, "negative") for s in seen)
    assert pipe.transformer.rope.num_memory_frames == 0  # layout is reset after the call


def test_memory_changes_output_and_latent_output_drops_memory(tiny_pipe):
    kwargs = dict(height=H, width=W, num_frames=F, num_inference_steps=2, output_type="latent")
    a = tiny_pipe(PROMPT, memory_images=[_image(0)], generator=torch.Generator().manual_seed(0), **kwargs).frames
    b = tiny_pipe(PROMPT, memory_images=[_image(1)], generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert a.shape == b.shape == (1, 16, 3, 4, 4)
    assert not torch.allclose(a, b)


def test_image_input_kinds_agree(tiny_pipe):
    img = _image(4)
    kwargs = dict(height=H, width=W, num_frames=F, num_inference_steps=1, output_type="latent")
    as_np = tiny_pipe(PROMPT, memory_images=[img], generator=torch.Generator().manual_seed(0), **kwargs).frames
    as_pil = tiny_pipe(PROMPT, memory_images=[Image.fromarray(img)], generator=torch.Generator().manual_seed(0),
                       **kwargs).frames
    as_pt = tiny_pipe(PROMPT, memory_images=[torch.from_numpy(img).permute(2, 0, 1).float() / 255],
                      generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.testing.assert_close(as_np, as_pil)
    torch.testing.assert_close(as_np, as_pt, rtol=1e-5, atol=1e-5)


def test_callbacks_and_cpu_offload_api(tiny_pipe):
    steps = []

    def callback(pipe, i, t, kwargs):
        steps.append((i, kwargs["latents"].shape))
        return {}

    tiny_pipe(PROMPT, memory_images=[_image(0), _image(1)], height=H, width=W, num_frames=F, num_inference_steps=3,
              output_type="latent", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    assert [s[0] for s in steps] == [0, 1, 2]
    assert steps[0][1] == (1, 16, 5, 4, 4)  # memory frames are part of the denoised latents
    assert "transformer_2" in StoryMemPipeline.model_cpu_offload_seq



def test_memory_guidance_extrapolates_from_the_memory_free_prediction():
    components = build_tiny_components(seed=0)
    components.update(transformer_2=None, boundary_ratio=None)
    pipe = StoryMemPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["hidden_states"].shape[2], m.rope.num_memory_frames)), with_kwargs=True)
    memory = [_image(0), _image(1)]

    def run(scale, **extra):
        calls.clear()
        return pipe(PROMPT, negative_prompt="blurry", height=H, width=W, num_frames=F, num_inference_steps=1,
                    guidance_scale=3.5, memory_guidance_scale=scale, generator=torch.Generator().manual_seed(3),
                    output_type="latent", **extra).frames

    off = run(1.0, memory_images=memory)
    assert calls == [(5, 2), (5, 2)]  # text and negative prompt, both with the 2 memory frames
    one_more = run(2.0, memory_images=memory)
    # One more call per step: the shot's 3 latent frames alone, with the stock (memory-free) positions.
    assert calls == [(5, 2), (5, 2), (3, 0)]
    assert pipe.transformer.rope.num_memory_frames == 0
    two_more = run(3.0, memory_images=memory)
    assert not torch.allclose(off, one_more)
    # The step is affine in the prediction, and the prediction in the scale: equal steps of the scale move
    # the result by equal amounts.
    torch.testing.assert_close(two_more - one_more, one_more - off, rtol=1e-4, atol=1e-5)
    # Without memory there is nothing to guide towards: the scale changes nothing and costs no call.
    assert torch.equal(run(3.0), run(1.0))
    assert calls == [(3, 0), (3, 0)]

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=10), "4n\\+1"),
        (dict(height=40), "divisible by 16"),
        (dict(width=24), "divisible by 16"),
        (dict(motion_frames=[np.zeros((32, 32, 3), np.uint8), Image.new("RGB", (32, 32))]), "mixes image types"),
        (dict(memory_images=[torch.zeros(32, 32, 3)]), "3xHxW"),
        (dict(memory_images=np.zeros((2, 3, 32, 32), np.uint8)), "\\[N, H, W, 3\\]"),
        (dict(memory_images=[np.zeros((32, 32), np.uint8)]), "HxWx3"),
        (dict(memory_images=["frame.png"]), "PIL image, a numpy array or a torch tensor"),
        (dict(memory_images=[np.full((32, 32, 3), 2.0, np.float32)]), "\\[0, 1\\]"),
        (dict(first_frame=np.zeros((32, 32, 3), np.uint8), motion_frames=[np.zeros((32, 32, 3), np.uint8)] * 5),
         "not both"),
        (dict(memory_rope="sideways"), "memory_rope"),
        (dict(memory_guidance_scale=-1.0), "memory_guidance_scale"),
        (dict(memory_guidance_scale=float("nan")), "memory_guidance_scale"),
    ],
)
def test_bad_input(tiny_pipe, kwargs, match):
    args = dict(prompt=PROMPT, height=H, width=W, num_frames=F, num_inference_steps=1, output_type="latent")
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_pipe(**args)


def test_from_pretrained_local_wan_folder_and_components(tmp_path):
    stock = WanImageToVideoPipeline(**build_tiny_components(seed=0))
    stock.save_pretrained(tmp_path / "wan")
    pipe = StoryMemPipeline.from_pretrained(tmp_path / "wan")
    pipe.set_progress_bar_config(disable=True)
    from storymem.rope import MemoryRotaryPosEmbed

    assert isinstance(pipe.transformer.rope, MemoryRotaryPosEmbed)
    assert isinstance(pipe.transformer_2.rope, MemoryRotaryPosEmbed)
    assert pipe.config.boundary_ratio == 0.9
    kwargs = dict(prompt=PROMPT, memory_images=[_image(0)], height=H, width=W, num_frames=F, num_inference_steps=2,
                  output_type="latent")
    a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    b = StoryMemPipeline(**stock.components)(generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.testing.assert_close(a, b)


def test_cache_hooks_and_attention_backend(tiny_pipe):
    from diffusers import FirstBlockCacheConfig

    kwargs = dict(prompt=PROMPT, memory_images=[_image(0), _image(1)], height=H, width=W, num_frames=F,
                  num_inference_steps=4, output_type="latent")
    reference = tiny_pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    tiny_pipe.transformer.set_attention_backend("native")
    same = tiny_pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.testing.assert_close(same, reference)
    for model in (tiny_pipe.transformer, tiny_pipe.transformer_2):
        model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    cached = tiny_pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert cached.shape == reference.shape and torch.isfinite(cached).all()


def _wan21_image_components():
    """Wan2.1-I2V's extra components, tiny: a CLIP vision tower and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=8, intermediate_size=16, projection_dim=8, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=16)
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    return dict(image_encoder=CLIPVisionModelWithProjection(config).eval(), image_processor=processor)


def test_wan21_image_encoder_is_refused_when_built(tmp_path):
    components = build_tiny_components(seed=0)
    extra = _wan21_image_components()
    with pytest.raises(ValueError, match=r"does not use image_encoder / image_processor \(Wan2.1-I2V's CLIP"):
        StoryMemPipeline(**components, **extra)
    with pytest.raises(ValueError, match=r"does not use image_processor .*image_processor=None$"):
        StoryMemPipeline(**components, image_processor=extra["image_processor"])

    # A saved Wan2.1-style folder is refused by from_pretrained too; a Wan2.2 one (no image encoder) loads.
    WanImageToVideoPipeline(**build_tiny_components(seed=0), **extra).save_pretrained(tmp_path / "wan21")
    with pytest.raises(ValueError, match="image_encoder"):
        StoryMemPipeline.from_pretrained(tmp_path / "wan21")
    WanImageToVideoPipeline(**build_tiny_components(seed=0)).save_pretrained(tmp_path / "wan22")
    pipe = StoryMemPipeline.from_pretrained(tmp_path / "wan22")
    assert pipe.image_encoder is None and pipe.image_processor is None


def test_overridden_steps_take_storymem_arguments(tiny_pipe):
    # diffusers' image-to-video versions of these steps cannot be reached through the pipeline.
    with pytest.raises(ValueError, match="motion_frames"):
        tiny_pipe.check_inputs(PROMPT, None, H, W, F, motion_frames=[_image(0)] * F)
    noise = tiny_pipe.prepare_latents(1, 16, 5, H, W, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(noise, randn_tensor((1, 16, 5, H // 8, W // 8), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="memory frames included"):
        tiny_pipe.prepare_latents(1, 16, 5, H, W, torch.float32, "cpu", None, latents=torch.zeros(1, 16, 3, 4, 4))
    with pytest.raises(NotImplementedError, match="no image encoder"):
        tiny_pipe.encode_image(Image.new("RGB", (W, H)))
