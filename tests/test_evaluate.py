"""gdistill.load / Model.sample, --mode=sample and --mode=evaluate on a tiny finished workdir.

The workdir is written with the training code's own pieces (train.prepare writes config.json,
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

import flax.linen as nn
import jax
import numpy as np
import pytest

import gdistill
from gdistill import api, config_lib, evaluate, lineage, train
from gdistill import checkpoint as ckpt
from gdistill.denoiser import student_params_from_teacher
from gdistill.plan import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N0 = 4
STAGES = ["teacher", "guided", "progressive_2", "progressive_1"]


def tiny_config():
  sys.path.insert(0, ROOT)
  from configs import digits
  c = digits.get_config("quick")
  c.model.update(dict(ch=16, num_groups=8, attn_resolutions=()))
  c.progressive.start_steps = N0
  c.eval.update(dict(num_samples=48, batch_size=48, steps=(1, 2), w=(0.0, 2.0),
                     classifier_steps=30))
  c.sample.update(dict(num_samples=48, batch_size=48, out="samples/s.npz"))
  return c


def write_workdir(c, workdir: str) -> None:
  """A finished pipeline workdir: config.json and one export per stage of the plan."""
  train.prepare(c, workdir)
  shape = train.example_shape(c)
  params, parent = {}, None
  for st in make_plan(c):
    den = train.student_denoiser(c, st)
    if st.kind == "teacher":  # 'rbg': XLA:CPU compiles threefry inits slowly
      p = nn.unbox(jax.jit(den.init_fn(shape))(jax.random.key(1, impl="rbg")))
    elif st.kind == "guided":  # the w-embedding at zero, as its zero-initialised last layer
      zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                           nn.unbox(den.init_abstract(shape)))
      p = student_params_from_teacher(params["teacher"], zeros)
    else:
      p = params[st.parent]
    params[st.name] = p
    meta = lineage.export_metadata(c, st, train_steps=1, parent=parent,
                                   parent_path=st.parent and train.export_dir(workdir, st.parent))
    ckpt.save_export(train.export_dir(workdir, st.name), p, meta)
    parent = meta


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
  with pytest.raises(ValueError, match="guided DDIM only"):
    teacher.sample(labels, sampler="stochastic")
  with pytest.raises(ValueError, match="10 classes"):
    teacher.sample([10])


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
  c.sample.update(dict(stage="progressive_2", w=1.0, seed=5))
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
  # The classifier and reference statistics are cached: the next evaluation reuses them.
  cached = [os.path.join(edir, n) for n in ("classifier.npz", "reference_stats.npz")]
  mtimes = [os.path.getmtime(p) for p in cached]
  scorer = evaluate.make_scorer(c, edir)
  assert [os.path.getmtime(p) for p in cached] == mtimes
  with np.load(cached[1], allow_pickle=False) as f:
    np.testing.assert_array_equal(scorer.mu, f["mu"])


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
    config_lib.validate(c, num_devices=8)


def test_cli_sample_of_a_missing_stage_names_the_exports(workdir):
  wd, _ = workdir
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
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
  os.remove(progress)
  fresh = evaluate.evaluate_workdir(c, wd)
  key = lambda r: (r["stage"], r["sampler"], r["steps"], r["w"], r["fid"], r["is"],
                   r["accuracy"])
  assert [key(r) for r in resumed["rows"]] == [key(r) for r in fresh["rows"]]
  assert len(fresh["rows"]) == total
  # The sampling loop: 3 batches of 16; preempted after the first.
  c = c.copy_and_resolve_references()
  c.sample.update(dict(stage="progressive_2", w=1.0, seed=5, batch_size=16))
  preemption._flag.set()
  try:
    with pytest.raises(preemption.Preempted, match="after 1 batches"):
      evaluate.sample_to_file(c, wd)
  finally:
    preemption.reset()
  out = os.path.join(wd, "samples", "s.npz")
  assert os.path.exists(out + ".partial.npz") and not os.path.exists(out)
  evaluate.sample_to_file(c, wd)
  assert not os.path.exists(out + ".partial.npz")
  with np.load(out, allow_pickle=False) as f:
    resumed_images = f["images"]
  evaluate.sample_to_file(c, wd)  # uninterrupted
  with np.load(out, allow_pickle=False) as f:
    np.testing.assert_array_equal(f["images"], resumed_images)
