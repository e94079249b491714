"""The published M2V release's defaults and the layout constants: defined here once, imported everywhere.

See ``docs/design.md`` for where each comes from.
"""

from __future__ import annotations

__all__ = [
    "WAN_I2V_BASE", "WAN_T2V_BASE", "FRAMES", "FPS", "AREA", "HEIGHT", "WIDTH", "STEPS", "GUIDANCE", "FLOW_SHIFT",
    "BOUNDARY_RATIO", "MAX_MEMORY", "SINK", "MOTION_FRAMES", "ROPE_STRIDE", "KEYFRAME_THRESHOLD",
    "T2V_FLOW_SHIFT", "T2V_GUIDANCE", "T2V_GUIDANCE_2", "WAN_NEGATIVE_PROMPT", "RELEASE_DEFAULTS",
]

WAN_I2V_BASE = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
WAN_T2V_BASE = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"

FRAMES = 81  # frames per shot (5 s at 16 fps; 21 latent frames)
FPS = 16
AREA = 832 * 480  # pixel area; height/width follow the conditioning image's aspect ratio
HEIGHT, WIDTH = 480, 832  # the size at that area without a conditioning image (landscape)
STEPS = 40
GUIDANCE = 3.5  # both experts
FLOW_SHIFT = 4.0  # UniPC flow shift of the M2V release (plain Wan2.2-I2V uses 5.0)
BOUNDARY_RATIO = 0.9  # high-noise expert for t >= 0.9 * 1000
MAX_MEMORY = 10  # memory frames a shot sees at most (the release's example; 8 on its CLI)
SINK = 3  # oldest memory frames always kept
MOTION_FRAMES = 5  # MM2V conditions on the previous shot's last 5 frames
ROPE_STRIDE = 5  # time gap between memory frames at negative RoPE positions
KEYFRAME_THRESHOLD = 0.9  # initial CLIP similarity threshold of the keyframe rule

# Wan2.2-T2V-A14B's own sampling defaults (first shot): shift 12, guidance 4.0 high-noise / 3.0 low-noise.
T2V_FLOW_SHIFT = 12.0
T2V_GUIDANCE = 4.0
T2V_GUIDANCE_2 = 3.0

# Wan's default negative prompt (sample_neg_prompt of the Wan2.x configs), the release's default.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

RELEASE_DEFAULTS = dict(
    num_frames=FRAMES, fps=FPS, area=AREA, num_inference_steps=STEPS, flow_shift=FLOW_SHIFT,
    guidance_scale=GUIDANCE, boundary_ratio=BOUNDARY_RATIO, motion_frames=MOTION_FRAMES,
)
