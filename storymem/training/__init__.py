"""Training StoryMem adapters on clusters of single-shot clips (``storymem prepare`` / ``storymem train``).

    from storymem.training import PrepareConfig, prepare_dataset, TrainConfig, train

    prepare_dataset(PrepareConfig(output_dir="data/prepared", clips_dir="data/clips"))
    train(TrainConfig(lora_config="lora_configs/mi2v_rank128.json", data_dir="data/prepared",
                      output_dir="runs/high", expert="high"))

The base is Wan2.2-I2V-A14B (:data:`storymem.defaults.WAN_I2V_BASE`) unless ``base`` names another folder, hub
id or built-in base (``"toy"``, ``"tiny"``).

Heavy imports (diffusers, accelerate) happen when a name is first used.
"""

_LAZY = {
    "DataError": "storymem.training.errors",
    "TrainingConfigError": "storymem.training.errors",
    "TrainingDivergedError": "storymem.training.errors",
    "TrainingInterrupted": "storymem.training.errors",
    "PrepareConfig": "storymem.training.config",
    "TrainConfig": "storymem.training.config",
    "PrepareSummary": "storymem.training.prepare",
    "prepare_dataset": "storymem.training.prepare",
    "PreparedDataset": "storymem.training.cache",
    "cluster_embeddings": "storymem.training.clustering",
    "SampleSpec": "storymem.training.data",
    "MemoryBatchSampler": "storymem.training.data",
    "MemoryClipDataset": "storymem.training.data",
    "collate_samples": "storymem.training.data",
    "sample_timesteps": "storymem.training.flow",
    "expert_timestep_range": "storymem.training.flow",
    "flow_matching_loss": "storymem.training.loss",
    "build_training_condition": "storymem.training.loss",
    "TrainResult": "storymem.training.trainer",
    "train": "storymem.training.trainer",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'storymem.training' has no attribute {name!r}")
