"""The product as a newcomer meets it: the README's commands verbatim in a fresh directory,
paths taken as given (relative, remote), a quiet console, one clear line on failure, and
resumes that refuse changed hyperparameters."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from gdistill import config_lib, console, driver, lineage, paths, plan, train
import util

# gdistill's own console lines: '[stage] ...' progress and the results table.
OWN_LINE = re.compile(r"^(\[[a-z0-9_]+\] |\|)")


def readme_commands() -> dict:
  """The README's commands on the embedded digits workdir, by what they do."""
  with open(os.path.join(util.ROOT, "README.md")) as f:
    lines = [l.strip() for l in f if "python -m gdistill.main" in l
             and "--workdir=workdirs/digits" in l]
  out = {}
  for line in lines:
    mode = re.search(r"--mode=(\w+)", line)
    out[mode.group(1) if mode else "main"] = line
  return out


def user_env() -> dict:
  """The environment of a user's shell: no test-suite device count or log settings."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "PYTHONUNBUFFERED")}
  return env


def fresh_checkout(root) -> str:
  """The package and configs copied into an empty directory (what a clone holds)."""
  for name in ("gdistill", "configs"):
    shutil.copytree(os.path.join(util.ROOT, name), os.path.join(root, name),
                    ignore=shutil.ignore_patterns("__pycache__"))
  return str(root)


def run_verbatim(command: str, cwd: str, timeout: int = 1800, home: str = ""):
  """A README command as typed (the pip part dropped: the suite's environment has the
  requirements), with the :quick variant of the config."""
  command = command.split("&&")[-1].strip()
  command = command.replace("--config=configs/digits.py ", "--config=configs/digits.py:quick ")
  assert ":quick" in command, command
  env = dict(user_env(), **({"HOME": home} if home else {}))
  proc = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True,
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr, command


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
  """The README's main command, verbatim but for ':quick', in a fresh directory and with a
  fresh HOME (digits is prepared anew in ~/tensorflow_datasets, as on a new machine; the
  compilation cache ~/.cache/gdistill is shared with the user's)."""
  cwd = fresh_checkout(tmp_path_factory.mktemp("user"))
  home = tmp_path_factory.mktemp("home")
  cache = os.path.expanduser("~/.cache/gdistill")
  os.makedirs(cache, exist_ok=True)
  os.makedirs(home / ".cache")
  os.symlink(cache, home / ".cache" / "gdistill")
  rc, out, err, command = run_verbatim(readme_commands()["main"], cwd, home=str(home))
  return cwd, rc, out, err, command


def test_readme_lists_the_main_sample_and_evaluate_commands():
  cmds = readme_commands()
  assert set(cmds) == {"main", "sample", "evaluate"}, cmds
  assert cmds["main"] == ("pip install -r requirements.txt && python -m gdistill.main "
                          "--config=configs/digits.py --workdir=workdirs/digits")


def test_readme_main_command_runs_verbatim_with_a_relative_workdir_and_a_quiet_console(
    readme_run):
  cwd, rc, out, err, command = readme_run
  print(command, out[-2000:], err[-2000:], sep="\n")
  assert rc == 0, err[-3000:]
  wd = os.path.join(cwd, "workdirs", "digits")
  with open(os.path.join(wd, "eval", "results.md")) as f:
    assert "| Distilled student | progressive_1 | ddim | 1 | 1 |" in f.read()
  # Only gdistill's own lines, from the first to the results table; nothing on stderr.
  noise = [l for l in (out + err).splitlines() if l.strip() and not OWN_LINE.match(l)]
  assert not noise, noise
  assert err == ""
  assert out.splitlines()[0].startswith("[teacher] starting")
  lines = out.rstrip().splitlines()
  assert lines[-1].startswith("[pipeline] finished in ") and lines[-1].endswith(
      "workdirs/digits/eval/results.md")
  assert lines[-2].startswith("| Distilled student | progressive_4 | stochastic |")
  # Third-party output went to the run's log instead (TensorFlow's banner, tfds, absl...).
  logs = os.listdir(os.path.join(wd, "logs"))
  assert len(logs) == 1 and logs[0].startswith("train-"), logs
  with open(os.path.join(wd, "logs", logs[0])) as f:
    log = f.read()
  assert "[teacher] starting" in log  # gdistill's lines are in the log too
  config = json.load(open(os.path.join(wd, "config.json")))
  assert config["sample"]["out"] == "" and config["data"]["data_dir"] == ""


def test_the_readme_run_trained_a_teacher_whose_guided_samples_have_the_asked_class(
    readme_run):
  """The quick pipeline's teacher (250 steps): its loss falls, and its guided samples are of
  the asked class by the evaluation's classifier (the results table's accuracy)."""
  cwd, rc, _, _, _ = readme_run
  assert rc == 0
  wd = os.path.join(cwd, "workdirs", "digits")
  rows = [json.loads(l) for l in open(os.path.join(wd, "teacher", "metrics.jsonl"))]
  losses = [r["loss"] for r in rows]
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses
  meta = json.load(open(os.path.join(wd, "teacher", "export", "metadata.json")))
  assert meta["kind"] == "teacher" and meta["train_steps"] == 250
  assert os.path.exists(os.path.join(wd, "teacher", "samples", "step_0000250.png"))
  assert os.listdir(os.path.join(wd, "teacher", "tensorboard"))
  results = json.load(open(os.path.join(wd, "eval", "results.json")))
  teacher = {(r["steps"], r["w"]): r["accuracy"] for r in results["rows"]
             if r["stage"] == "teacher"}
  print("accuracy of the guided teacher's samples (N, w):", teacher)
  assert teacher[(8, 2.0)] >= 0.9 and teacher[(8, 0.0)] >= 0.8


def test_readme_sample_and_evaluate_commands_run_verbatim(readme_run):
  cwd, rc, _, _, _ = readme_run
  assert rc == 0
  cmds = readme_commands()
  rc, out, err, _ = run_verbatim(cmds["sample"], cwd)
  assert rc == 0, err[-3000:]
  assert re.search(r"^\[sample\] progressive_4 ddim N=4 w=2: 100 samples, 4 NFE each", out,
                   re.M), out
  assert os.path.getsize(os.path.join(cwd, "workdirs", "digits", "samples.npz")) > 0
  assert os.path.exists(os.path.join(cwd, "workdirs", "digits", "samples.png"))
  rc, out, err, _ = run_verbatim(cmds["evaluate"], cwd)
  assert rc == 0, err[-3000:]
  assert "[evaluate] reusing" in out and "| Distilled student | progressive_1 |" in out
  assert not [l for l in (out + err).splitlines() if l.strip() and not OWN_LINE.match(l)]
  # An output path a user types is taken from the current directory, not from the workdir.
  rc, out, err, _ = run_verbatim(cmds["sample"] + " --config.sample.out=mine/s.npz", cwd)
  assert rc == 0, err[-3000:]
  assert os.path.getsize(os.path.join(cwd, "mine", "s.npz")) > 0


# ------------------------------------------------------------------------------------- paths
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


def test_a_changed_hyperparameter_on_resume_is_refused_unless_allowed(tmp_path, capsys):
  wd = str(tmp_path / "wd")
  over = {"data.data_dir": str(tmp_path / "tfds"), **TINY, "teacher.num_steps": 6}
  base = util.quick_config(**over)
  # A run that stopped at step 4 of 6: its checkpoints stay.
  driver.train_and_evaluate(util.quick_config(**{**over, "teacher.num_steps": 6}), wd,
                           devices=jax.devices()[:1])
  shutil.rmtree(os.path.join(wd, "teacher", "export"))
  shutil.rmtree(os.path.join(wd, "teacher", "checkpoints", "6"))
  before = sorted(os.listdir(os.path.join(wd, "teacher", "checkpoints")))
  for key, value in (("teacher.lr", 1e-3), ("teacher.batch_size", 32),
                     ("teacher.num_steps", 8),  # the cosine schedule depends on it
                     ("diffusion.p_uncond", 0.2)):
    c = util.quick_config(**{**over, key: value})
    with pytest.raises(config_lib.ConfigError) as e:
      driver.train_and_evaluate(c, wd, devices=jax.devices()[:1])
    msg = str(e.value)
    old = base[key.split(".")[0]][key.split(".")[1]]
    assert (f"config.{key}: {old!r} in the checkpoint, {value!r} now" in msg
            and f"--config.allow_changes={key}" in msg and "step 4" in msg), msg
  assert sorted(os.listdir(os.path.join(wd, "teacher", "checkpoints"))) == before  # kept
  # Allowed (by full key or by name), the run resumes and says what changed.
  capsys.readouterr()
  c = util.quick_config(**{**over, "teacher.lr": 1e-3, "allow_changes": "lr"})
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
