"""Tiny Wan2.2-I2V components built from configs in code: same diffusers/transformers classes as the real
model (AutoencoderKLWan, WanTransformer3DModel x2, UMT5EncoderModel, a UMT5-style tokenizer), sized for CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

__all__ = ["TinyConfig", "build_tiny_components", "build_tokenizer", "TOY_VOCABULARY"]

# Words the toy world's captions use; anything else maps to <unk> (lower-cased, punctuation split off).
TOY_VOCABULARY = """
a an the same one two three of in on at to into from with and then again back while as is are it its
this that there here by near over under behind front left right up down through across around
character characters shape circle square triangle star diamond hexagon cross ring heart moon
red orange yellow green blue purple pink white black gray brown cyan
striped dotted plain checkered spotted solid hat crown scarf glasses bow cape
walks runs jumps moves slides spins stands sits waits looks turns enters leaves returns appears meets
slowly quickly
desert forest beach city snow night meadow cave ocean mountain room street garden space sky field
tree house rock cloud sun lamp tower bridge flower
scene shot story wide close medium camera view
""".split()

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def build_tokenizer(vocabulary=None):
    """A word-level tokenizer with T5's special tokens (pad=0, eos=1, unk=2), built offline."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(SPECIAL_TOKENS + list(vocabulary or TOY_VOCABULARY)))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


@dataclass
class TinyConfig:
    """Sizes of the tiny model. Defaults keep a forward at 32x32x9 well under a second on one CPU core."""

    text_dim: int = 32
    text_layers: int = 2
    heads: int = 2
    head_dim: int = 12
    ffn_dim: int = 64
    layers: int = 2
    vae_base_dim: int = 8
    two_experts: bool = True
    boundary_ratio: float = 0.9
    flow_shift: float = 4.0
    rope_max_seq_len: int = 64
    extra: dict = field(default_factory=dict)


def build_tiny_components(config: TinyConfig | None = None, seed: int = 0) -> dict:
    """Components for :class:`storymem.StoryMemPipeline` / ``WanImageToVideoPipeline``, random weights."""
    config = config or TinyConfig()
    tokenizer = build_tokenizer()
    # Seeded initialisation without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(config, tokenizer)


def _build(config: TinyConfig, tokenizer) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    vae = AutoencoderKLWan(base_dim=config.vae_base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=config.text_dim, d_kv=8, d_ff=2 * config.text_dim,
        num_layers=config.text_layers, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=config.heads, attention_head_dim=config.head_dim,
            in_channels=36, out_channels=16, text_dim=config.text_dim, freq_dim=32, ffn_dim=config.ffn_dim,
            num_layers=config.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=config.rope_max_seq_len, image_dim=None,
        )

    high = transformer()
    low = transformer() if config.two_experts else None
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=config.flow_shift, num_train_timesteps=1000)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler,
                transformer=high.eval(), transformer_2=None if low is None else low.eval(),
                boundary_ratio=config.boundary_ratio if config.two_experts else None)


def caption_words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())
