"""Training the small world's base video model from scratch: VAE, text encoder and one Wan transformer.

The base is what Wan2.2-I2V is to the real StoryMem: a text-and-image-to-video model that knows nothing of
memory. It is built from the same diffusers/transformers classes (``AutoencoderKLWan`` with 4x spatial and 4x
temporal compression, a small ``UMT5EncoderModel`` over the toy world's word tokenizer, one
``WanTransformer3DModel`` expert) and trained on procedurally rendered shape clips:

1. **VAE** on short windows of the clips (reconstruction, with the saturated character pixels weighted up,
   plus a small KL term); the latents' per-channel mean and std then go into the VAE config, where Wan
   pipelines read them.
2. **Transformer and text encoder** on the clips' normalised latents with the rectified-flow velocity loss of
   :func:`storymem.training.loss.flow_matching_loss` (the memory-free layout): half the batches are
   text-to-video (the all-zeros M2V condition), half image-to-video (first frame given); captions are
   dropped to the empty prompt for classifier-free guidance; an EMA of the weights is what gets saved.

The result is a diffusers folder ``StoryMemPipeline.from_pretrained`` loads (``infer_story.py --base DIR``,
``train_lora.py ... --base DIR``), stored in float16 to keep it small::

    python -m research.small_world.train_base --out runs/vae --vae-only --vae-window 5 --vae-minutes 5
    python -m research.small_world.train_base --out runs/base --vae-init runs/vae/stages/vae --vae-window 17 \
        --vae-minutes 2.5 --minutes 4

``--init BASE`` continues from a saved base on fresh clips (``--seed``): the text encoder and transformer train
on, the VAE is kept, or fine-tuned first with ``--retrain-vae`` (the transformer then trains on its new latents);
``--vae-decoder-only`` tunes only the decoder, so the latent space, and every transformer trained on it, stay
valid. Runs stay short (a GPU lease, a preemptible job) and chain::

    python -m research.small_world.train_base --out runs/more --init runs/base/base --seed 3 --minutes 7.5

``--cut-prob P`` makes a share P of the clips cut once, between two latent frames, to the same character in
another clip (scene, place, motion), captioned "... then the same character ...". Single shots only ever ask the
model to redraw a character where the first frame has it; after a cut it has to find the character in earlier
frames and draw it somewhere else, which is what reading memory needs (an adapter cannot route memory into a
skill the base does not have).

The VAE learns frames in two phases: short windows (the first frame and one causal chunk) are cheap and teach
the spatial code; whole clips then teach the steady state of the causal temporal cache, which short windows
never reach (a VAE trained on 5-frame windows alone reconstructs frames 0-4 at 25-27 dB and frames 9-16 at
7-10 dB). Stages resume: a finished VAE in ``OUT/stages/vae`` is reused unless ``--retrain-vae``.

Continuations run data-parallel over several GPUs under torchrun (the text encoder and transformer; the VAE
trains in one process)::

    torchrun --nproc-per-node 4 -m research.small_world.train_base --out runs/more --init runs/base/base --seed 3 \
        --minutes 7.5 --batch-size 256

Each process renders ``--num-clips`` clips of its own (rank 0 from ``--seed``, rank r from ``seed * 1000 + r``)
and draws ``--batch-size`` of them a step; gradients are averaged, so a step sees N times the batch. The
learning-rate schedule follows the slowest process's clock, and rank 0 saves.

The clips come from :mod:`.base_clips`, the training steps from :mod:`.base_steps`; this module holds the
settings, builds or loads the model, runs the stages and saves the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from storymem.atomic import atomic_write_json
from storymem.devices import default_device

from .base_clips import CAPTION_MODES, check_mode_probs, render_reference_frames, render_training_clips
from .base_steps import (
    Processes,
    encode_clips,
    encode_reference_frames,
    init_processes,
    reconstruction_psnr,
    set_latent_statistics,
    train_transformer,
    train_vae,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ToyBaseConfig",
    "build_base_components",
    "load_base_components",
    "main",
    "save_base",
    "story_identities",
    "train_base",
]


@dataclass
class ToyBaseConfig:
    """Sizes and training settings of the small world's base model."""

    # clips
    height: int = 64
    width: int = 64
    num_frames: int = 17
    num_clips: int = 12000
    caption_mode_probs: tuple = (0.5, 0.25, 0.15, 0.1)  # first, named, returns, same
    # Share of clips that cut once to the same character in another scene (see cut_clip): the base then learns
    # to find a character in one place and draw it in another, which memory needs and single shots never ask.
    cut_prob: float = 0.0
    # Caption modes of the part before a cut. Mostly "same": when the caption names the character, the model
    # can draw it after the cut from the text alone and never has to look back at the frames.
    cut_caption_mode_probs: tuple = (0.1, 0.05, 0.1, 0.75)  # first, named, returns, same
    exclude: list = field(default_factory=list)  # identity keys kept out of training (held-out stories)
    # Share of steps in the memory layout of M2V (storymem.conditioning, negative RoPE): memory frames of the
    # clip's character drawn in other clips, before the clip. A big model brings this skill from pretraining on
    # real video; the small base has to be taught it, or an adapter has nothing to route memory into.
    memory_prob: float = 0.0
    memory_frames: int = 4  # reference frames per clip (two from each of two other clips); a step uses 1..this
    # Share of memory steps with a frame of another character among the references, the caption naming the
    # clip's character: a story's bank holds every character so far, and the prompt says which one is meant.
    memory_distractor_prob: float = 0.0
    # On image-to-video and memory steps, the share of captions replaced by their referential form ("the same
    # character ..."): with a caption that names the character, the model can draw it from the text and never
    # learns to carry it over from the frames.
    referential_prob: float = 0.0
    freeze_text_encoder: bool = False  # train the transformer only (prompt embeddings of the base stay valid)
    # VAE
    vae_base_dim: int = 16
    vae_dim_mult: tuple = (1, 2, 4)
    z_dim: int = 16
    vae_steps: int = 3000
    vae_batch_size: int = 32
    vae_window: int = 9  # frames per training window (4n+1): the first frame and two causal chunks
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6
    character_weight: float = 4.0  # extra reconstruction weight on saturated (character) pixels
    vae_decoder_only: bool = False  # train the decoder only: the latent space (and a transformer on it) stays valid
    # text encoder
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # transformer
    heads: int = 4
    head_dim: int = 48
    layers: int = 8
    ffn_dim: int = 768
    freq_dim: int = 64
    flow_shift: float = 3.0
    steps: int = 20000
    batch_size: int = 64
    lr: float = 4e-4
    warmup_steps: int = 500
    i2v_prob: float = 0.5
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0

    def validate(self):
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}")
        for name in ("num_frames", "vae_window"):
            value = getattr(self, name)
            if value < 5 or (value - 1) % 4:
                raise ValueError(f"{name} must be 4n+1 and >= 5, got {value}")
        if self.vae_window > self.num_frames:
            raise ValueError(f"vae_window ({self.vae_window}) is longer than the clips ({self.num_frames})")
        for name in ("caption_mode_probs", "cut_caption_mode_probs"):
            check_mode_probs(getattr(self, name), name)
        for name in ("cut_prob", "memory_prob", "memory_distractor_prob", "referential_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.memory_prob and self.memory_frames < 1:
            raise ValueError(f"memory_frames must be >= 1 when memory_prob > 0, got {self.memory_frames}")
        if self.cut_prob and self.num_frames < 9:
            raise ValueError(f"a cut needs num_frames >= 9 (two latent frames before it, one after), "
                             f"got {self.num_frames}")
        if (self.head_dim // 6) * 4 >= self.head_dim:
            raise ValueError(f"head_dim {self.head_dim} leaves no rope channels for time")

    @property
    def spatial_scale(self) -> int:
        return 2 ** (len(self.vae_dim_mult) - 1)


# ---------------------------------------------------------------------------------------------- models
def build_base_components(config: ToyBaseConfig, seed: int = 0) -> dict:
    """Untrained components of the base model (StoryMemPipeline keyword arguments)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from storymem.builtin.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        downsamples = len(config.vae_dim_mult) - 1
        vae = AutoencoderKLWan(base_dim=config.vae_base_dim, z_dim=config.z_dim, dim_mult=list(config.vae_dim_mult),
                               num_res_blocks=1, temperal_downsample=[True] * downsamples,
                               scale_factor_spatial=config.spatial_scale,
                               latents_mean=[0.0] * config.z_dim, latents_std=[1.0] * config.z_dim)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=config.text_dim, d_kv=config.text_dim // config.text_heads,
            d_ff=4 * config.text_dim, num_layers=config.text_layers, num_heads=config.text_heads,
            relative_attention_num_buckets=16, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        ))
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=config.heads, attention_head_dim=config.head_dim,
            in_channels=2 * config.z_dim + 4, out_channels=config.z_dim, text_dim=config.text_dim,
            freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=256, image_dim=None,
        )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=config.flow_shift, num_train_timesteps=1000)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer, transformer_2=None, boundary_ratio=None)


def load_base_components(folder) -> dict:
    """The trained VAE, text encoder and transformer of a base folder, in float32 (to train further)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    folder = Path(folder)
    for name in ("vae", "text_encoder", "transformer"):
        if not (folder / name / "config.json").is_file():
            raise FileNotFoundError(f"{folder / name / 'config.json'} is missing: --init needs a base folder "
                                    "(OUT/base of train_base)")
    return dict(vae=AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval(),
                text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32),
                transformer=WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- driver
def save_base(components: dict, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the base as a diffusers folder (safetensors, ``dtype``) that StoryMemPipeline loads."""
    from storymem.pipeline import StoryMemPipeline

    pipe = StoryMemPipeline(**components)
    pipe.to("cpu")
    for name in ("vae", "text_encoder", "transformer"):
        getattr(pipe, name).to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in ("vae", "text_encoder", "transformer"):
        getattr(pipe, name).to(torch.float32)
    return out_dir


def train_base(config: ToyBaseConfig, out_dir, device: str = "cpu", workers: int = 1,
               vae_minutes: Optional[float] = None, minutes: Optional[float] = None,
               retrain_vae: bool = False, vae_init: Optional[str] = None, vae_only: bool = False,
               init: Optional[str] = None, processes: Processes = Processes()) -> dict:
    """The whole recipe: render clips, train (or reuse) the VAE, encode, train the transformer, save.

    ``vae_init``: a VAE folder to start VAE training from (e.g. one trained on shorter windows).
    ``init``: a base folder (``OUT/base`` of an earlier run) to continue from: its text encoder and transformer
    are trained further, and its VAE is kept as it is unless ``retrain_vae`` (then it is where VAE training
    starts). The clips come from ``config.seed``, so a continuation with another seed sees new clips.
    ``processes`` (see :func:`init_processes`): a data-parallel continuation; only rank 0 writes."""
    from diffusers import AutoencoderKLWan

    from storymem.conditioning import encode_video_condition

    config.validate()
    out_dir = Path(out_dir)
    vae_dir = out_dir / "stages" / "vae"
    trains_vae = retrain_vae or vae_only or (init is None and not (vae_dir / "config.json").is_file())
    if processes.world > 1 and trains_vae:
        raise ValueError(f"{out_dir}: a run of {processes.world} processes trains the text encoder and transformer "
                         "only; train the VAE in one process, then continue with --init (without --retrain-vae "
                         "or --vae-only)")
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    clip_seed = config.seed if processes.rank == 0 else config.seed * 1000 + processes.rank
    frames, captions, identities, referential = render_training_clips(
        config.num_clips, config.num_frames, config.height, config.width, seed=clip_seed, exclude=config.exclude,
        mode_probs=config.caption_mode_probs, workers=workers, cut_prob=config.cut_prob,
        cut_mode_probs=config.cut_caption_mode_probs)
    clips = torch.from_numpy(frames)
    if device.startswith("cuda"):
        clips = clips.pin_memory()
    references = None
    if config.memory_prob:
        references = render_reference_frames(identities, config.memory_frames, config.num_frames, config.height,
                                             config.width, seed=clip_seed, workers=workers)
    logger.info("rendered %d clips in %.1f s", len(captions), time.perf_counter() - t0)
    components = build_base_components(config, seed=config.seed)
    if init is not None:
        components.update(load_base_components(init))
        summary_init = {"init": str(init)}
    else:
        summary_init = {}
        if vae_init is None and retrain_vae:
            vae_init = str(Path(init) / "vae")

    summary = {"config": dataclasses.asdict(config), "clips": len(captions),
               "identities": len(set(identities)), **summary_init}
    if processes.world > 1:
        summary["processes"] = processes.world  # clips and identities: rank 0's
    if vae_init is not None and retrain_vae is False and (vae_dir / "config.json").is_file():
        raise ValueError(f"{vae_dir} already holds a trained VAE; pass retrain_vae=True to train from {vae_init}")
    if (vae_dir / "config.json").is_file() and not retrain_vae:
        components["vae"] = AutoencoderKLWan.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
        summary["vae"] = {"reused": str(vae_dir)}
        logger.info("reusing the VAE in %s", vae_dir)
    elif init is not None and not retrain_vae:
        summary["vae"] = {"reused": str(Path(init) / "vae")}
        logger.info("keeping the VAE of %s", init)
    else:
        if vae_init is not None:
            components["vae"] = AutoencoderKLWan.from_pretrained(vae_init, torch_dtype=torch.float32)
            summary["vae_init"] = str(vae_init)
        t = time.perf_counter()
        vae_losses = train_vae(components["vae"], clips, config, device, minutes=vae_minutes)
        if not config.vae_decoder_only:  # the encoder, and so the latents' statistics, are unchanged otherwise
            set_latent_statistics(components["vae"], clips[: min(len(clips), 1024)], device)
        components["vae"].to("cpu").save_pretrained(vae_dir, safe_serialization=True)
        summary["vae"] = {"steps": len(vae_losses), "seconds": round(time.perf_counter() - t, 1),
                          "loss_first": vae_losses[0], "loss_last100": float(np.mean(vae_losses[-100:]))}
        # Held-out clips (another seed) for the reconstruction figure.
        held_out, _, _, _ = render_training_clips(64, config.num_frames, config.height, config.width,
                                               seed=config.seed + 10_000, exclude=config.exclude)
        summary["vae"].update(reconstruction_psnr(components["vae"].to(device), torch.from_numpy(held_out), device))
        logger.info("vae: %s", summary["vae"])
    if vae_only:
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out_dir / "train_base_summary.json", summary)
        return summary
    vae = components["vae"].to(device).eval().requires_grad_(False)
    t = time.perf_counter()
    latents, i2v_conditions = encode_clips(vae, clips, device)
    m2v = encode_video_condition(vae, None, config.num_frames, config.height, config.width, device=device)
    memory_latents = None if references is None else encode_reference_frames(vae, references, device)
    summary["encode_seconds"] = round(time.perf_counter() - t, 1)
    del clips, frames, references

    t = time.perf_counter()
    losses = train_transformer(components, latents, i2v_conditions, m2v, captions, config, device, minutes=minutes,
                               processes=processes, referential_captions=referential, memory_latents=memory_latents)
    summary["transformer"] = {"steps": len(losses), "seconds": round(time.perf_counter() - t, 1),
                              "loss_first100": float(np.mean(losses[:100])),
                              "loss_last500": float(np.mean(losses[-500:]))}
    if processes.rank != 0:
        return summary
    components["vae"] = vae.to("cpu")
    save_base(components, out_dir / "base")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out_dir / "train_base_summary.json", summary)
    return summary


BOOL_FIELDS = ("vae_decoder_only", "freeze_text_encoder")  # store_true flags of the command line


def _probs(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m research.small_world.train_base",
                                 description="Train the small world's base video model (VAE, text encoder, "
                                             "transformer) and save it as a diffusers folder.")
    ap.add_argument("--out", required=True, help="output folder (the model goes to OUT/base)")
    ap.add_argument("--device", default=default_device().type)
    ap.add_argument("--workers", type=int, default=1, help="processes rendering the training clips")
    ap.add_argument("--exclude-stories", help="a toy story set (index.json folder) whose characters stay out")
    ap.add_argument("--vae-minutes", type=float, help="stop VAE training after this long")
    ap.add_argument("--minutes", type=float, help="stop transformer training after this long")
    ap.add_argument("--retrain-vae", action="store_true")
    ap.add_argument("--vae-init", help="VAE folder to start VAE training from")
    ap.add_argument("--vae-only", action="store_true", help="stop after the VAE stage (OUT/stages/vae)")
    ap.add_argument("--vae-decoder-only", action="store_true",
                    help="train the VAE decoder only (the latent space, and a transformer on it, stay valid)")
    ap.add_argument("--init", help="base folder (OUT/base of an earlier run) to continue training from")
    ap.add_argument("--freeze-text-encoder", action="store_true",
                    help="train the transformer only (the base's prompt embeddings stay valid)")
    for f in dataclasses.fields(ToyBaseConfig):
        if f.type in ("int", "float") or f.type in (int, float):
            ap.add_argument("--" + f.name.replace("_", "-"), type=float if "float" in str(f.type) else int)
    for name in ("caption_mode_probs", "cut_caption_mode_probs"):
        ap.add_argument("--" + name.replace("_", "-"), type=_probs, metavar="P,P,P,P",
                        help=f"probabilities of the caption modes {', '.join(CAPTION_MODES)}")
    return ap.parse_args(argv)


def story_identities(stories_dir) -> list[str]:
    """Every identity key of a toy story set (``index.json`` of :func:`.datasets.make_story_set`)."""
    path = Path(stories_dir) / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        return sorted({key for story in index["stories"] for key in story["identities"].values()})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a toy story set index ({err})") from None


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToyBaseConfig)
                 if getattr(args, f.name, None) is not None and f.name not in BOOL_FIELDS}
    overrides.update({name: getattr(args, name) for name in BOOL_FIELDS})
    config = ToyBaseConfig(**overrides)
    if args.exclude_stories:
        config.exclude = story_identities(args.exclude_stories)
    processes, device = init_processes(args.device)
    try:
        summary = train_base(config, args.out, device=device, workers=args.workers, vae_minutes=args.vae_minutes,
                             minutes=args.minutes, retrain_vae=args.retrain_vae, vae_init=args.vae_init,
                             vae_only=args.vae_only, init=args.init, processes=processes)
    finally:
        if processes.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if processes.rank == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
