"""Performance: the FLOP count against XLA's, the fast paths' equivalence, the benchmark.

The sampler's single compile for every N is tested in test_sampling.py.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdistill import benchmark, flops, losses, train
import util


def _tiny(**overrides):
  """A small U-Net (ch 16, attention at 4x4 and in the middle) with batches of 16."""
  base = {"model.ch": 16, "model.head_dim": 16, "model.num_groups": 8, "model.dropout": 0.0,
          "teacher.batch_size": 16, "guided.batch_size": 16, "progressive.batch_size": 16,
          "progressive.start_steps": 4, "progressive.end_steps": 1}
  base.update(overrides)
  return util.quick_config(**base)


def _step_program(c, kind, mesh, abstract=False):
  """(setup, state, batch, loss_fn, jitted train step) with random parameters; abstract:
  the state and teacher parameters as ShapeDtypeStructs (trace and lower, never run)."""
  stage = benchmark._stage(c, kind)
  s = benchmark.setup(c, stage, mesh, abstract_teacher=abstract)
  state = s.abstract_state if abstract else benchmark.random_state(s)
  loss_fn = losses.make_loss(kind, student=s.student, teacher=s.teacher, dcfg=c.diffusion)
  step = train.make_train_step(loss_fn, s, c[stage.section], mesh)
  batch = benchmark.synthetic_batch(c, int(c[stage.section].batch_size), mesh,
                                    stage.student_steps or 0)
  return s, state, batch, loss_fn, step


def _loss_program(c, kind, batch_size=4):
  """One device, no mesh: (params, teacher params, batch, loss_fn), all parameters random."""
  stage = benchmark._stage(c, kind)
  student = train.student_denoiser(c, stage)
  teacher = train.teacher_denoiser(c, stage)
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
  loss_fn = losses.make_loss(kind, student=student, teacher=teacher, dcfg=c.diffusion)
  return params, tparams, batch, loss_fn


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
  s, state, batch, _, step = _step_program(_tiny(), "teacher", mesh)
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
def test_benchmark_all_steps_and_ratios():
  result = benchmark.run(_tiny(), steps=2, warmup=1, sample_repeats=1, sample_steps=2,
                         log=lambda s: None)
  _check_rows(result, ["teacher", "guided", "progressive", "sample_teacher_guided_2",
                       "sample_student_2", "sample_student_1"])
  assert set(result["step_time_ratios"]) == {"guided_over_teacher", "progressive_over_teacher"}
  assert result["batch_sizes"] == {"teacher": 16, "guided": 16, "progressive": 16, "sample": 16}
