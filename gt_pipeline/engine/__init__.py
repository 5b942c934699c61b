"""Training and evaluation engines: plain PyTorch, no Dagster (assets call into them)."""
from gt_pipeline.engine.train import TrainConfig, TrainResult, TrainingDiverged, train  # noqa: F401
