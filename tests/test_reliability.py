"""Reliability: validation before compile, non-finite guard, kill during an async checkpoint
write, no pickle. (Kill/SIGTERM resume of the pipeline: test_distill.py; corrupt checkpoints and
strict restores: test_checkpoint.py; preemption of evaluate/sample: test_evaluate.py; SIGTERM to
one of two processes and the peer watchdog: test_scaleout.py. All of them carry the
`reliability` marker: `pytest -m "reliability and not slow"` runs the suite of the default run.)"""
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from gdistill import config_lib, config_validation, data, driver, train
import util
import xla_env

pytestmark = pytest.mark.reliability

def _cfg(**ov):
  return util.quick_config(**ov)


# (override, devices, processes, the key and the value the message must name, a valid hint)
BAD = [
    ({"progressive.start_steps": 12}, 1, 1, "progressive.start_steps=12", "power of two"),
    ({"progressive.end_steps": 3}, 1, 1, "progressive.end_steps=3", "power of two"),
    ({"progressive.end_steps": 16}, 1, 1, "progressive.end_steps=16",
     "< progressive.start_steps=8"),
    ({"diffusion.w_min": 5.0}, 1, 1, "diffusion.w_min=5.0", "<= diffusion.w_max=4.0"),
    ({"guided.w_power": -1.0}, 1, 1, "guided.w_power=-1.0", "a number >= 0"),
    ({"progressive.round_steps": ((3, 100),)}, 1, 1, "progressive.round_steps=((3, 100),)",
     "rounds (4, 2, 1) at most once and steps >= 1, e.g. '((1, 800),)', or '()'"),
    ({"diffusion.p_uncond": 1.0}, 1, 1, "diffusion.p_uncond=1.0", "[0, 1)"),
    ({"diffusion.p_uncond": -0.1}, 1, 1, "diffusion.p_uncond=-0.1", "[0, 1)"),
    ({"teacher.batch_size": 60}, 8, 1, "teacher.batch_size=60", "divisible by the 8 devices"),
    ({"teacher.batch_size": 64}, 1, 3, "teacher.batch_size=64", "divisible by the 3 processes"),
    ({"model.image_size": 9}, 1, 1, "model.image_size=9", "2^(levels-1) = 2"),
    ({"model.attn_resolutions": (2,)}, 1, 1, "model.attn_resolutions=(2,)", "never reached"),
    ({"model.head_dim": 24}, 1, 1, "model.head_dim=24", "must divide the channels"),
    ({"model.parametrization": "score"}, 1, 1, "model.parametrization='score'", "one of"),
    ({"diffusion.weighting": "snr+1"}, 1, 1, "diffusion.weighting='snr+1'", "one of"),
    ({"sample.sampler": "euler"}, 1, 1, "sample.sampler='euler'", "one of"),
    ({"model.dtype": "float8"}, 1, 1, "model.dtype='float8'", "one of"),
    ({"stage": "student"}, 1, 1, "stage='student'", "one of"),
]


@pytest.mark.parametrize("ov,devices,processes,named,hint", BAD,
                         ids=[next(iter(b[0])) + f"-{i}" for i, b in enumerate(BAD)])
def test_validation_names_key_value_and_what_is_valid(ov, devices, processes, named, hint):
  c = _cfg(**ov)
  with pytest.raises(config_lib.ConfigError) as e:
    config_validation.validate(c, num_devices=devices, num_processes=processes)
  msg = str(e.value)
  assert named in msg and hint in msg, msg


@pytest.mark.parametrize("ov,named,hint", [
    ({"model.channels": 3}, "model.image_size/channels", "the model expects (8, 8, 3)"),
    ({"model.image_size": 16, "model.attn_resolutions": (8,)}, "model.image_size/channels",
     "examples of shape (8, 8, 1)"),
    ({"model.num_classes": 12}, "model.num_classes=12", "has 10 classes"),
])
def test_dataset_must_match_the_model(tmp_path, tmp_path_factory, ov, named, hint):
  c = _cfg(**{"data.data_dir": str(tmp_path_factory.getbasetemp() / "tfds"), **ov})
  with pytest.raises(config_lib.ConfigError) as e:
    driver.prepare(c, str(tmp_path / "wd"), devices=jax.devices()[:1])
  assert named in str(e.value) and hint in str(e.value), str(e.value)
  assert not os.path.exists(tmp_path / "wd")  # refused before writing anything


def test_cli_refuses_bad_and_unknown_keys_before_compiling(tmp_path):
  wd = str(tmp_path / "wd")
  t0 = time.time()
  rc, out, _ = util.run_cli(wd, {"progressive.start_steps": 12})
  assert rc == 2 and "config.progressive.start_steps=12 is invalid" in out, out[-2000:]
  rc2, out2, _ = util.run_cli(wd, {"teacher.lrr": 0.1})
  assert rc2 != 0 and "lrr" in out2, out2[-2000:]
  print(f"two refused runs in {time.time() - t0:.1f} s")
  assert not os.path.exists(os.path.join(wd, "teacher"))  # no stage dir, no checkpoint


# ---------------------------------------------------------------------------- non-finite guard
# The guard is the train loop's, whatever the network: the toy2d MLP (compiles in seconds).
TINY = {"stage": "teacher", "teacher.num_steps": 12, "teacher.batch_size": 16,
        "checkpoint.every_steps": 4, "checkpoint.async_save": False, "log.every_steps": 1,
        "log.tensorboard": False}


class _PoisonedLoader:
  """data.make_loader with x = NaN at the given steps (garbage data)."""

  def __init__(self, inner, bad_steps):
    self.inner, self.bad = inner, set(bad_steps)

  def __enter__(self):
    it = self.inner.__enter__()

    def gen():
      for step, local in it:
        if step in self.bad:
          # float32 NaN images (the loader ships uint8 under data.normalize_on_device; a float
          # batch passes through the device finisher unchanged).
          local = dict(local, x=np.full(local["x"].shape, np.nan, np.float32))
        yield step, local
    return gen()

  def __exit__(self, *a):
    return self.inner.__exit__(*a)


def _poison(monkeypatch, bad_steps):
  real = data.make_loader
  monkeypatch.setattr(train.data, "make_loader",
                      lambda *a, **k: _PoisonedLoader(real(*a, **k), bad_steps))


def _rows(wd):
  with open(os.path.join(wd, "teacher", "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
  _poison(monkeypatch, {5, 9})
  c = util.toy_config(**{"data.data_dir": str(tmp_path / "tfds"), **TINY})
  wd = str(tmp_path / "wd")
  driver.train_and_evaluate(c, wd, devices=jax.devices()[:1])
  rows = {r["step"]: r for r in _rows(wd)}
  assert rows[6]["nonfinite"] == 1 and rows[10]["nonfinite"] == 1   # (step s is row s + 1)
  assert rows[5]["nonfinite"] == 0 and rows[12]["skipped_total"] == 2
  assert np.isfinite(rows[12]["loss"])
  params, meta = util.load_export(train.export_dir(wd, "teacher"))
  assert meta["train_steps"] == 12
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_consecutive_nonfinite_steps_stop_the_run_keeping_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  _poison(monkeypatch, set(range(6, 100)))
  c = util.toy_config(**{"data.data_dir": str(tmp_path / "tfds"), **TINY,
                         "teacher.max_nonfinite": 3})
  wd = str(tmp_path / "wd")
  with pytest.raises(train.NonFiniteError) as e:
    driver.train_and_evaluate(c, wd, devices=jax.devices()[:1])
  msg = str(e.value)
  assert "3 consecutive steps" in msg and "teacher.lr" in msg and "checkpoint" in msg, msg
  assert not train.is_finished(wd, "teacher")
  ckdir = os.path.join(wd, "teacher", "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
  assert steps and steps[0] == 4, steps
  # Every kept checkpoint holds finite parameters (skipped steps never touch them).
  from gdistill import checkpoint as ckpt_lib
  from gdistill import plan, sharding
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    s = train.setup_stage(c, wd, plan.Stage("teacher", "teacher", "teacher"), mesh)
    with ckpt_lib.StageCheckpointer(ckdir, create=False) as ck:
      for step in steps:
        state, _ = ck.restore(step, s.abstract_state)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
        assert int(state["skipped"]) == max(0, step - 6)


# ------------------------------------------------------------- kill during an async write
_WRITER = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from gdistill import checkpoint as ckpt
    d = sys.argv[1]
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    def state(v):  # ~64 MB, so the async commit of step 2 is still in flight at the kill
      return {"step": jnp.int32(v), "params": {"w": jnp.full((4096, 4096), float(v))}}
    ck = ckpt.StageCheckpointer(d, keep=3, async_save=True)
    ck.save(1, state(1), {"v": 1}); ck.wait()
    ck.save(2, state(2), {"v": 2})
    print("SAVE2_STARTED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_during_async_checkpoint_write_never_reads_a_partial_step(tmp_path):
  d = str(tmp_path / "ck")
  env = dict(os.environ, XLA_FLAGS=xla_env.xla_flags(1),
             JAX_PLATFORMS="cpu", PYTHONPATH=util.ROOT)
  p = subprocess.run([sys.executable, "-c", _WRITER, d], env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == -9 and "SAVE2_STARTED" in p.stdout, p.stderr[-2000:]
  from gdistill import checkpoint as ckpt_lib
  left = sorted(os.listdir(d))
  print("directory after the kill:", left)
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=rep),
            "params": {"w": jax.ShapeDtypeStruct((4096, 4096), np.float32, sharding=rep)}}
  with ckpt_lib.StageCheckpointer(d, create=False) as ck:
    step, state, extra = ck.restore_latest_usable(target)
  # Whatever the kill interrupted, the step read back is a complete one.
  assert step in (1, 2) and extra == {"v": step}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), float(step))
  assert int(state["step"]) == step
  if step == 1:  # the commit of step 2 was cut: its temporary directory is never read
    assert any("tmp" in n for n in left) or "2" not in left, left


# ------------------------------------------------------------------------------ no pickle
def test_no_pickle_anywhere_in_the_package():
  pkg = os.path.join(util.ROOT, "gdistill")
  bad = []
  for root, _, files in os.walk(pkg):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      for i, line in enumerate(open(path), 1):
        code = line.split("#")[0]
        if (re.search(r"\bimport (c?pickle|dill|joblib)\b|\bpickle\.", code)
            or "allow_pickle=True" in code
            or (re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code)):
          bad.append(f"{os.path.relpath(path, util.ROOT)}:{i}: {line.strip()}")
  assert not bad, "\n".join(bad)
