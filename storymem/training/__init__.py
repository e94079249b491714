"""Training StoryMem adapters on clusters of single-shot clips (``train_lora.py``).

    from storymem.training import PrepareConfig, prepare_dataset, TrainConfig, train

    prepare_dataset(PrepareConfig(output_dir="data/prepared", clips_dir="data/clips", base="Wan-AI/..."))
    train(TrainConfig(lora_config="lora_configs/mi2v_rank128.json", data_dir="data/prepared",
                      output_dir="runs/high", base="Wan-AI/...", expert="high"))

Heavy imports (diffusers, accelerate) happen when a name is first used.
"""

_LAZY = {
    "DataError": "storymem.training.errors",
    "PrepareConfig": "storymem.training.cache",
    "PrepareSummary": "storymem.training.cache",
    "PreparedDataset": "storymem.training.cache",
    "prepare_dataset": "storymem.training.cache",
    "cluster_embeddings": "storymem.training.clustering",
    "SampleSpec": "storymem.training.data",
    "MemoryBatchSampler": "storymem.training.data",
    "MemoryClipDataset": "storymem.training.data",
    "collate_samples": "storymem.training.data",
    "sample_timesteps": "storymem.training.flow",
    "expert_timestep_range": "storymem.training.flow",
    "flow_matching_loss": "storymem.training.loss",
    "build_training_condition": "storymem.training.loss",
    "TrainConfig": "storymem.training.trainer",
    "TrainResult": "storymem.training.trainer",
    "train": "storymem.training.trainer",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'storymem.training' has no attribute {name!r}")
