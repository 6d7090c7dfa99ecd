"""A run's signals: wall-clock fields in every record, a progress bar whose rate leaves out
compilation, the end-of-run summary (and summary.json), skipped-record totals, the resume
warning on a changed learning-rate schedule, why MFU is absent, and the W&B and MLflow
trackers (offline W&B, a local MLflow store)."""

import io
import json
import os
import signal
import struct
import sys
import time

import jax
import numpy as np
import pytest
from tqdm import tqdm

from lmjax import data as data_lib
from lmjax import metrics, runs, trainer
from lmjax.config import ConfigError, default_config
from lmjax.metrics import MetricsWriter, read_metrics
from lmjax.trainer import train


def _cfg(steps: int, **train_keys):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 1, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 1, 16
  c.model.max_seq_len = c.data.seq_len = 32
  c.data.global_batch_size = 4
  c.optim.warmup_steps = 2
  c.train.steps, c.train.log_every, c.train.eval_every = steps, 1, 0
  c.train.checkpoint_every, c.train.progress_bar = 0, False
  for k, v in train_keys.items():
    c.train[k] = v
  return c


def _train(cfg, workdir):
  return train(cfg, workdir, devices=jax.devices()[:1])


# -- unit tests ------------------------------------------------------------------------------


def test_every_record_has_wall_clock_time_and_elapsed_seconds(tmp_path):
  started = time.time() - 5.0
  writer = MetricsWriter(tmp_path, started=started)
  before = time.time()
  first = writer.write(1, {"loss": 2.5})
  writer.write(2, {"loss": 2.0})
  writer.close()
  records = read_metrics(tmp_path)
  assert set(records[0]) == {"step", "loss", "time", "elapsed_sec"}
  assert first == {k: v for k, v in records[0].items() if k != "step"}
  assert before <= records[0]["time"] <= records[1]["time"] <= time.time()
  assert records[0]["elapsed_sec"] == pytest.approx(records[0]["time"] - started)
  assert records[1]["elapsed_sec"] >= 5.0
  # `lmjax runs` tabulates its own columns; the clock fields do not become columns.
  table = runs.runs_table(runs.list_runs(tmp_path))
  assert table[0]["train_loss"] == 2.0 and not {"time", "elapsed_sec"} & set(table[0])


def test_progress_bar_rate_and_eta_leave_out_the_first_steps_compilation():
  out = io.StringIO()
  bar = tqdm(total=100, initial=10, file=out, mininterval=0, ascii=True)
  time.sleep(0.6)  # "compiling" the first step
  bar.update(1)
  metrics.restart_clock(bar)
  for _ in range(5):
    time.sleep(0.01)
    bar.update(1)
  d = bar.format_dict
  assert d["n"] == 16 and d["initial"] == 11 and d["elapsed"] < 0.4, d
  eta = (d["total"] - d["n"]) / d["rate"]
  assert eta < 84 * 0.1, eta  # ~0.01 s per step; with the compilation counted it is ~5x more
  assert "  0/100" not in out.getvalue().split("11/100")[-1]  # never drawn back at 0
  bar.close()


def test_schedule_change_names_the_keys_and_the_new_learning_rate():
  old = _cfg(100)
  saved = json.loads(old.to_json())
  assert metrics.schedule_change(_cfg(100), saved, 50) is None
  longer = _cfg(200)
  msg = metrics.schedule_change(longer, saved, 50)
  assert "train.steps 100 -> 200" in msg and "from step 51 on" in msg and "\n" not in msg
  # With a fixed decay length, train.steps does not enter the schedule: nothing to say.
  old.optim.decay_steps = longer.optim.decay_steps = 80
  assert metrics.schedule_change(longer, json.loads(old.to_json()), 50) is None
  warmup = _cfg(100)
  warmup.optim.warmup_steps = 10
  assert "optim.warmup_steps 2 -> 10" in metrics.schedule_change(warmup, saved, 5)
  wsd = _cfg(100)
  wsd.optim.schedule = "wsd"
  assert "optim.schedule cosine -> wsd" in metrics.schedule_change(wsd, saved, 50)


def test_mfu_absence_is_explained_on_cpu():
  cfg = _cfg(1)
  note = metrics.Throughput(cfg, 1000).mfu_note()
  assert "MFU: not reported on cpu" in note and "train.peak_flops_per_device" in note
  cfg.train.peak_flops_per_device = 1e12
  assert metrics.Throughput(cfg, 1000).mfu_note() is None


def test_a_tracker_that_is_not_installed_fails_before_training_naming_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import raises ImportError
  cfg = _cfg(2, trackers=("tensorboard", "wandb"))
  with pytest.raises(ConfigError) as info:
    _train(cfg, tmp_path)
  assert str(info.value) == ('config.train.trackers: \'wandb\' needs the wandb package, which is '
                             'not installed: pip install "lmjax[wandb]".')
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize("tracker,needle", [
    ("mlflow", 'config.train.trackers: \'mlflow\' needs the mlflow package, which is not installed: '
               'pip install "lmjax[mlflow]".'),
    ("comet", "config.train.trackers: unknown tracker 'comet'; choose from ('tensorboard', "
              "'wandb', 'mlflow') (metrics.jsonl is always written)."),
])
def test_check_trackers(monkeypatch, tracker, needle):
  monkeypatch.setitem(sys.modules, tracker, None)
  with pytest.raises(ConfigError) as info:
    metrics.check_trackers(("tensorboard", tracker))
  assert str(info.value) == needle


# -- runs ------------------------------------------------------------------------------------


def _jsonl_with_bad_records(path):
  docs = data_lib.default_documents()[:60]
  lines = [json.dumps({"text": d}) for d in docs]
  lines[3:3] = ["{not json", "[1, 2]", json.dumps({"body": "no text field"})]
  path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_summary_after_a_sigterm_stop_and_after_a_resume(tmp_path, monkeypatch, capsys):
  cfg = _cfg(3)
  cfg.data.tokenizer = str(data_lib.get_tokenizer(default_config().data, 1024).path)
  cfg.data.source = str(tmp_path / "docs.jsonl")
  _jsonl_with_bad_records(tmp_path / "docs.jsonl")
  calls = []
  place = trainer.host_to_global

  def sigterm_at_step_2(*args):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler: save and stop after this step
    return place(*args)

  monkeypatch.setattr(trainer, "host_to_global", sigterm_at_step_2)
  history = _train(cfg, tmp_path / "run")
  out = capsys.readouterr().out
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert [r["step"] for r in history] == [1, 2]
  assert summary["status"] == "stopped" and summary["stop_signal"] == signal.SIGTERM
  assert (summary["start_step"], summary["end_step"], summary["target_step"]) == (0, 2, 3)
  assert summary["loss"] == history[-1]["loss"]
  assert summary["data_skipped_by_reason"] == {"invalid_json": 2, "missing_field": 1}
  assert f"summary: stopped by signal {signal.SIGTERM}, steps 0..2 of 3" in out
  assert "3 data records skipped (invalid_json: 2, missing_field: 1)" in out

  monkeypatch.setattr(trainer, "host_to_global", place)
  cfg.train.steps = 5  # the cosine decay now spans 3 more steps
  history = _train(cfg, tmp_path / "run")
  out = capsys.readouterr().out
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert ("warning: the learning-rate schedule differs from the checkpoint's (train.steps 3 -> 5): "
          "from step 3 on the learning rate follows the new schedule") in out
  assert summary["status"] == "completed" and summary["stop_signal"] is None
  assert (summary["start_step"], summary["end_step"], summary["steps"]) == (2, 5, 3)
  tokens = [r["tokens"] for r in history]  # the real tokens of each logged step
  assert summary["tokens"] == sum(tokens) and summary["tokens_per_sec"] > 0
  assert summary["wall_sec"] >= summary["first_step_sec"] > 0
  assert summary["eval_loss"] is None and summary["skipped_steps"] == 0
  assert "summary: completed, steps 2..5 of 5" in out and "(first step, compiling: " in out
  assert "MFU: not reported on cpu" in out
  records = read_metrics(tmp_path / "run")
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  assert all(r["elapsed_sec"] > 0 and r["time"] > 1.7e9 for r in records)

  assert _train(cfg, tmp_path / "run") == []  # nothing to do: summary.json stays
  assert "nothing to train" in capsys.readouterr().out
  assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


# -- trackers --------------------------------------------------------------------------------


def _wandb_history(run_dir) -> list[dict]:
  """The history rows of an offline W&B run, read from its ``run-*.wandb`` file (LevelDB-log
  framing: 7-byte header, then 32 KiB blocks of records with a 7-byte header each)."""
  from wandb.proto import wandb_internal_pb2
  (path,) = run_dir.glob("run-*.wandb")
  data, pos, block, chunks, rows = path.read_bytes(), 7, 32768, b"", []
  assert data[:4] == b":W&B"
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block  # block trailer
      continue
    length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
    chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunks)
      chunks = b""
      if record.WhichOneof("record_type") == "history":
        rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item})
  return rows


@pytest.mark.slow
def test_wandb_offline_and_mlflow_file_store_receive_the_config_and_the_losses(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  pytest.importorskip("mlflow")
  from mlflow.tracking import MlflowClient
  for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(var, str(tmp_path / var.lower()))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  uri = f"file:{tmp_path / 'mlruns'}"
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in
  cfg = _cfg(3, trackers=("tensorboard", "wandb", "mlflow"), project="signals", run_name="tiny-run")
  _train(cfg, tmp_path / "run")
  losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run")}
  assert sorted(losses) == [1, 2, 3]

  (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
  rows = _wandb_history(run_dir)
  assert {r["_step"]: r["loss"] for r in rows} == losses
  assert all("elapsed_sec" in r and "time" not in r for r in rows)

  client = MlflowClient(uri)
  experiment = client.get_experiment_by_name("signals")
  (run,) = client.search_runs([experiment.experiment_id])
  assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
  assert run.data.params["train.steps"] == "3" and run.data.params["model.num_layers"] == "1"
  assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")} == losses


@pytest.mark.slow
def test_a_failed_run_marks_the_mlflow_run_failed(tmp_path, monkeypatch):
  pytest.importorskip("mlflow")
  from mlflow.tracking import MlflowClient
  uri = f"file:{tmp_path / 'mlruns'}"
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
  cfg = _cfg(3, trackers=("mlflow",), debug_nan_at_step=2)
  with pytest.raises(trainer.TrainingHalted):
    _train(cfg, tmp_path / "run")
  (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("lmjax").experiment_id])
  assert run.info.status == "FAILED" and run.info.run_name == "run"
  assert not (tmp_path / "run" / "summary.json").exists()
  assert np.isfinite([r["loss"] for r in read_metrics(tmp_path / "run")]).all()


def test_records_after_the_restored_step_are_kept_aside(tmp_path):
  """A resume from an older step (or a restart with no checkpoint left) rewrites metrics.jsonl
  from there; the records it replaces move to a file of their own, never lost."""
  from lmjax.metrics import MetricsWriter, read_metrics
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0 - s}) + "\n"
                                                  for s in range(1, 6)))
  writer = MetricsWriter(tmp_path, keep_through_step=2)
  writer.close()
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
  assert writer.dropped.name.startswith("metrics.after-step-2.")
  moved = [json.loads(l) for l in writer.dropped.read_text().splitlines()]
  assert moved == [{"step": s, "loss": 9.0 - s} for s in (3, 4, 5)]
  writer = MetricsWriter(tmp_path, keep_through_step=2)  # nothing beyond: nothing moved
  writer.close()
  assert writer.dropped is None and len(list(tmp_path.glob("metrics.after-step-*"))) == 1
