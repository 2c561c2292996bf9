"""gdistill.load / Model.sample, --mode=sample and --mode=evaluate on a tiny finished workdir.

The workdir is written with the training code's own pieces (driver.prepare writes config.json,
lineage.export_metadata + checkpoint.save_export write each stage's export) from initial
parameters, the way run_stage derives them (the guided student from the teacher, each
progressive round from its parent), so no training step has to compile. With those parameters
the w-conditioned students equal the conditional teacher exactly: at w = 0 every model samples
the same images from the same noise, which the tests use as an end-to-end check.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gdistill
from gdistill import api, config_lib, config_validation, evaluate, scoring
import util
import xla_env

ROOT = util.ROOT
N0 = util.TINY_N0
STAGES = ["teacher", "guided", "progressive_2", "progressive_1"]


tiny_config = util.tiny_eval_config
write_workdir = util.write_untrained_workdir


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("eval_wd"))
  c = tiny_config()
  write_workdir(c, wd)
  assert api.finished_stages(wd) == STAGES
  return wd, c


def test_load_latest_samples_in_range_and_deterministically(workdir):
  wd, _ = workdir
  model = gdistill.load(wd)
  assert model.stage == "progressive_1" and model.default_steps == 1 and model.nfe() == 1
  labels = np.arange(50) % 10  # two batches of 48: the last one is padded
  x = model.sample(labels, w=2.0, rng=7, batch_size=48)
  assert x.shape == (50, 8, 8, 1) and x.dtype == np.float32
  assert np.all(np.isfinite(x)) and x.min() >= -1.0 and x.max() <= 1.0
  np.testing.assert_array_equal(x, model.sample(labels, w=2.0, rng=7, batch_size=48))
  assert not np.array_equal(x, model.sample(labels, w=2.0, rng=8, batch_size=48))
  # Batch b draws its noise from fold_in(rng, b): the first batch does not see the second.
  np.testing.assert_array_equal(x[:48], model.sample(labels[:48], w=2.0, rng=7))


def test_every_stage_samples_the_conditional_teacher_at_w0(workdir):
  """Students start as the conditional teacher: same noise, same images at w = 0."""
  wd, _ = workdir
  labels = np.arange(48) % 10
  teacher = gdistill.load(wd, "teacher")
  assert teacher.default_steps == N0 and teacher.nfe() == 2 * N0 and teacher.nfe(2) == 4
  ref = teacher.sample(labels, w=0.0, steps=2, rng=3)
  for stage in STAGES[1:]:
    model = gdistill.load(wd, stage)
    assert model.nfe(2) == 2
    np.testing.assert_allclose(model.sample(labels, w=0.0, steps=2, rng=3), ref, atol=2e-5)
  assert gdistill.load(wd, "guided").default_steps == N0
  assert gdistill.load(wd, "progressive_2").default_steps == 2
  with pytest.raises(ValueError, match="10 classes"):
    teacher.sample([10])


def test_the_guided_teacher_takes_every_sampler_at_2_nfe_per_step(workdir):
  """The stochastic sampler runs on the guided x_hat^w like on any x-prediction: at w = 0 the
  untrained students equal the conditional teacher, so both sample the same images."""
  wd, _ = workdir
  labels = np.arange(48) % 10
  teacher = gdistill.load(wd, "teacher")
  assert teacher.spec("stochastic").nfe(4) == 8 and teacher.nfe(4) == 8
  x = teacher.sample(labels, w=0.0, steps=4, sampler="stochastic", rng=3)
  assert np.all(np.isfinite(x)) and not np.array_equal(
      x, teacher.sample(labels, w=0.0, steps=4, rng=3))
  student = gdistill.load(wd, "guided")
  np.testing.assert_allclose(student.sample(labels, w=0.0, steps=4, sampler="stochastic",
                                            rng=3), x, atol=2e-5)


def test_a_w_outside_the_trained_range_warns_once_with_the_range(workdir, capsys):
  wd, c = workdir
  student = gdistill.load(wd, "progressive_2")
  assert student.w_range == (0.0, 4.0) and gdistill.load(wd, "teacher").w_range is None
  with pytest.warns(UserWarning, match=r"w=1e\+09 lies outside .* \(w in \[0, 4\]\)"):
    student.sample(np.arange(48) % 10, w=1e9)
  c = c.copy_and_resolve_references()
  c.sample.update(dict(stage="progressive_2", w=1e9, out=os.path.join(wd, "far.npz")))
  evaluate.sample_to_file(c, wd)
  lines = [l for l in capsys.readouterr().out.splitlines() if "outside" in l]
  assert lines == ["[sample] warning: w=1e+09 lies outside the range stage 'progressive_2' "
                   "was trained on (w in [0, 4]); its samples there are an extrapolation"]
  c.sample.w = 4.0
  evaluate.sample_to_file(c, wd)
  assert "outside" not in capsys.readouterr().out


def test_latest_follows_plan_order(workdir, tmp_path):
  wd, _ = workdir
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(os.path.join(wd, "config.json"), partial)
  (partial / "teacher" / "checkpoints").mkdir(parents=True)  # started, never exported
  with pytest.raises(api.StageNotFoundError, match="no finished export"):
    api.resolve_stage(str(partial))
  for stage, latest in [("teacher", "teacher"), ("guided", "guided"),
                        ("progressive_2", "progressive_2"), ("progressive_1", "progressive_1")]:
    shutil.copytree(os.path.join(wd, stage, "export"), partial / stage / "export")
    assert api.resolve_stage(str(partial)) == latest
  # An export without metadata.json is incomplete: it does not count.
  os.remove(partial / "progressive_1" / "export" / "metadata.json")
  assert api.resolve_stage(str(partial)) == "progressive_2"
  assert gdistill.load(str(partial)).stage == "progressive_2"


@pytest.mark.parametrize("stage", ["progressive_8", "student", "progressive_0"])
def test_missing_stage_lists_the_available_exports(workdir, stage):
  wd, _ = workdir
  with pytest.raises(FileNotFoundError) as e:
    gdistill.load(wd, stage)
  assert repr(stage) in str(e.value) and str(STAGES) in str(e.value)


def test_sample_mode_writes_npz_and_png(workdir):
  wd, c = workdir
  c = c.copy_and_resolve_references()
  c.sample.update(dict(stage="progressive_2", w=1.0, seed=5,
                       out=os.path.join(wd, "samples", "s.npz")))
  info = evaluate.sample_to_file(c, wd)
  path = os.path.join(wd, "samples", "s.npz")
  assert info["out"] == path and info["nfe"] == 2 and info["steps"] == 2
  assert os.path.getsize(os.path.join(wd, "samples", "s.png")) > 0
  with np.load(path, allow_pickle=False) as f:
    images, labels = f["images"], f["labels"]
    assert str(f["stage"]) == "progressive_2" and int(f["nfe"]) == 2
  assert images.dtype == np.uint8 and images.shape == (48, 8, 8, 1)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, np.arange(48) % 10)
  evaluate.sample_to_file(c, wd)  # same seed, same samples
  with np.load(path, allow_pickle=False) as f:
    np.testing.assert_array_equal(f["images"], images)
  c.sample.update(dict(labels=(3,), steps=1, sampler="stochastic", out=str(wd) + "/three.npz"))
  assert evaluate.sample_to_file(c, wd)["nfe"] == 1
  with np.load(os.path.join(wd, "three.npz"), allow_pickle=False) as f:
    assert set(f["labels"].tolist()) == {3}
  # The guided teacher with the stochastic sampler: 2 NFE per step.
  c.sample.update(dict(stage="teacher", labels=None, steps=2, out=""))
  info = evaluate.sample_to_file(c, wd)
  assert info["nfe"] == 4 and info["out"] == os.path.join(wd, "samples.npz")


def test_relative_paths_are_taken_from_the_current_directory(workdir, tmp_path, monkeypatch):
  """gdistill.load and --mode=sample take a relative workdir and output path as a user types
  them, from the current directory."""
  wd, c = workdir
  monkeypatch.chdir(tmp_path)
  os.symlink(wd, tmp_path / "wd")
  model = gdistill.load("wd", "progressive_1")
  assert model.workdir == str(tmp_path / "wd")
  c = c.copy_and_resolve_references()
  c.sample.update(dict(stage="progressive_1", out="out/s.npz"))
  info = evaluate.sample_to_file(c, "wd")
  assert info["out"] == str(tmp_path / "out" / "s.npz")
  assert os.path.getsize(tmp_path / "out" / "s.npz") > 0 and os.path.exists(
      tmp_path / "out" / "s.png")


def test_evaluate_writes_the_table_plots_and_tensorboard(workdir):
  wd, c = workdir
  out = evaluate.evaluate_workdir(c, wd)
  edir = os.path.join(wd, "eval")
  for name in ("results.json", "results.csv", "results.md", "fid_vs_is.png", "fid_vs_nfe.png",
               "classifier.npz", "reference_stats.npz"):
    assert os.path.getsize(os.path.join(edir, name)) > 0, name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(edir,
                                                                                  "tensorboard")))
  with open(os.path.join(edir, "results.json")) as f:
    assert json.load(f)["rows"] == json.loads(json.dumps(out["rows"]))
  rows = {(r["stage"], r["sampler"], r["steps"], r["nfe"]) for r in out["rows"]}
  assert rows == {("teacher", "ddim", N0, 2 * N0), ("teacher", "ddim", 1, 2),
                  ("teacher", "ddim", 2, 4), ("guided", "ddim", N0, N0),
                  ("progressive_1", "ddim", 1, 1), ("progressive_1", "stochastic", 1, 1),
                  ("progressive_2", "ddim", 2, 2), ("progressive_2", "stochastic", 2, 2)}
  assert len(out["rows"]) == 2 * len(rows) and {r["w"] for r in out["rows"]} == {0.0, 2.0}
  for r in out["rows"]:
    assert np.isfinite(r["fid"]) and r["is"] >= 1.0 - 1e-4 and 0 <= r["accuracy"] <= 1
    assert r["seconds"] > 0
  # Same noise for every row: at w = 0 the (untrained) students reproduce the teacher.
  at = {(r["stage"], r["sampler"], r["steps"], r["w"]): r for r in out["rows"]}
  assert at[("guided", "ddim", N0, 0.0)]["fid"] == pytest.approx(
      at[("teacher", "ddim", N0, 0.0)]["fid"], rel=1e-3)
  # One compile per sampler kind and batch: students of all rounds share theirs.
  assert sorted(out["compile_seconds"]) == ["student/ddim/48", "student/stochastic/48",
                                            "teacher/ddim/48"]
  with open(os.path.join(edir, "results.csv")) as f:
    assert len(f.read().strip().splitlines()) == 1 + len(out["rows"])
  with open(os.path.join(edir, "results.md")) as f:
    md = f.read()
  assert "| Method | Stage | Sampler | N | NFE | w=0 FID |" in md
  assert md.count("| teacher | ddim |") == 3 and "| progressive_1 | stochastic | 1 | 1 |" in md
  # eval.teacher_samplers adds the guided teacher's stochastic rows (2 NFE per step).
  c2 = c.copy_and_resolve_references()
  c2.eval.teacher_samplers = ("ddim", "stochastic")
  rows2 = evaluate.plan_rows(c2, STAGES)
  assert [(r.sampler, r.steps, r.nfe) for r in rows2 if r.stage == "teacher"] == [
      ("ddim", N0, 2 * N0), ("ddim", 1, 2), ("ddim", 2, 4),
      ("stochastic", N0, 2 * N0), ("stochastic", 1, 2), ("stochastic", 2, 4)]
  assert {r.family for r in rows2 if r.stage == "teacher"} == {"teacher", "teacher_stochastic"}
  # The editing / inpainting evaluation (gdistill/edit_eval.py): relabel edits at each
  # strength (rows with floor(N s) = 0 steps skipped) and half completion, per stage.
  edits = json.load(open(os.path.join(edir, "edits.json")))
  got = {(r["stage"], r["task"], r["strength"], r["nfe"]) for r in edits["rows"]}
  assert ("teacher", "relabel", 0.6, 2 * int(N0 * 0.6)) in got
  assert ("teacher", "complete", None, 2 * N0) in got
  assert ("progressive_2", "relabel", 0.6, 1) in got and ("progressive_1", "complete", None, 1) in got
  assert ("progressive_1", "relabel", 0.4, 0) in got  # skipped: floor(1 x 0.4) = 0
  for r in edits["rows"]:
    assert r["success"] is None or 0 <= r["success"] <= 1
  assert "| teacher | complete | replacement | - |" in open(os.path.join(edir, "edits.md")).read()
  # The classifier and reference statistics are cached: the next evaluation reuses them.
  cached = [os.path.join(edir, n) for n in ("classifier.npz", "reference_stats.npz")]
  mtimes = [os.path.getmtime(p) for p in cached]
  task = scoring.class_task(c, edir)
  assert [os.path.getmtime(p) for p in cached] == mtimes
  assert task.name == "class" and len(task.cond) == c.eval.num_samples


def test_evaluate_names_the_stages_it_has_no_export_for(workdir, tmp_path, capsys):
  """A workdir whose last round has not finished yet: the table leaves its rows out and the
  console says so, naming the stage (it used to drop them without a word)."""
  wd, c = workdir
  assert evaluate.missing_stages(c, STAGES) == []
  assert evaluate.missing_stages(c, ["teacher", "guided", "progressive_2"]) == ["progressive_1"]
  partial = str(tmp_path / "partial")
  shutil.copytree(wd, partial, ignore=shutil.ignore_patterns("eval", "progressive_1"))
  c2 = c.copy_and_resolve_references()
  c2.eval.edits = False
  out = evaluate.evaluate_workdir(c2, partial)
  assert {r["stage"] for r in out["rows"]} == {"teacher", "guided", "progressive_2"}
  said = capsys.readouterr().out
  assert f"no rows for progressive_1: no finished export in {partial}" in said


def test_inception_dataset_without_weights_fails_before_sampling(workdir, monkeypatch, tmp_path):
  wd, c = workdir
  c = c.copy_and_resolve_references()
  c.data.name = "cifar10"
  c.eval.inception_weights = str(tmp_path / "pt_inception.npz")
  monkeypatch.setattr(api.Model, "sample", lambda *a, **k: pytest.fail("sampled"))
  with pytest.raises(FileNotFoundError, match="pt_inception.npz.*eval.inception_weights"):
    evaluate.evaluate_workdir(c, wd)


@pytest.mark.parametrize("key,value,match", [
    ("eval.steps", (0, 2), "eval.steps"), ("eval.w", (-1.0,), "eval.w"),
    ("sample.stage", "student", "sample.stage"), ("sample.out", "x.png", "sample.out")])
def test_bad_eval_and_sample_config_is_refused(key, value, match):
  c = tiny_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_validation.validate(c, num_devices=8)


def test_cli_sample_of_a_missing_stage_names_the_exports(workdir):
  wd, _ = workdir
  env = dict(os.environ, XLA_FLAGS=xla_env.xla_flags(1),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-m", "gdistill.main", "--config=configs/digits.py:quick",
       f"--workdir={wd}", "--mode=sample", "--config.sample.stage=progressive_8",
       "--compilation_cache="], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "progressive_8" in proc.stderr and str(STAGES) in proc.stderr


@pytest.mark.reliability
def test_sigterm_in_evaluate_and_sample_saves_progress_and_reruns_match(workdir, tmp_path,
                                                                        monkeypatch):
  """A preemption inside the evaluation sweep or the sampling loop stops at the next row /
  batch with its progress on disk; the rerun continues and ends where an uninterrupted run
  ends."""
  from gdistill import preemption
  src, c = workdir
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd, ignore=shutil.ignore_patterns("eval", "samples", "*.npz"))
  monkeypatch.setattr(preemption, "install", lambda: None)  # keep pytest's SIGTERM handler
  total = 16  # 8 rows x 2 w
  preemption._flag.set()  # what the SIGTERM handler does
  try:
    with pytest.raises(preemption.Preempted, match=f"preempted after 2 of {total} results"):
      evaluate.evaluate_workdir(c, wd)
  finally:
    preemption.reset()
  progress = os.path.join(wd, "eval", "progress.json")
  with open(progress) as f:
    saved = json.load(f)["rows"]
  assert len(saved) == 2
  assert not os.path.exists(os.path.join(wd, "eval", "results.json"))
  resumed = evaluate.evaluate_workdir(c, wd)
  assert resumed["rows"][:2] == saved  # reused as they were (timings included), not redone
  # The editing table's keys (eval.edit*) are not the sweep's: changing them on a finished
  # workdir reuses every row and re-runs only the editing table.
  c_edit = c.copy_and_resolve_references()
  c_edit.eval.edit_strengths = (0.6,)
  again = evaluate.evaluate_workdir(c_edit, wd)
  assert again["rows"] == resumed["rows"]
  with open(os.path.join(wd, "eval", "edits.json")) as f:
    assert {r["strength"] for r in json.load(f)["rows"] if r["task"] == "relabel"} == {0.6}
  os.remove(progress)
  fresh = evaluate.evaluate_workdir(c, wd)
  key = lambda r: (r["stage"], r["sampler"], r["steps"], r["w"], r["fid"], r["is"],
                   r["accuracy"])
  assert [key(r) for r in resumed["rows"]] == [key(r) for r in fresh["rows"]]
  assert len(fresh["rows"]) == total
  # The sampling loop: 3 batches of 16; preempted after the first.
  c = c.copy_and_resolve_references()
  out = os.path.join(wd, "samples", "s.npz")
  c.sample.update(dict(stage="progressive_2", w=1.0, seed=5, batch_size=16, out=out))
  preemption._flag.set()
  try:
    with pytest.raises(preemption.Preempted, match="after 1 batches"):
      evaluate.sample_to_file(c, wd)
  finally:
    preemption.reset()
  assert os.path.exists(out + ".partial.npz") and not os.path.exists(out)
  evaluate.sample_to_file(c, wd)
  assert not os.path.exists(out + ".partial.npz")
  with np.load(out, allow_pickle=False) as f:
    resumed_images = f["images"]
  evaluate.sample_to_file(c, wd)  # uninterrupted
  with np.load(out, allow_pickle=False) as f:
    np.testing.assert_array_equal(f["images"], resumed_images)
