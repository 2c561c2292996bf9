"""Optimizer and EMA from a stage's training section."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(section) -> optax.Schedule:
  """Linear warm-up to lr, then 'constant', 'cosine' (to 0) or 'linear' (to 0) at num_steps."""
  lr, warm, total = float(section.lr), int(section.warmup_steps), int(section.num_steps)
  rest = max(total - warm, 1)
  if section.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif section.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, rest)
  elif section.schedule == "linear":
    main = optax.linear_schedule(lr, 0.0, rest)
  else:
    raise ValueError(f"schedule={section.schedule!r}; valid: constant, cosine, linear")
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(section, frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """Adam with the schedule and global-norm clipping. frozen: top-level parameter groups that
  keep their values (no update, no optimizer state, outside the clipping norm)."""
  adam = optax.chain(optax.clip_by_global_norm(float(section.grad_clip)),
                     optax.adam(lr_schedule(section), b1=float(section.b1), b2=float(section.b2)))
  return adam if not frozen else freeze(adam, frozen)


def freeze(inner: optax.GradientTransformation,
           frozen: tuple[str, ...]) -> optax.GradientTransformation:
  """inner on the parameters outside the top-level groups `frozen` (its state covers only
  them); the frozen groups get zero updates."""
  def train_part(tree):
    return None if tree is None else {k: v for k, v in tree.items() if k not in frozen}

  def init(params):
    return inner.init(train_part(params))

  def update(grads, state, params=None):
    updates, state = inner.update(train_part(grads), state, train_part(params))
    updates.update({k: jax.tree.map(jnp.zeros_like, v) for k, v in grads.items()
                    if k in frozen})
    return updates, state
  return optax.GradientTransformation(init, update)


def ema_decay_at(step, decay: float):
  """EMA warm-up: min(decay, (1 + step) / (10 + step)), so short runs are not stuck at init."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay):
  """ema <- decay * ema + (1 - decay) * params, computed as ema + (1 - decay) (params - ema):
  the same average, and exact where params == ema (a frozen group's average stays bit for bit
  its value, whatever the compiler does with the arithmetic)."""
  return jax.tree.map(lambda e, p: (e + (1.0 - decay) * (p - e)).astype(e.dtype), ema, params)


def tree_where(pred, new, old):
  """new where pred else old, leaf by leaf (pred a scalar bool)."""
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)
