"""HPSv3Scorer on a tiny random Qwen2-VL built offline: checkpoint mapping (transformers 4.45 layout ->
today's names), pooling at <|Reward|>, the HPSv3 message, batching, and clear errors for bad checkpoints."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from _memory_helpers import build_hpsv3_checkpoint, build_tiny_qwen2_vl_base, pan_video
from storymem.memory.hpsv3 import (
    HPSV3_INSTRUCTION,
    HPSV3_REWARD_PROMPT,
    HPSv3CheckpointError,
    HPSv3Scorer,
    convert_hpsv3_key,
    hpsv3_user_text,
)


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpsv3")
    build_tiny_qwen2_vl_base(root / "base")
    model, rm_head = build_hpsv3_checkpoint(root / "base", root / "HPSv3.safetensors")
    return root, model, rm_head


@pytest.fixture(scope="module")
def scorer(hpsv3_files):
    root, _, _ = hpsv3_files
    return HPSv3Scorer(root / "HPSv3.safetensors", base=root / "base", device="cpu", dtype=torch.float32,
                       batch_size=2).load()  # fmt: skip


def images(count=3, seed=0):
    return list(pan_video(num_frames=count, height=60, width=100, speed=9.0, seed=seed))


def manual_rewards(scorer, model, rm_head, image, prompt=""):
    """HPSv3's forward written out on the stock transformers model the checkpoint was made from."""
    batch = scorer.prepare_inputs([image], [prompt])
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)  # HPSv3: plain positions
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=positions,
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                             use_cache=False).last_hidden_state  # fmt: skip
        where = (ids[0] == scorer.reward_token_id).nonzero()[:, 0]
        assert where.numel() == 1
        return rm_head(hidden[0, where[0]].float())


def test_scores_match_a_manual_forward(hpsv3_files, scorer):
    _, model, rm_head = hpsv3_files
    frames = images(3)
    rewards = scorer.rewards(frames)
    assert rewards.shape == (3, 2)
    for i, frame in enumerate(frames):
        torch.testing.assert_close(rewards[i], manual_rewards(scorer, model, rm_head, frame), atol=1e-4, rtol=1e-4)
    assert scorer.score(frames) == pytest.approx(rewards[:, 0].tolist())  # mu, not sigma
    assert not torch.allclose(rewards[:, 0], rewards[:, 1])
    assert len(set(round(s, 6) for s in scorer.score(frames))) == 3  # the image matters


def test_pooling_is_at_the_reward_token(hpsv3_files, scorer):
    _, model, rm_head = hpsv3_files
    frame = images(1)[0]
    batch = scorer.prepare_inputs([frame])
    ids = batch["input_ids"][0]
    where = int((ids == scorer.reward_token_id).nonzero()[0, 0])
    positions = torch.arange(ids.shape[0]).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=positions, pixel_values=batch["pixel_values"],
                             image_grid_thw=batch["image_grid_thw"]).last_hidden_state[0]  # fmt: skip
        at_token, before, last = (rm_head(hidden[i]) for i in (where, where - 1, -1))
        # Qwen2-VL's own 3D image positions (what transformers computes by default) give another result:
        # HPSv3's forward bypassed them, and so must ours.
        mrope_hidden = model.model(**batch).last_hidden_state[0]
        with_mrope = rm_head(mrope_hidden[where])
    ours = scorer.rewards([frame])[0]
    torch.testing.assert_close(ours, at_token, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, before, atol=1e-3) and not torch.allclose(ours, last, atol=1e-3)
    assert not torch.allclose(ours, with_mrope, atol=1e-3)


def test_message_layout(scorer):
    frame = images(1)[0]
    text = scorer.processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_user_text("a red cat")}]}]],
        tokenize=False, add_generation_prompt=True,
    )[0]  # fmt: skip
    assert text.index("<|vision_start|><|image_pad|><|vision_end|>") < text.index("Textual prompt - a red cat")
    ending = "Please provide the overall ratings of this image: <|Reward|>\n\nEND\n<|im_end|>\n<|im_start|>assistant\n"
    assert text.endswith(ending)
    assert hpsv3_user_text("") == HPSV3_INSTRUCTION.format(text_prompt="") + HPSV3_REWARD_PROMPT
    # The image is resized to Qwen's smart_resize size for exactly 256*28*28 pixels (min = max).
    batch = scorer.prepare_inputs([frame])
    t, h, w = batch["image_grid_thw"][0].tolist()
    assert (t, h * 14, w * 14) == (1, 364, 588)  # 60x100 -> 364x588 (214,032 px), as qwen-vl-utils computes it


def test_prompts_and_batching(scorer):
    frames = images(3, seed=1)
    prompts = ["a red cat", "", "the image of a red cat on a red cat"]  # different lengths: right padding
    batched = scorer.rewards(frames, prompts)
    single = torch.cat([scorer.rewards([f], [p]) for f, p in zip(frames, prompts)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scorer.rewards(frames[:1], ["a red cat"]), scorer.rewards(frames[:1], [""]))
    forwards = scorer.num_forwards
    scorer.score(frames)
    assert scorer.num_forwards - forwards == 2  # batch_size=2
    with pytest.raises(ValueError, match="exactly one"):
        scorer.score(frames[:1], ["<|Reward|>"])
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(frames, ["a"])
    with pytest.raises(ValueError, match="RGB"):
        scorer.score([np.zeros((30, 30, 4), np.uint8)])


def test_key_mapping():
    assert convert_hpsv3_key("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert convert_hpsv3_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert convert_hpsv3_key("model.norm.weight") == "model.language_model.norm.weight"
    assert convert_hpsv3_key("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert convert_hpsv3_key("model.visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"
    assert convert_hpsv3_key("rm_head.5.bias") == "rm_head.5.bias"
    assert convert_hpsv3_key("lm_head.weight") is None


def test_checkpoint_in_todays_layout_loads_too(hpsv3_files, scorer, tmp_path):
    root, _, _ = hpsv3_files
    state = {convert_hpsv3_key(k) or k: v for k, v in load_file(str(root / "HPSv3.safetensors")).items()}
    save_file(state, str(tmp_path / "HPSv3.safetensors"))
    other = HPSv3Scorer(tmp_path, base=root / "base", device="cpu", dtype=torch.float32)  # a folder works
    frames = images(2)
    torch.testing.assert_close(other.rewards(frames), scorer.rewards(frames))


def _edited_checkpoint(root, tmp_path, edit):
    state = load_file(str(root / "HPSv3.safetensors"))
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return HPSv3Scorer(path, base=root / "base", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing keys: model.layers.1.mlp.up_proj.weight"),
        (lambda s: s.pop("visual.merger.mlp.0.bias"), "missing keys: visual.merger.mlp.0.bias"),
        (lambda s: s.pop("rm_head.3.weight"), "missing keys: rm_head.3.weight"),
        (lambda s: s.update({"rm_head.9.weight": torch.zeros(2)}), "unexpected keys: rm_head.9.weight"),
        (lambda s: s.update({"score.weight": torch.zeros(2)}), "unexpected keys: score.weight"),
        (lambda s: s.update({"rm_head.0.weight": torch.zeros(1024, 7)}), r"mismatch: rm_head.0.weight \(1024, 7\)"),
        (lambda s: s.update({"model.embed_tokens.weight": s["model.embed_tokens.weight"][:5]}), "has 5 rows"),
    ],
)
def test_bad_checkpoints(hpsv3_files, tmp_path, edit, message):
    root, _, _ = hpsv3_files
    scorer = _edited_checkpoint(root, tmp_path, edit)
    with pytest.raises(HPSv3CheckpointError, match=message):
        scorer.load()
    assert scorer.model is None


def test_missing_and_damaged_files(hpsv3_files, tmp_path):
    root, _, _ = hpsv3_files
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        HPSv3Scorer(tmp_path / "nothing.safetensors", base=root / "base")
    with pytest.raises(FileNotFoundError, match="no HPSv3.safetensors"):
        HPSv3Scorer(tmp_path, base=root / "base").load()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    with pytest.raises(HPSv3CheckpointError, match="broken.safetensors"):
        HPSv3Scorer(broken, base=root / "base", device="cpu").load()
