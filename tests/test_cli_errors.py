"""The command line as a user meets it when things go wrong: paths taken as given (relative,
remote), one clear line on bad input or failure, damaged exports named, and resumes that refuse
changed hyperparameters. (tests/test_cli.py runs the README's commands.)"""
import os
import shutil
import subprocess
import sys

import jax
import pytest

from gdistill import config_lib, console, driver, lineage, paths, plan, train
import util
from test_cli import fresh_checkout, user_env

def test_paths_resolve_relative_against_the_cwd_and_keep_remote_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert paths.resolve("./runs/../runs/x/") == str(tmp_path / "runs" / "x")
  assert paths.resolve("/abs/x") == "/abs/x"
  assert paths.resolve("~/x") == os.path.expanduser("~/x")
  assert paths.resolve("") == ""
  for remote in ("gs://bucket/run", "s3://b/r", "gs://bucket/run/"):
    assert paths.resolve(remote) == remote and paths.is_remote(remote)
  assert paths.resolve(paths.resolve("runs/x")) == paths.resolve("runs/x")  # idempotent
  assert paths.join("gs://bucket/run", "teacher", "export") == "gs://bucket/run/teacher/export"
  assert train.export_dir("gs://bucket/run", "teacher") == "gs://bucket/run/teacher/export"
  c = util.quick_config(**{"init_from": "gs://bucket/other/guided/export",
                           "data.data_dir": "tfds", "sample.out": "out/s.npz",
                           "eval.inception_weights": "gs://bucket/inception.npz"})
  config_lib.resolve_paths(c)
  assert c.init_from == "gs://bucket/other/guided/export"
  assert c.eval.inception_weights == "gs://bucket/inception.npz"
  assert c.data.data_dir == str(tmp_path / "tfds") and c.sample.out == str(tmp_path / "out/s.npz")
  # A remote workdir's run log stays local (file descriptors cannot point at a bucket).
  assert not paths.is_remote(console.log_dir("gs://bucket/run"))
  assert console.log_dir("runs/x") == str(tmp_path / "runs" / "x" / "logs")
  assert not os.path.exists(tmp_path / "gs:")


def test_cli_keeps_a_gs_workdir_and_refuses_bad_input_in_one_line(tmp_path):
  """No network: the config is refused before any storage is touched, and nothing named
  'gs:' appears in the current directory (the remote path was never made local)."""
  cwd = fresh_checkout(tmp_path)
  cmd = [sys.executable, "-m", "gdistill.main", "--config=configs/digits.py",
         "--workdir=gs://bucket/run", "--config.progressive.start_steps=12",
         "--compilation_cache="]
  proc = subprocess.run(cmd, cwd=cwd, env=user_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stdout == ""
  assert proc.stderr.splitlines() == [
      "error: config.progressive.start_steps=12 is invalid: must be a power of two >= 2 "
      "(e.g. 1024)"], proc.stderr
  assert not os.path.exists(os.path.join(cwd, "gs:"))


def test_a_damaged_export_is_named_in_one_line(tmp_path):
  cwd = fresh_checkout(tmp_path)
  os.makedirs(os.path.join(cwd, "wd", "guided", "export"))
  with open(os.path.join(cwd, "wd", "guided", "export", "metadata.json"), "w") as f:
    f.write("{not json")
  cmd = [sys.executable, "-m", "gdistill.main", "--config=configs/digits.py", "--workdir=wd",
         "--mode=sample", "--config.sample.stage=guided", "--compilation_cache="]
  proc = subprocess.run(cmd, cwd=cwd, env=user_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: DamagedExportError: "), lines
  assert os.path.join(cwd, "wd", "guided", "export", "metadata.json") in lines[0]
  assert "rerun its stage" in lines[0]


_FAILING_MAIN = """
import sys
from gdistill import evaluate, main
def fail(*args):
  raise RuntimeError("something nobody planned for\\nsecond line of the message")
evaluate.sample_to_file = fail
sys.argv = ["gdistill.main", "--config=configs/digits.py", "--workdir=wd", "--mode=sample",
            "--compilation_cache="] + sys.argv[1:]
main.app.run(main.main)
"""


def test_an_unexpected_failure_prints_one_line_and_keeps_the_traceback_in_the_log(tmp_path):
  cwd = fresh_checkout(tmp_path)
  cmd = [sys.executable, "-c", _FAILING_MAIN]
  proc = subprocess.run(cmd, cwd=cwd, env=user_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith("error: RuntimeError: something nobody planned for (traceback in ")
  log = lines[0].split("(traceback in ")[1].rstrip(")")
  assert log.startswith(os.path.join(cwd, "wd", "logs", "sample-"))
  assert "Traceback (most recent call last)" in open(log).read()
  verbose = subprocess.run(cmd + ["--verbose"], cwd=cwd, env=user_env(), capture_output=True,
                           text=True, timeout=600)
  assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


# -------------------------------------------------------------------- resume with other values
TINY = {"model.ch": 16, "model.head_dim": 16, "model.num_groups": 4, "model.dropout": 0.0,
        "stage": "teacher", "teacher.num_steps": 4, "teacher.batch_size": 16,
        "checkpoint.every_steps": 2, "checkpoint.async_save": False, "log.every_steps": 2,
        "log.tensorboard": False}
TOY_TINY = {k: v for k, v in TINY.items() if not k.startswith("model.")}


def test_a_changed_hyperparameter_on_resume_is_refused_unless_allowed(tmp_path, capsys):
  """The check is the driver's, whatever the network: the toy2d MLP (its steps compile in
  seconds)."""
  wd = str(tmp_path / "wd")
  over = {"data.data_dir": str(tmp_path / "tfds"), **TOY_TINY, "teacher.num_steps": 6}
  base = util.toy_config(**over)
  # A run that stopped at step 4 of 6: its checkpoints stay.
  driver.train_and_evaluate(util.toy_config(**over), wd, devices=jax.devices()[:1])
  shutil.rmtree(os.path.join(wd, "teacher", "export"))
  shutil.rmtree(os.path.join(wd, "teacher", "checkpoints", "6"))
  before = sorted(os.listdir(os.path.join(wd, "teacher", "checkpoints")))
  for key, value in (("teacher.lr", 1e-3), ("teacher.batch_size", 32),
                     ("teacher.num_steps", 8),  # the cosine schedule depends on it
                     ("diffusion.p_uncond", 0.3)):
    c = util.toy_config(**{**over, key: value})
    with pytest.raises(config_lib.ConfigError) as e:
      driver.train_and_evaluate(c, wd, devices=jax.devices()[:1])
    msg = str(e.value)
    old = base[key.split(".")[0]][key.split(".")[1]]
    assert (f"config.{key}: {old!r} in the checkpoint, {value!r} now" in msg
            and f"--config.allow_changes={key}" in msg and "step 4" in msg), msg
  assert sorted(os.listdir(os.path.join(wd, "teacher", "checkpoints"))) == before  # kept
  # Allowed (by full key or by name), the run resumes and says what changed.
  capsys.readouterr()
  c = util.toy_config(**{**over, "teacher.lr": 1e-3, "allow_changes": "lr"})
  driver.train_and_evaluate(c, wd, devices=jax.devices()[:1])
  out = capsys.readouterr().out
  assert "[teacher] resuming at step 4" in out
  assert "resuming with changed hyperparameters (config.allow_changes): teacher.lr: " in out
  assert train.is_finished(wd, "teacher")


def test_a_constant_schedule_stage_may_be_extended_on_resume(tmp_path):
  """num_steps does not enter a constant-schedule update: extending the stage is no change."""
  c = util.quick_config(**{"data.data_dir": "x", **TINY, "teacher.schedule": "constant"})
  stage = plan.Stage("teacher", "teacher", "teacher")
  saved = lineage.resume_record(c, stage)
  assert "teacher.num_steps" not in saved and saved["teacher.lr"] == c.teacher.lr
  c.teacher.num_steps = 100
  assert lineage.check_resume(saved, c, stage, 4) == []
  c.teacher.schedule = "cosine"
  with pytest.raises(config_lib.ConfigError, match="teacher.schedule: 'constant' in the"):
    lineage.check_resume(saved, c, stage, 4)
  c.allow_changes = "all"
  assert lineage.check_resume(saved, c, stage, 4) == ["teacher.schedule: 'constant' -> 'cosine'"]
