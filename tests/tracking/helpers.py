"""Shared by the tracking tests: a small config, epoch records, a finished run's folder."""

from __future__ import annotations

import json

from gppq_dist.config import validate_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(tmp_path, name="tiny", train=None, k=256, **tracking):
    """A ResNet-18 config (nothing is built from it here) tracked into ``tracking`` (default: a
    sqlite file in ``tmp_path``)."""
    tracking.setdefault("uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return validate_config({
        "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10},
        "quantization": {"types": {"conv3x3": {"d": 9, "k": k}},
                         "names": {"layer4\\.1\\.conv2": {"d": 18, "k": 256}}},
        "train": {"epochs": 2, "mu": 0.5, **(train or {})},
        "tracking": tracking,
    })


def epoch_record(epoch, **values):
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "top1_raw": 40.0 + epoch, "top1_quantized": 30.0 + epoch,
            "val_loss_quantized": 1.0 / epoch, "gamma": 10.0 ** -(2 * epoch), "lr": 0.01, **values}


def finish_run(tracker, cfg, history, steps, **values):
    """What the trainer leaves in the run folder, then ``tracker.finish``; returns the summary."""
    summary = {"baseline_top1": 50.0, "direct_pq_top1": 20.0, "size_mb": 1.25, "ratio": 31.4,
               "file_bytes": 1_400_000, "steps": steps, "history": history, **values}
    (cfg.run_dir / "config.yaml").write_text(f"name: {cfg.name}\n")
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary))
    tracker.finish(summary)
    return summary


def history_of(client, run_id, key):
    """``[(step, value), ...]`` of one metric, by step."""
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
