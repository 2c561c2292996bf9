"""The product as a newcomer meets it: the README's commands verbatim in a fresh directory,
paths taken as given (relative, remote), a quiet console, one clear line on failure, and
resumes that refuse changed hyperparameters."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import util
import xla_env

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
  """The environment of a user's shell: no test-suite device count, log settings, or the
  XLA CPU flags' switch that conftest.py turns off for the fast-compiling test processes."""
  suite = ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "PYTHONUNBUFFERED") + (
      ("GDISTILL_XLA_CPU_DEFAULTS",) if xla_env.FAST_COMPILE else ())
  return {k: v for k, v in os.environ.items() if k not in suite}


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
