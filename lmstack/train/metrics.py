"""Run logging on rank 0: a JSONL metrics file (the record of truth), optional TensorBoard, throughput/MFU.

metrics.jsonl holds one JSON object per line: {"kind": "train", "step", "loss", "lr", "grad_norm",
"tokens", "tokens_per_s", "mfu", "elapsed_s", ...}, {"kind": "eval", "step", "val_loss", "val_ppl"},
{"kind": "skip", "step", "reason"}. Floats are written with full precision so a resumed run's
losses can be compared bitwise with an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from lmstack.atomic import write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a torn last line from a kill -9 is dropped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only the last line can be torn: a crash mid-write
    return records


class MetricsLog:
    """Appends records to OUT/metrics.jsonl (flushed per line) and, if asked, to TensorBoard."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None:
            # drop what the killed run logged after its last checkpoint: it is about to be redone
            self.records = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif self.path.exists():
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run; closed in close())
        self._tb = _tensorboard_writer(Path(out_dir) / "tensorboard") if tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(directory: Path):  # -> SummaryWriter | None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("lmstack: train.tensorboard is set but the tensorboard package is not installed "
              "(pip install tensorboard); logging to metrics.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(directory))


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s (6N + attention per token) over the devices' peak."""
    if not peak_flops_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_flops_per_device * world_size)
