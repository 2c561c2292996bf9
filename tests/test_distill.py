"""Guided distillation: plan, lineage refusals, stage one at init, toy2d quality, kill/resume."""
import json
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import data, driver, lineage, losses, plan, sampling, sharding, stage_setup, train
import util


def test_make_plan_names_and_parents():
  c = util.quick_config(**{"progressive.start_steps": 16, "progressive.end_steps": 2})
  p = plan.make_plan(c)
  assert [s.name for s in p] == ["teacher", "guided", "progressive_8", "progressive_4",
                                 "progressive_2"]
  assert [s.parent for s in p] == [None, "teacher", "guided", "progressive_8", "progressive_4"]
  assert p[2].teacher_steps == 16 and p[4].student_steps == 2
  c.stage = "progressive"
  c.init_from = "/some/export"
  assert plan.make_plan(c)[0].parent is None            # from config.init_from


def _meta(c, stage, **kw):
  m = lineage.export_metadata(c, stage, train_steps=1, parent=None, parent_path=None)
  m.update(kw)
  return m


@pytest.mark.reliability
def test_lineage_refusals():
  c = util.quick_config(**{"progressive.start_steps": 8})
  teacher, guided, p4, p2, p1 = plan.make_plan(c)
  # A progressive round from a teacher without w-conditioning.
  with pytest.raises(lineage.LineageError, match="w-conditioned"):
    lineage.check_parent(p4, c, _meta(c, teacher), "/x/teacher")
  # N not 2x the student's.
  with pytest.raises(lineage.LineageError, match="expected 4"):
    lineage.check_parent(p2, c, _meta(c, p1), "/x/p1")
  lineage.check_parent(p2, c, _meta(c, p4), "/x/p4")     # fits
  # Another architecture.
  other = util.quick_config(**{"model.ch": 64})
  with pytest.raises(lineage.LineageError, match=r"model.ch: expected 32, found 64"):
    lineage.check_parent(guided, c, _meta(other, teacher), "/x/teacher")
  # Stage one from a w-conditioned model.
  with pytest.raises(lineage.LineageError, match="needs a teacher"):
    lineage.check_parent(guided, c, _meta(c, guided), "/x/guided")
  # Another w range.
  with pytest.raises(lineage.LineageError, match="w in"):
    lineage.check_parent(p4, c, _meta(c, guided, w_range=[0.0, 8.0]), "/x/guided")


@pytest.mark.reliability
def test_init_from_wrong_parent_is_refused_before_compile(tmp_path):
  c = util.quick_config(**{"data.data_dir": str(tmp_path / "tfds")})
  wd = str(tmp_path / "wd")
  teacher = plan.Stage("teacher", "teacher", "teacher")
  os.makedirs(train.export_dir(wd, "teacher"))
  meta = _meta(c, teacher)
  import json
  with open(os.path.join(train.export_dir(wd, "teacher"), "metadata.json"), "w") as f:
    json.dump(meta, f)
  c.stage = "progressive"
  c.init_from = train.export_dir(wd, "teacher")
  with pytest.raises(lineage.LineageError, match="w-conditioned"):
    driver.train_and_evaluate(c, str(tmp_path / "wd2"))


def test_stage_one_loss_is_zero_at_step_zero_when_w_is_zero(tmp_path):
  """Stage one starts at the conditional teacher, whatever the network: the toy2d MLP (the
  U-Nets' student-from-teacher identity is tests/test_models.py's and test_text_models.py's)."""
  c = util.toy_config(**{"data.data_dir": str(tmp_path / "tfds"), "diffusion.w_max": 0.0,
                         "model.dropout": 0.3})
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  teacher_stage, guided_stage = plan.make_plan(c)[:2]
  with jax.set_mesh(mesh):
    ts = train.setup_stage(c, str(tmp_path), teacher_stage, mesh)
    tstate = train.init_state(c, teacher_stage, ts)
    # Perturb the teacher so that it is not the zero-output init.
    tparams = jax.tree.map(lambda p: p + 0.02 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                           tstate["params"])
    from gdistill import checkpoint
    checkpoint.save_export(train.export_dir(str(tmp_path), "teacher"), tparams,
                           lineage.export_metadata(c, teacher_stage, train_steps=0, parent=None,
                                                   parent_path=None))
    s = train.setup_stage(c, str(tmp_path), guided_stage, mesh)
    state = train.init_state(c, guided_stage, s)
    loss_fn = losses.make_loss("guided", student=s.student, teacher=s.teacher, config=c)
    batch = data.global_batch(c.data, global_batch_size=64, seed=0, step=0)
    loss, aux = jax.jit(loss_fn)(state["params"], s.teacher_params,
                                 {k: jnp.asarray(v) for k, v in batch.items()},
                                 jax.random.key(0))
  assert float(loss) < 1e-9, float(loss)
  # ...and not zero for w > 0.
  c.diffusion.w_max = 4.0
  loss_fn = losses.make_loss("guided", student=s.student, teacher=s.teacher, config=c)
  loss4, _ = jax.jit(loss_fn)(state["params"], s.teacher_params,
                              {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))
  assert float(loss4) > 1e-6
  # guided.w_power weights each example by (1 + w)^-p: at w = 4 exactly, 1/25 of the loss.
  c.diffusion.w_min = 4.0
  losses_by_p = []
  for p in (0.0, 2.0):
    c.guided.w_power = p
    loss_fn = losses.make_loss("guided", student=s.student, teacher=s.teacher, config=c)
    lp, _ = jax.jit(loss_fn)(state["params"], s.teacher_params,
                             {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))
    losses_by_p.append(float(lp))
  assert losses_by_p[0] > 1e-6
  np.testing.assert_allclose(losses_by_p[1], losses_by_p[0] / 25.0, rtol=1e-5)


def _energy_distance(a, b):
  def mean_dist(x, y):
    return np.mean(np.linalg.norm(x[:, None, :] - y[None, :, :], axis=-1))
  return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def test_round_steps_give_a_round_its_own_length_and_learning_rate_schedule(tmp_path):
  """progressive.round_steps: round 8 trains 30 steps, round 4 the section's 20, each with its
  own linear decay to 0 (the rounds share one compiled step only when their lengths agree)."""
  import importlib
  c = importlib.import_module("configs.toy2d").get_config("test")
  c.teacher.num_steps, c.guided.num_steps, c.progressive.num_steps = 20, 10, 20
  c.progressive.round_steps = ((8, 30),)
  c.eval.enabled = False
  wd = str(tmp_path / "toy")
  driver.train_and_evaluate(c, wd, devices=jax.devices()[:1])
  p = {s.name: s for s in plan.make_plan(c)}
  for name, steps in (("progressive_8", 30), ("progressive_4", 20)):
    assert plan.section(c, p[name]).num_steps == steps
    assert lineage.resume_record(c, p[name])["progressive.num_steps"] == steps
    assert util.load_export(train.export_dir(wd, name))[1]["train_steps"] == steps
    with open(os.path.join(wd, name, "metrics.jsonl")) as f:
      rows = [r for r in map(json.loads, f) if "lr" in r]
    last = max(rows, key=lambda r: r["step"])
    # The logged lr is the schedule at the step's start: lr / steps at the last of `steps`.
    assert last["step"] == steps, (name, last)
    np.testing.assert_allclose(last["lr"], c.progressive.lr / steps, rtol=1e-5)


@pytest.mark.slow  # a quality check (~1 min); the digits README run covers the pipeline
def test_toy2d_pipeline_student_beats_teacher_at_4_steps(tmp_path):
  import importlib
  c = importlib.import_module("configs.toy2d").get_config("test")
  wd = str(tmp_path / "toy")
  driver.train_and_evaluate(c, wd, devices=jax.devices()[:1])
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  p = {s.name: s for s in plan.make_plan(c)}
  teacher = stage_setup.student_model(c, p["teacher"])
  student = stage_setup.student_model(c, p["progressive_4"])
  tparams, _ = util.load_export(train.export_dir(wd, "teacher"))
  sparams, smeta = util.load_export(train.export_dir(wd, "progressive_4"))
  assert smeta["sampling_steps"] == 4 and smeta["parent"]["stage"] == "progressive_8"
  tfn = sampling.make_sampler(teacher, sampling.SamplerSpec("ddim", guided=True, clip=None), (2,))
  sfn = sampling.make_sampler(student, sampling.SamplerSpec("ddim", clip=None), (2,))
  labels = jnp.arange(1000) % c.model.num_classes
  for w in (0.0, 2.0):
    ref = np.asarray(tfn(tparams, jax.random.key(1), labels, w, jnp.int32(256)))
    t4 = np.asarray(tfn(tparams, jax.random.key(2), labels, w, jnp.int32(4)))
    s4 = np.asarray(sfn(sparams, jax.random.key(2), labels, w, jnp.int32(4)))
    e_t4, e_s4 = _energy_distance(ref, t4), _energy_distance(ref, s4)
    print(f"w={w}: energy distance to the 256-step teacher: teacher@4 {e_t4:.4f} "
          f"student@4 {e_s4:.4f}")
    assert e_s4 < e_t4


@pytest.mark.slow  # ~3.5 min of 4 processes; `pytest -m slow`. The default run keeps one test
@pytest.mark.reliability  # per mechanism (SIGTERM: test_scaleout, test_evaluate; SIGKILL:
def test_kill_and_sigterm_anywhere_then_rerun_is_bit_identical(tmp_path):  # test_reliability)
  """SIGTERM during stage one, kill -9 during a progressive round; the reruns end exactly where
  an uninterrupted run ends. Every stage resumes through the same run_stage; the soak
  (tests/soak.py, outside the default run) also interrupts the teacher and the evaluation,
  15 times in all.

  Order-independent: each signal is sent when a progress line appears, with the rest of the
  stage, an export and (for the SIGTERM) a whole further stage still to run, so the run cannot
  end before the signal lands; wherever the SIGTERM is handled (any later step of stage one,
  or the next stage), the rerun must resume exactly there."""
  # Short stages and one progressive round keep it inside the reliability suite's budget.
  ov = {"data.data_dir": str(tmp_path / "tfds"), "model.ch": 16, "model.head_dim": 16,
        "model.num_groups": 4, "teacher.num_steps": 10,
        "guided.num_steps": 10, "progressive.num_steps": 20, "progressive.start_steps": 2,
        "teacher.batch_size": 16, "guided.batch_size": 16, "progressive.batch_size": 16,
        "checkpoint.every_steps": 5, "log.every_steps": 5, "eval.enabled": False,
        "log.tensorboard": False}  # no TensorFlow import (~5 s) in each of the 5 processes
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "killed")
  # The reference saves only at the end of each stage: checkpoints never change the numbers.
  rc, out, _ = util.run_cli(ref, {**ov, "checkpoint.every_steps": 1000})
  assert rc == 0, out[-3000:]
  assert os.path.exists(os.path.join(ref, "teacher", "metrics.jsonl"))
  assert not os.path.exists(os.path.join(ref, "teacher", "tensorboard"))
  outs = []
  for target, sig in (("[guided] step 5/", signal.SIGTERM),
                      ("[progressive_1] step 10/", signal.SIGKILL)):
    rc, out, killed = util.run_cli(wd, ov, kill_on=target, sig=sig)
    assert killed, out[-3000:]
    if sig == signal.SIGTERM:  # checkpoint at the next step boundary, then exit 0
      stop = re.search(r"\[(guided|progressive_1)\] preempted at step (\d+)", out)
      assert rc == 0 and stop, out[-3000:]
      stopped_stage, stopped = stop.group(1), int(stop.group(2))
      assert stopped >= (5 if stopped_stage == "guided" else 1)
    else:
      assert rc == -signal.SIGKILL, out[-3000:]
    outs.append(out)
  rc, out, _ = util.run_cli(wd, ov)
  assert rc == 0, out[-3000:]
  outs.append(out)
  assert "[teacher] finished earlier" in out
  # The SIGKILL lands right after a checkpoint step: the rerun resumes from that one or, if the
  # kill beat its async commit, from the one before (step 5); SIGTERM saved its own step.
  assert f"[{stopped_stage}] resuming at step {stopped}" in outs[1]
  assert "[progressive_1] resuming at step" in outs[2]
  for stage in ("teacher", "guided", "progressive_1"):
    a, ma = util.load_export(train.export_dir(ref, stage))
    b, mb = util.load_export(train.export_dir(wd, stage))
    util.assert_trees_identical(a, b)
    assert ma["train_steps"] == mb["train_steps"]
