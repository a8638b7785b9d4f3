"""Optional experiment tracking: every metrics record also goes to TensorBoard event files
(`<run>/tensorboard/`) and/or the active MLflow experiment, as `<stage>/<split>/<metric>` scalars
at the stage's step. metrics.jsonl stays the source of truth; trackers are views of it."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

SKIP = {"step", "epoch"}


class Trackers:
    def __init__(self, names: list[str], out: Path, run_name: str):
        self.tb = self.mlflow = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tracking: tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or pip install 'postlab[track]')") from None
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if "mlflow" in names:
            try:
                import mlflow
            except ImportError:
                raise ConfigError("tracking: mlflow is not installed: pip install mlflow "
                                  "(it logs to MLFLOW_TRACKING_URI, else ./mlruns)") from None
            self.mlflow = mlflow
            if mlflow.active_run() is None:
                mlflow.start_run(run_name=run_name)

    def log(self, record: dict) -> None:
        prefix = f"{record.get('stage', 'run')}/{record.get('split', 'train')}"
        values = {f"{prefix}/{k}": float(v) for k, v in record.items()
                  if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(record.get("step", 0))
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None and values:
            self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
