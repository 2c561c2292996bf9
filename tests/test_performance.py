"""Performance: the FLOP count against XLA's, the fast paths' equivalence, the benchmark.

The sampler's single compile for every N is tested in test_sampling.py.
"""
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import (benchmark, config_lib, config_validation, data, flops, losses, sharding,
                      stage_setup, train)
import util


def _tiny(**overrides):
  """A small U-Net (ch 16, attention at 4x4 and in the middle) with batches of 16."""
  base = {"model.ch": 16, "model.head_dim": 16, "model.num_groups": 8, "model.dropout": 0.0,
          "teacher.batch_size": 16, "guided.batch_size": 16, "progressive.batch_size": 16,
          "progressive.start_steps": 4, "progressive.end_steps": 1}
  base.update(overrides)
  return util.quick_config(**base)


_PROGRAMS = {}


def _step_program(c, kind, mesh, abstract=False):
  """(setup, state, batch, loss_fn, jitted train step) with random parameters; abstract:
  the state and teacher parameters as ShapeDtypeStructs (trace and lower, never run). The
  jitted step is shared by the tests asking for the same program (one compile)."""
  stage = benchmark._stage(c, kind)
  key = (kind, abstract, mesh, json.dumps([c.model.to_dict(), c.diffusion.to_dict(),
                                           c[stage.section].to_dict()], sort_keys=True))
  if key not in _PROGRAMS:
    s = benchmark.setup(c, stage, mesh, abstract_teacher=abstract)
    loss_fn = losses.make_loss(kind, student=s.student, teacher=s.teacher, config=c)
    _PROGRAMS[key] = s, loss_fn, train.make_train_step(loss_fn, s, c[stage.section], mesh)
  s, loss_fn, step = _PROGRAMS[key]
  state = s.abstract_state if abstract else benchmark.random_state(s)
  batch = benchmark.synthetic_batch(c, int(c[stage.section].batch_size), mesh,
                                    stage.student_steps or 0)
  return s, state, batch, loss_fn, step


def _loss_program(c, kind, batch_size=4):
  """One device, no mesh: (params, teacher params, batch, loss_fn), all parameters random."""
  stage = benchmark._stage(c, kind)
  student = stage_setup.student_model(c, stage)
  teacher = stage_setup.teacher_model(c, stage)
  def init(den, seed):  # random values in the init's shapes, without compiling the init
    r = np.random.default_rng(seed)
    value = lambda path, a: jnp.asarray(
        0.1 * r.standard_normal(a.shape) + (jax.tree_util.keystr(path).endswith("'scale']")),
        a.dtype)                                      # norm scales around 1, the rest around 0
    return jax.tree_util.tree_map_with_path(value, nn.unbox(den.init_abstract((8, 8, 1))))
  params = init(student, 0)
  tparams = None if teacher is None else init(teacher, 1)
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.uniform(-1, 1, (batch_size, 8, 8, 1)), jnp.float32),
           "label": jnp.arange(batch_size, dtype=jnp.int32) % 10,
           "student_steps": jnp.int32(stage.student_steps or 0), "seed": jnp.int32(0)}
  loss_fn = losses.make_loss(kind, student=student, teacher=teacher, config=c)
  return params, tparams, batch, loss_fn


@pytest.fixture
def tfds_dir(tmp_path_factory):
  """The session's digits8x8 (prepared on first use), shared with test_train.py."""
  return str(tmp_path_factory.getbasetemp() / "tfds")


@pytest.fixture
def mesh():
  from gdistill import sharding
  m = sharding.make_mesh(util.quick_config().mesh)
  with jax.set_mesh(m):
    yield m


@pytest.mark.parametrize("updown", [True, False])
def test_forward_flops_match_xla_on_a_small_unet(updown):
  c = _tiny(**{"model.resblock_updown": updown})
  from gdistill.denoiser import build_denoiser
  for w in (False, True):
    den = build_denoiser(c.model, w_embedding=w, dropout=0.0)
    p = nn.unbox(den.init_abstract((8, 8, 1)))
    b = 4
    args = (p, jnp.zeros((b, 8, 8, 1)), jnp.zeros((b,)), jnp.zeros((b,), jnp.int32))
    fwd = lambda p, z, l, y: den.x_pred(p, z, l, y, jnp.zeros((b,)) if w else None)
    analytic = b * flops.forward_flops(c.model, w)
    # XLA's count of the same dots and convolutions: exact.
    assert flops.xla_matmul_flops(fwd, *args) == pytest.approx(analytic, rel=1e-9)
    # XLA's count of every op (norms, activations, biases too) is within 5%.
    total = flops.xla_total_flops(jax.jit(fwd).lower(*args))
    assert analytic <= total <= 1.05 * analytic, total / analytic


@pytest.mark.parametrize("kind", ["teacher", "guided", "progressive"])
def test_train_step_flops_match_xla_and_teacher_has_no_backward(mesh, kind):
  """XLA's dot/conv FLOPs of the whole sharded step (traced from abstract state, never run)
  equal the analytic 2 teacher forwards + student forward/backward: had a teacher forward a
  backward graph, XLA would count 2 F_teacher more for it."""
  c = _tiny()
  s, state, batch, _, step = _step_program(c, kind, mesh, abstract=True)
  b = int(batch["x"].shape[0])
  traced = step.trace(state, s.teacher_params, batch)
  analytic = b * flops.step_flops_per_example(c, kind)
  assert flops.jaxpr_matmul_flops(traced.jaxpr) == pytest.approx(analytic, rel=1e-9)
  # Every op (norms, RNG, Adam, EMA too): within 5%.
  total = flops.xla_total_flops(traced.lower())
  assert analytic <= total <= 1.05 * analytic, total / analytic


def test_teacher_parameters_get_no_gradient():
  """stop_gradient on the targets: the loss's cotangent of every teacher parameter is a
  symbolic zero (a broadcast 0.0 in the gradient's jaxpr), never computed."""
  for kind in ("guided", "progressive"):
    params, tparams, batch, loss_fn = _loss_program(_tiny(), kind)
    jaxpr = jax.make_jaxpr(jax.grad(lambda tp: loss_fn(params, tp, batch, jax.random.key(0))[0]))(
        tparams).jaxpr
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    assert len(jaxpr.outvars) == len(jax.tree.leaves(tparams))
    for v in jaxpr.outvars:
      e = producer[v]
      assert e.primitive.name == "broadcast_in_dim" and len(e.invars) == 1, e
      assert isinstance(e.invars[0], jax.extend.core.Literal) and e.invars[0].val == 0.0


def test_step_flops_multipliers():
  c = _tiny()
  m = c.model
  f_t, f_s = flops.forward_flops(m, False), flops.forward_flops(m, True)
  teacher = flops.step_flops_breakdown(c, "teacher")
  assert teacher["teacher_forward"] == 0 and teacher["student_forward"] == f_t
  assert 1.9 * f_t < teacher["student_backward"] < 2 * f_t        # no input grad of conv_in
  assert flops.step_flops_breakdown(c, "guided")["teacher_forward"] == 2 * f_t
  assert flops.step_flops_breakdown(c, "progressive")["teacher_forward"] == 2 * f_s
  assert flops.sample_flops_per_image(c, 8, guided=True) == 16 * f_t
  assert flops.sample_flops_per_image(c, 8, guided=False) == 8 * f_s


def test_imagenet64_forward_flops_match_xla():
  """The full ADM shape (4 levels, attention at 32/16/8, 'both' output) counted abstractly."""
  import importlib
  c = importlib.import_module("configs.imagenet64").get_config()
  from gdistill.denoiser import build_denoiser
  den = build_denoiser(c.model, dropout=0.0)
  p = nn.unbox(den.init_abstract((64, 64, 3)))
  args = (p, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
  analytic = flops.forward_flops(c.model)
  assert flops.xla_matmul_flops(lambda *a: den.x_pred(*a), *args) == pytest.approx(analytic,
                                                                                   rel=1e-9)
  assert 200e9 < analytic < 220e9, analytic   # ~105 G multiply-adds per forward


def test_bf16_compute_keeps_fp32_params_statistics_and_loss():
  c32, c16 = _tiny(), _tiny(**{"model.dtype": "bfloat16"})
  params, _, batch, loss32 = _loss_program(c32, "teacher")
  p16, _, _, loss16 = _loss_program(c16, "teacher")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))     # parameters stay fp32
  rng = jax.random.key(3)
  vg = lambda f: jax.jit(jax.value_and_grad(lambda p: f(p, None, batch, rng)[0]))(params)
  (l32, g32), (l16, g16) = vg(loss32), vg(loss16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))
  # Stated tolerance: loss within 2% relative, gradient direction cosine > 0.99.
  assert float(l16) == pytest.approx(float(l32), rel=2e-2)
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g32, g16))
  assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
  # bf16 dots/convs; every reduction (norm statistics, softmax, loss) and exp/log in float32.
  jaxpr = jax.make_jaxpr(lambda p: loss16(p, None, batch, rng)[0])(params)
  eqns = list(_walk(jaxpr.jaxpr))
  mm = [e for e in eqns if e.primitive.name in flops.MATMUL_PRIMITIVES]
  assert mm and all(v.aval.dtype == jnp.bfloat16 for e in mm for v in e.invars)
  stats = [e for e in eqns if e.primitive.name in ("reduce_sum", "reduce_max", "exp", "log")]
  assert stats and all(v.aval.dtype == jnp.float32 for e in stats for v in e.invars)


def _walk(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _walk(getattr(sub, "jaxpr", sub))


def test_remat_gives_the_same_loss_and_grads():
  c0, c1 = _tiny(), _tiny(**{"model.remat": True})
  params, _, batch, loss0 = _loss_program(c0, "teacher")
  _, _, _, loss1 = _loss_program(c1, "teacher")
  rng = jax.random.key(5)
  traced = [jax.jit(jax.value_and_grad(lambda p, f=f: f(p, None, batch, rng)[0])).trace(params)
            for f in (loss0, loss1)]
  (l0, g0), (l1, g1) = (t.lower().compile()(params) for t in traced)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The remat program recomputes the res blocks' forwards in the backward: more hardware
  # FLOPs than model FLOPs (MFU counts model FLOPs; the analytic count is unchanged).
  model = int(batch["x"].shape[0]) * flops.step_flops_per_example(c0, "teacher")
  assert flops.jaxpr_matmul_flops(traced[0].jaxpr) == pytest.approx(model, rel=1e-9)
  assert flops.jaxpr_matmul_flops(traced[1].jaxpr) > 1.1 * model


def test_train_state_is_donated(mesh):
  """The train step's donation is the loop's, whatever the network: the toy2d MLP."""
  s, state, batch, _, step = _step_program(util.toy_config(**{"teacher.batch_size": 16}),
                                           "teacher", mesh)
  old = jax.tree.leaves(state)
  new, metrics = step(state, s.teacher_params, batch)
  jax.block_until_ready(new)
  assert all(x.is_deleted() for x in old)
  assert not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_device_families_and_peaks():
  fam = {"TPU v4": "TPU v4", "TPU v5 lite": "TPU v5e", "TPU v5": "TPU v5p", "TPU v5p": "TPU v5p",
         "TPU v6 lite": "TPU v6e", "NVIDIA A100-SXM4-80GB": "A100",
         "NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe",
         "NVIDIA H200": "H200", "cpu": None}
  for kind, want in fam.items():
    assert flops.device_family(kind) == want, kind
  assert flops.PEAK_FLOPS["H100 SXM"]["bfloat16"] == pytest.approx(989e12)
  peak, source = flops.peak_flops("float32")            # CPU: measured here
  assert peak > 1e9 and "measured" in source


_ROW_FIELDS = ("compile_s", "trace_s", "lower_s", "xla_compile_s", "median_s",
               "images_per_s_per_device", "flops_per_image", "xla_matmul_flops_per_image",
               "xla_total_flops_per_image", "flops_per_s_per_device", "mfu", "peak_memory_bytes")


def _check_rows(result, names):
  assert [r["name"] for r in result["rows"]] == names
  for r in result["rows"]:
    for k in _ROW_FIELDS:
      assert np.isfinite(r[k]) and r[k] >= 0, (r["name"], k)
    assert r["xla_matmul_over_analytic"] == pytest.approx(1.0, rel=1e-6), r["name"]
    assert 1.0 <= r["xla_total_over_analytic"] <= 1.05, r["name"]


def test_benchmark_runs_and_writes_its_json(tmp_path):
  result = benchmark.run(_tiny(), kinds=("teacher", "sample"), steps=1, warmup=1,
                         sample_repeats=1, sample_steps=2, reference_img_s=361.0,
                         log=lambda s: None)
  _check_rows(result, ["teacher", "sample_teacher_guided_2", "sample_student_2",
                       "sample_student_1"])
  assert result["rows"][1]["nfe"] == 4 and result["rows"][2]["nfe"] == 2
  assert result["reference"]["speedup"] > 0 and result["peak_flops_per_device"] > 0
  path = benchmark.write(result, str(tmp_path))
  assert json.load(open(path))["rows"][0]["name"] == "teacher"
  md = (tmp_path / "benchmark.md").read_text()
  assert "| teacher | 16 |" in md and "vs reference 361 img/s" in md


@pytest.mark.slow
def test_benchmark_all_steps_and_ratios(tfds_dir):
  result = benchmark.run(_tiny(**{"data.data_dir": tfds_dir}), kinds=benchmark.KINDS, steps=2,
                         warmup=1, sample_repeats=1, sample_steps=2, loader_rounds=1,
                         log=lambda s: None)
  _check_rows(result, ["teacher", "guided", "progressive", "sample_teacher_guided_2",
                       "sample_student_2", "sample_student_1"])
  assert set(result["step_time_ratios"]) == {"guided_over_teacher", "progressive_over_teacher"}
  assert result["batch_sizes"] == {"teacher": 16, "guided": 16, "progressive": 16, "sample": 16}
  assert set(result["loader"]["seconds_per_step"]) == set(benchmark.LOADER_MODES)


# ------------------------------------------------------------- the input pipeline's fast path
def _ulps(a, b):
  return int(np.max(np.abs(np.asarray(a, np.float32).view(np.int32).astype(np.int64)
                           - np.asarray(b, np.float32).view(np.int32).astype(np.int64))))


def test_device_normalization_is_the_host_path_bit_for_bit(mesh, tfds_dir):
  """data.normalize_on_device: the loader ships uint8 (and the flip mask); the jitted
  finish_batch gives the host path's float32 batch exactly (0 ulp, every uint8 value)."""
  u = np.arange(256, dtype=np.uint8)
  host = data.normalize(u)
  assert host[0] == -1.0 and host[255] == 1.0 and host.dtype == np.float32
  assert _ulps(jax.jit(data.normalize_on_device)(u), host) == 0
  # Why a lookup: XLA rewrites the division (126 ulp near 0 and 1.0000001 at 255 with jax
  # 0.10.2 on CPU); report it, do not depend on it.
  arith = jax.jit(lambda v: v.astype(jnp.float32) / jnp.float32(127.5) - jnp.float32(1.0))(u)
  print(f"jitted x / 127.5 - 1 vs numpy: max {_ulps(arith, host)} ulp")
  c = _tiny(**{"data.data_dir": tfds_dir, "data.random_flip": True})
  b = int(c.teacher.batch_size)
  feeds = _feeds(c, mesh, steps=3)
  raw = data.global_batch(c.data, global_batch_size=b, seed=3, step=5, host_normalize=False)
  assert raw["x"].dtype == np.uint8 and raw["x"].nbytes * 4 == feeds[True][0]["x"].nbytes
  assert 0 < raw["flip"].sum() < b                     # the flip is exercised both ways
  for h, d in zip(feeds[True], feeds[False]):
    assert set(d) == {"x", "label"} and d["x"].dtype == jnp.float32
    assert d["x"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
    assert _ulps(h["x"], d["x"]) == 0
    np.testing.assert_array_equal(h["label"], d["label"])
  # A float batch (toy2d, or the host path) passes through without a device program.
  flt = {"x": np.zeros((4, 2), np.float32), "label": np.zeros((4,), np.int32)}
  assert not data.needs_finish(flt) and train.batch_finisher(mesh)(flt) is flt


def _feeds(c, mesh, steps):
  """{host_normalize: [global float32 batches]} from the threaded loader, as training builds
  them (global_batch_from_local, then train.batch_finisher)."""
  b = int(c.teacher.batch_size)
  finish = train.batch_finisher(mesh)
  feeds = {}
  for host_normalize in (True, False):
    with data.make_loader(c.data, global_batch_size=b, seed=3, start_step=5,
                          host_normalize=host_normalize) as loader:
      feeds[host_normalize] = [finish(sharding.global_batch_from_local(next(loader)[1], mesh, b))
                               for _ in range(steps)]
  return feeds


def test_loader_paths_train_alike_and_the_benchmark_measures_them(mesh, tfds_dir):
  """Both loader paths give the same losses and parameters over 3 train steps; the 'loader'
  benchmark (one compile of the teacher step, shared) reports every figure."""
  c = _tiny(**{"data.data_dir": tfds_dir, "data.random_flip": True})
  s, state, batch, _, step = _step_program(c, "teacher", mesh)
  runs = {}
  for host_normalize, batches in _feeds(c, mesh, steps=3).items():
    state, losses_ = benchmark.random_state(s), []
    for b in batches:
      state, m = step(state, None, {**b, **train.step_scalars(mesh, 0, 0)})
      losses_.append(float(m["loss"]))
    runs[host_normalize] = losses_, state["params"]
  assert runs[True][0] == runs[False][0], runs
  for a, b in zip(jax.tree.leaves(runs[True][1]), jax.tree.leaves(runs[False][1])):
    np.testing.assert_array_equal(a, b)
  # The same jitted step as the benchmark's case (no second compile, no FLOP analysis).
  case = benchmark.StepCase("teacher", int(c.teacher.batch_size), step, state, None, batch,
                            {}, 0.0, 0.0, {})

  lo = benchmark.bench_loader(c, case, mesh, steps=2, warmup=1, rounds=1, log=lambda s: None)
  assert set(lo["seconds_per_step"]) == set(benchmark.LOADER_MODES)
  assert all(np.isfinite(v) and v > 0 for v in lo["seconds_per_step"].values())
  assert set(lo["overhead_pct"]) == set(benchmark.LOADER_MODES[1:]) == set(lo["estimate_pct"])
  assert all(0 < v < 100 for v in lo["estimate_pct"].values())
  for key in ("host_cost", "host_cost_64x64x3"):
    assert lo[key]["host_normalize_us"] > 0 and lo[key]["device_normalize_us"] > 0
  big = lo["host_cost_64x64x3"]                     # uint8 x + labels + flip vs float32 x + labels
  assert big["device_normalize_bytes"] == 16 * 64 * 64 * 3 + 16 * 4 + 16
  assert big["host_normalize_bytes"] == 4 * 16 * 64 * 64 * 3 + 16 * 4
  assert lo["pieces"]["finish_on_device_us"] > 0
  md = benchmark.loader_markdown(lo)
  assert "| loader host normalize |" in md and "| loader device normalize |" in md


def test_loader_benchmark_skips_an_unprepared_dataset(mesh, tmp_path):
  c = _tiny(**{"data.name": "cifar10", "data.data_dir": str(tmp_path)})
  out = benchmark.bench_loader(c, None, mesh, steps=1, warmup=0, rounds=1, log=lambda s: None)
  assert "tfds build cifar10" in out["skipped"]
  assert "skipped" in benchmark.loader_markdown(out)


def test_tensorflow_kept_off_accelerators_and_xla_cores():
  """configure_tensorflow before TensorFlow's import (as driver.prepare calls it): the import
  hook hides GPU/TPU and sets the pools before the first op (a summary write, as clu's writer
  does); a later call with other settings warns and leaves TensorFlow as it is (a started
  context cannot change). A fresh process without JAX: TensorFlow's import is the cost."""
  code = textwrap.dedent("""
      import json, os, sys, tempfile
      import ml_collections
      from gdistill import runtime
      cfg = ml_collections.ConfigDict(dict(tf_intra_op_threads=1, tf_inter_op_threads=2,
                                           tf_hide_accelerators=True))
      runtime.configure_tensorflow(cfg)
      imported_early = "tensorflow" in sys.modules
      import tensorflow as tf
      with tf.summary.create_file_writer(tempfile.mkdtemp()).as_default():
        tf.summary.scalar("loss", 1.0, step=1)           # the first op starts the context
      first = runtime.tensorflow_report()
      runtime.configure_tensorflow(cfg)                  # unchanged: nothing to do, no warning
      again = runtime.tensorflow_report()
      env = [os.environ.get("TF_NUM_INTRAOP_THREADS"), os.environ.get("TF_NUM_INTEROP_THREADS")]
      runtime.configure_tensorflow(intra_op_threads=3)   # too late: one warning, no exception
      print(json.dumps({"early": imported_early, "first": first, "again": again,
                        "late": runtime.tensorflow_report(), "env": env,
                        "jax": "jax" in sys.modules}))
      """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  p = subprocess.run([sys.executable, "-c", code], cwd=util.ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert not r["early"]                                  # configuring does not import it
  want = {"applied": True, "error": "", "visible_device_types": ["CPU"],
          "intra_op_threads": 1, "inter_op_threads": 2}
  assert r["first"] == want and r["again"] == want
  assert not r["late"]["applied"] and r["late"]["intra_op_threads"] == 1
  assert p.stderr.count("TensorFlow's context started before") == 1
  assert r["env"] == ["1", "2"]


def test_xla_cpu_flags_are_added_before_jax_starts_and_yield_to_the_user():
  """runtime.configure_xla_cpu (gdistill.main, the benchmark, gdistill.load and the tests call
  it first): in a fresh process it adds its XLA_FLAGS entry, which this jaxlib accepts and
  which takes convolutions away from YNNPACK (no ynn fusion in the compiled conv; XLA's default
  makes one, which is what the flag is for); it keeps a user's own entry, is off with
  GDISTILL_XLA_CPU_DEFAULTS=0 or on a jaxlib it was not measured on, and does nothing once
  JAX's backends have started."""
  code = textwrap.dedent("""
      import importlib.metadata, json, os, sys
      from gdistill import runtime
      mode = sys.argv[1]
      if mode == "other_jaxlib":
        importlib.metadata.version = lambda name: "99.0.0"
      said = runtime.configure_xla_cpu()
      flags = os.environ.get("XLA_FLAGS", "")
      import jax, jax.numpy as jnp
      conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x, k = jnp.ones((8, 8, 8, 16)), jnp.ones((3, 3, 16, 32))
      hlo = jax.jit(conv).lower(x, k).compile().as_text()
      value = float(jax.jit(conv)(x, k)[0, 4, 4, 0])
      print(json.dumps({"said": said, "flags": flags, "ynn_conv": "ynn_fusion" in hlo,
                        "value": value, "late": runtime.configure_xla_cpu()}))
      """)

  def run(mode, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GDISTILL_XLA_CPU_DEFAULTS")}
    e.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, "-c", code, mode], cwd=util.ROOT, env=e,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])

  flag = "--xla_cpu_experimental_ynn_fusion_type="
  on = run("default", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  if not on["said"].startswith("on"):
    pytest.skip(f"gdistill's XLA CPU flags do not apply to this jaxlib: {on['said']}")
  assert on["flags"] == ("--xla_force_host_platform_device_count=2 "
                         + flag + "individual_dot"), on
  assert not on["ynn_conv"] and on["value"] == 9 * 16        # XLA's own kernel, same result
  assert on["late"] == "off (JAX's backends had already started)"
  default = run("default", GDISTILL_XLA_CPU_DEFAULTS="0")
  assert default["flags"] == "" and default["said"].startswith("off") and default["ynn_conv"]
  assert default["value"] == on["value"]
  mine = run("default", XLA_FLAGS=flag)                      # the user's entry (no fusions)
  assert mine["flags"] == flag and mine["said"].startswith("kept") and not mine["ynn_conv"]
  other = run("other_jaxlib")
  assert other["flags"] == "" and "not 99.0.0" in other["said"]


def test_data_fast_path_keys_are_validated():
  for key, bad in (("data.tf_intra_op_threads", -1), ("data.tf_inter_op_threads", -2)):
    c = util.quick_config(**{key: bad})
    with pytest.raises(config_lib.ConfigError, match=f"config.{key}={bad}"):
      config_validation.validate(c, num_devices=1)
  c = util.quick_config()
  assert c.data.normalize_on_device is True and c.data.tf_hide_accelerators is True
  assert (c.data.tf_intra_op_threads, c.data.tf_inter_op_threads) == (1, 1)
