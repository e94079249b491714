"""ST-Bench evaluation of rendered stories: ``storymem eval RENDER_DIR`` (:mod:`storymem.evaluation.cli`).

* :mod:`~storymem.evaluation.metrics` - inputs (`collect_shots`), `evaluate`, cross-shot consistency;
* :mod:`~storymem.evaluation.encoders` - video-text encoders (open_clip, ViCLIP, a pixel/bag-of-words one) and
  aesthetic scorers (LAION, HPSv3);
* :mod:`~storymem.evaluation.report` - the table, the JSON report and the similarity chart;
* :mod:`~storymem.evaluation.benchmark` - a batch folder's stories scored into one benchmark table;
* :mod:`~storymem.evaluation.compare` - two benchmark tables side by side (``storymem eval --compare A B``).
"""

from .benchmark import (
    BENCHMARK_NAME,
    BatchInputs,
    collect_batch,
    evaluate_batch,
    format_benchmark,
    is_batch_folder,
    plot_benchmark,
    write_benchmark,
)
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
from .compare import compare_tables, format_comparison, load_table
from .report import format_report, plot_similarity, write_report

__all__ = [
    "BENCHMARK_NAME",
    "BatchInputs",
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
    "collect_batch",
    "collect_shots",
    "compare_tables",
    "consistency_pairs",
    "cross_shot_consistency",
    "evaluate",
    "evaluate_batch",
    "format_benchmark",
    "format_comparison",
    "format_report",
    "is_batch_folder",
    "load_aesthetic_head",
    "load_table",
    "main",
    "plot_benchmark",
    "plot_similarity",
    "sample_frame_indices",
    "write_benchmark",
    "write_report",
]
