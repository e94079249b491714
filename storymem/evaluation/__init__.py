"""ST-Bench evaluation of rendered stories: ``storymem eval RENDER_DIR`` (:mod:`storymem.evaluation.cli`).

* :mod:`~storymem.evaluation.metrics` - inputs (`collect_shots`), `evaluate`, cross-shot consistency;
* :mod:`~storymem.evaluation.encoders` - video-text encoders (open_clip, ViCLIP, a pixel/bag-of-words one) and
  aesthetic scorers (LAION, HPSv3);
* :mod:`~storymem.evaluation.report` - the table, the JSON report and the similarity chart.
"""

from .cli import EvalOptions, build_aesthetic, build_encoder, build_parser, main
from .encoders import (
    CLIP_MEAN,
    CLIP_STD,
    EvalError,
    FrameScorer,
    HPSv3FrameScorer,
    LaionAestheticScorer,
    OpenCLIPVideoEncoder,
    PixelBagOfWordsEncoder,
    ViCLIPEncoder,
    ViCLIPVisionTransformer,
    VideoTextEncoder,
    clip_center_crop,
    load_aesthetic_head,
    sample_frame_indices,
)
from .metrics import (
    EvalConfig,
    EvalInputs,
    ShotVideo,
    collect_shots,
    consistency_pairs,
    cross_shot_consistency,
    evaluate,
)
from .report import format_report, plot_similarity, write_report

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "EvalConfig",
    "EvalError",
    "EvalInputs",
    "EvalOptions",
    "FrameScorer",
    "HPSv3FrameScorer",
    "LaionAestheticScorer",
    "OpenCLIPVideoEncoder",
    "PixelBagOfWordsEncoder",
    "ShotVideo",
    "ViCLIPEncoder",
    "ViCLIPVisionTransformer",
    "VideoTextEncoder",
    "build_aesthetic",
    "build_encoder",
    "build_parser",
    "clip_center_crop",
    "collect_shots",
    "consistency_pairs",
    "cross_shot_consistency",
    "evaluate",
    "format_report",
    "load_aesthetic_head",
    "main",
    "plot_similarity",
    "sample_frame_indices",
    "write_report",
]
