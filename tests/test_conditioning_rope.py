"""The memory-condition mask (as the published release builds it, literally) and the memory-aware rope."""

import pytest
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from storymem.conditioning import build_condition_mask, build_memory_condition
from storymem.rope import MemoryRotaryPosEmbed, install_memory_rope, memory_rope, time_positions
from storymem.builtin.tiny import build_tiny_components


def _design_mask(fm, num_frames, conditioned_video_frames):
    """The release's rule word for word: pixel-time mask of length fm + F, first fm+1 entries repeated 4 times."""
    pixel = [1.0] * fm + [1.0 if i in conditioned_video_frames else 0.0 for i in range(num_frames)]
    expanded = []
    for i, v in enumerate(pixel):
        expanded += [v] * (4 if i < fm + 1 else 1)
    f = (num_frames - 1) // 4 + 1
    return torch.tensor(expanded).view(fm + f, 4).transpose(0, 1)  # [4, fm+f]


@pytest.mark.parametrize("fm", [0, 1, 3, 10])
@pytest.mark.parametrize("mode,frames", [("m2v", set()), ("mi2v", {0}), ("mm2v", {0, 1, 2, 3, 4})])
def test_mask_matches_design(fm, mode, frames):
    mask = build_condition_mask(fm, 81, len(frames), 2, 3)
    assert mask.shape == (1, 4, fm + 21, 2, 3)
    torch.testing.assert_close(mask[0, :, :, 0, 0], _design_mask(fm, 81, frames), rtol=0, atol=0)
    per_frame = mask[0].amin(dim=(0, 2, 3))
    expected_ones = fm + {"m2v": 0, "mi2v": 1, "mm2v": 2}[mode]
    assert per_frame[:expected_ones].eq(1).all() and mask[0, :, expected_ones:].eq(0).all()


def test_build_memory_condition_concatenates_memory_first():
    mem = torch.randn(1, 16, 2, 4, 4)
    vid = torch.randn(3, 16, 3, 4, 4)
    cond = build_memory_condition(mem, vid, num_frames=9, num_context_frames=1)
    assert cond.tensor.shape == (3, 20, 5, 4, 4)
    assert torch.equal(cond.latents[:, :, :2], mem.expand(3, -1, -1, -1, -1))
    assert torch.equal(cond.latents[:, :, 2:], vid)
    with pytest.raises(ValueError, match="latent frames"):
        build_memory_condition(mem, vid, num_frames=13, num_context_frames=0)
    with pytest.raises(ValueError, match="grid"):
        build_memory_condition(torch.randn(1, 16, 2, 5, 4), vid, num_frames=9, num_context_frames=0)


def test_time_positions():
    assert time_positions(3, 4, "negative", 5).tolist() == [-15, -10, -5, 0, 1, 2, 3]
    assert time_positions(3, 4, "contiguous").tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert time_positions(0, 4, "negative").tolist() == [0, 1, 2, 3]
    assert time_positions(2, 1, "negative", 7).tolist() == [-14, -7, 0]
    with pytest.raises(ValueError):
        time_positions(1, 1, "backwards")


def _ropes():
    stock = WanRotaryPosEmbed(attention_head_dim=12, patch_size=(1, 2, 2), max_seq_len=64)
    return stock, MemoryRotaryPosEmbed.from_wan_rope(stock)


def test_no_memory_is_stock_bit_for_bit():
    stock, ours = _ropes()
    x = torch.zeros(1, 36, 5, 8, 12)
    for mode in ("negative", "contiguous"):
        ours.set_memory_layout(0, mode)
        for a, b in zip(stock(x), ours(x)):
            assert torch.equal(a, b)


def test_contiguous_is_stock_over_all_frames():
    stock, ours = _ropes()
    x = torch.zeros(1, 36, 7, 8, 12)
    ours.set_memory_layout(3, "contiguous")
    for a, b in zip(stock(x), ours(x)):
        assert torch.equal(a, b)


def test_negative_positions_are_exact():
    stock, ours = _ropes()
    fm, f, pph, ppw = 3, 4, 4, 6
    x = torch.zeros(1, 36, fm + f, 2 * pph, 2 * ppw)
    ours.set_memory_layout(fm, "negative", stride=5)
    cos, sin = ours(x)
    assert cos.shape == sin.shape == (1, (fm + f) * pph * ppw, 1, 12)
    # Time part computed directly at the explicit (negative) positions in float64, as diffusers does.
    pos = torch.tensor([-15.0, -10.0, -5.0, 0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    t_cos, t_sin = get_1d_rotary_pos_embed(ours.t_dim, pos, 10000.0, use_real=True, repeat_interleave_real=True,
                                           freqs_dtype=torch.float64)
    grid_cos = cos.view(fm + f, pph, ppw, 12)
    grid_sin = sin.view(fm + f, pph, ppw, 12)
    assert torch.equal(grid_cos[:, 0, 0, : ours.t_dim], t_cos)
    assert torch.equal(grid_sin[:, 0, 0, : ours.t_dim], t_sin)
    # The shot's own tokens keep exactly the positions a no-memory run gives them.
    stock_cos, stock_sin = stock(torch.zeros(1, 36, f, 2 * pph, 2 * ppw))
    assert torch.equal(cos[:, fm * pph * ppw :], stock_cos)
    assert torch.equal(sin[:, fm * pph * ppw :], stock_sin)
    # Height/width parts are the same for memory frames as for video frames.
    assert torch.equal(grid_cos[0, :, :, ours.t_dim :], grid_cos[fm, :, :, ours.t_dim :])


def test_installed_rope_keeps_transformer_output_and_cp_plan():
    components = build_tiny_components(seed=0)
    model = components["transformer"]
    x = torch.randn(1, 36, 3, 4, 4)
    text = torch.randn(1, 6, 32)
    t = torch.tensor([500])
    with torch.no_grad():
        before = model(x, t, text, return_dict=False)[0]
        rope = install_memory_rope(model)
        assert install_memory_rope(model) is rope and model.rope is rope
        after = model(x, t, text, return_dict=False)[0]
        with memory_rope(model, 1, "negative"):
            shifted = model(x, t, text, return_dict=False)[0]
        again = model(x, t, text, return_dict=False)[0]
    assert torch.equal(before, after) and torch.equal(before, again)
    assert not torch.allclose(before, shifted)
    # Context parallelism splits this module's two outputs along the sequence (dim 1), by its name.
    assert "rope" in type(model)._cp_plan
    cos, sin = rope(x)
    assert cos.ndim == 4 and cos.shape[1] == 3 * 2 * 2


def test_rope_guards():
    _, ours = _ropes()
    with pytest.raises(ValueError, match="exceed"):
        ours.set_memory_layout(20, "negative", stride=5)
    ours.set_memory_layout(3, "negative")
    with pytest.raises(ValueError, match="only 2 latent frames"):
        ours(torch.zeros(1, 36, 2, 4, 4))
