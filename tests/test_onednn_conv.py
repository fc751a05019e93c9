"""oneDNN convolutions (flax_resnet.cpu.onednn) against lax.conv_general_dilated.

Forward pass and both gradients, on odd shapes, strides, groups, padding,
batch 1 and the 7x7 stem. Skipped, with the reason, where the extension cannot
be built; CI builds it (the README's install pulls the oneDNN wheels).
"""

import concurrent.futures
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest

from flax_resnet import cpu
from flax_resnet.cpu import onednn

NHWC = ('NHWC', 'HWIO', 'NHWC')

needs_onednn = pytest.mark.skipif(
    not onednn.available(),
    reason=f'oneDNN extension unavailable: {onednn.unavailable_reason()}')


def _conv(conv_fn, stride, padding, groups):
  return functools.partial(conv_fn, window_strides=stride, padding=padding,
                           dimension_numbers=NHWC,
                           feature_group_count=groups)


def _value_and_grads(conv, x, kernel, cotangent):
  def loss(x, kernel):
    out = conv(x, kernel)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  (_, out), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(x, kernel)
  return out, grads


CASES = [
    # shape (N, H, W, C), kernel, out channels, stride, padding, groups
    ((2, 8, 8, 4), 3, 6, (1, 1), ((1, 1), (1, 1)), 1),
    ((3, 9, 7, 5), 3, 4, (2, 2), ((1, 1), (1, 1)), 1),  # odd sizes, stride 2
    ((2, 8, 8, 4), 3, 4, (2, 2), 'SAME', 1),  # TF pads (0, 1)
    ((2, 9, 6, 3), 3, 5, (3, 2), ((2, 0), (0, 1)), 1),  # asymmetric
    ((1, 15, 15, 3), 7, 8, (2, 2), ((3, 3), (3, 3)), 1),  # the stem, batch 1
    ((2, 7, 9, 6), 1, 10, (2, 2), ((0, 0), (0, 0)), 1),  # 1x1, strided
    ((2, 6, 6, 8), 1, 8, (1, 1), 'VALID', 1),
    ((2, 8, 8, 8), 3, 12, (1, 1), ((1, 1), (1, 1)), 2),  # groups
    ((2, 9, 9, 64), 3, 64, (2, 2), ((1, 1), (1, 1)), 32),  # ResNeXt 32x2d
    ((1, 5, 5, 4), 5, 3, (1, 1), 'VALID', 1),  # window = image: 1x1 output
    ((2, 6, 5, 3), 2, 4, (2, 2), ((0, 1), (1, 0)), 1),  # even kernel
    ((1, 4, 4, 3), 3, 2, (1, 1), ((2, 2), (2, 2)), 1),  # pads > kernel / 2
]


@needs_onednn
@pytest.mark.parametrize('shape,size,out,stride,padding,groups', CASES)
def test_forward_and_gradients_match_lax(shape, size, out, stride, padding,
                                         groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(
      rng.normal(size=(size, size, shape[-1] // groups, out)), jnp.float32)
  ours = _conv(cpu.conv_general_dilated, stride, padding, groups)
  stock = _conv(lax.conv_general_dilated, stride, padding, groups)
  want_out = stock(x, kernel)
  cotangent = jnp.asarray(rng.normal(size=want_out.shape), jnp.float32)
  got = _value_and_grads(ours, x, kernel, cotangent)
  want = _value_and_grads(stock, x, kernel, cotangent)
  # f32 sums over up to 7*7*3 or 2*8*8 products in another order: a few ulp
  # of the largest magnitudes involved.
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(w))))
  # And it really ran oneDNN, not a silent fallback.
  hlo = jax.jit(ours).lower(x, kernel).as_text()
  assert 'flax_resnet_onednn_conv_forward' in hlo


@needs_onednn
def test_gradient_custom_calls_on_cpu_and_xla_convs_elsewhere():
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  kernel = jnp.ones((3, 3, 4, 4), jnp.float32)
  conv = _conv(cpu.conv_general_dilated, (2, 2), ((1, 1), (1, 1)), 1)
  step = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2),
                          argnums=(0, 1)))
  cpu_hlo = step.trace(x, kernel).lower(lowering_platforms=('cpu',)).as_text()
  for target in ('forward', 'input_grad', 'kernel_grad'):
    assert f'flax_resnet_onednn_conv_{target}' in cpu_hlo
  assert 'stablehlo.convolution' not in cpu_hlo
  gpu_hlo = step.trace(x, kernel).lower(
      lowering_platforms=('cuda',)).as_text()
  assert 'flax_resnet_onednn' not in gpu_hlo
  assert 'stablehlo.convolution' in gpu_hlo


@needs_onednn
def test_bfloat16_runs_on_onednn_or_falls_back_to_lax():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 8)), jnp.bfloat16)
  ours = _conv(cpu.conv_general_dilated, (2, 2), ((1, 1), (1, 1)), 1)
  stock = _conv(lax.conv_general_dilated, (2, 2), ((1, 1), (1, 1)), 1)
  cotangent = jnp.asarray(rng.normal(size=(2, 5, 5, 8)), jnp.float32)
  got = _value_and_grads(ours, x, kernel, cotangent)
  if not onednn.supports(x.shape, kernel.shape, jnp.bfloat16, (2, 2),
                         ((1, 1), (1, 1)), 1):
    # No bf16 kernels on this CPU: XLA's conv, bit for bit.
    for g, w in zip(jax.tree.leaves(got),
                    jax.tree.leaves(_value_and_grads(stock, x, kernel,
                                                     cotangent))):
      np.testing.assert_array_equal(g, w)
    return
  # oneDNN accumulates bf16 products in f32 and rounds once: compare with
  # the f32 result on the same (bf16-valued) inputs, to bf16 precision.
  want = _value_and_grads(stock, x.astype(jnp.float32),
                          kernel.astype(jnp.float32), cotangent)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=1e-2,
                               atol=1e-2 * float(jnp.max(jnp.abs(w))))


@needs_onednn
def test_unsupported_convs_fall_back_to_lax_exactly():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
  for kwargs in (dict(rhs_dilation=(2, 2)),  # dilation
                 dict(padding=((-1, 0), (0, 0)))):  # negative padding
    kwargs = dict(dict(padding=((1, 1), (1, 1))), **kwargs)
    ours = functools.partial(cpu.conv_general_dilated, window_strides=(1, 1),
                             dimension_numbers=NHWC, **kwargs)
    stock = functools.partial(lax.conv_general_dilated, window_strides=(1, 1),
                              dimension_numbers=NHWC, **kwargs)
    assert 'flax_resnet_onednn' not in jax.jit(ours).lower(
        x, kernel).as_text()
    np.testing.assert_array_equal(jax.jit(ours)(x, kernel),
                                  jax.jit(stock)(x, kernel))
  # float16 has no oneDNN path here: XLA's conv.
  x16, k16 = x.astype(jnp.float16), kernel.astype(jnp.float16)
  ours = _conv(cpu.conv_general_dilated, (1, 1), 'SAME', 1)
  stock = _conv(lax.conv_general_dilated, (1, 1), 'SAME', 1)
  np.testing.assert_array_equal(jax.jit(ours)(x16, k16),
                                jax.jit(stock)(x16, k16))


@needs_onednn
def test_nn_conv_with_bias_is_a_drop_in():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 10, 10, 3)), jnp.float32)
  make = lambda fn: nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1),) * 2,
                            use_bias=True, conv_general_dilated=fn)
  variables = make(lax.conv_general_dilated).init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda v: v + 0.5, variables)  # non-zero bias
  ours = jax.jit(make(cpu.conv_general_dilated).apply)(variables, x)
  want = jax.jit(make(lax.conv_general_dilated).apply)(variables, x)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_concurrent_calls_from_threads_agree():
  # XLA may run several custom calls at once; the primitive cache and the
  # per-thread scratch memory must not mix them up.
  rng = np.random.default_rng(4)
  shapes = [(2, 8 + i, 8, 4) for i in range(4)]
  xs = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  conv = jax.jit(_conv(cpu.conv_general_dilated, (1, 1), 'SAME', 1))
  serial = [np.asarray(conv(x, kernel)) for x in xs]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for _ in range(3):
      parallel = list(pool.map(lambda x: np.asarray(conv(x, kernel)),
                               xs * 2))
      for got, want in zip(parallel, serial * 2):
        np.testing.assert_array_equal(got, want)


def test_without_the_extension_one_warning_line_and_xla_convs(tmp_path):
  # A machine where it cannot build: no compiler. The conv still works.
  script = (
      'import jax, jax.numpy as jnp\n'
      'from jax import lax\n'
      'from flax_resnet import cpu\n'
      'x = jnp.ones((1, 6, 6, 3)); k = jnp.ones((3, 3, 3, 2))\n'
      "dn = ('NHWC', 'HWIO', 'NHWC')\n"
      "a = cpu.conv_general_dilated(x, k, (2, 2), 'SAME', "
      'dimension_numbers=dn)\n'
      "b = cpu.conv_general_dilated(x, k, (1, 1), 'SAME', "
      'dimension_numbers=dn)\n'
      "want = lax.conv_general_dilated(x, k, (2, 2), 'SAME', "
      'dimension_numbers=dn)\n'
      'assert (a == want).all()\n'
      "print('ok')\n")
  env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'),
             FLAX_RESNET_CACHE=str(tmp_path / 'cache'))
  result = subprocess.run([sys.executable, '-c', script], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'
  conftest.assert_one_warning_after_one_notice(result.stderr, 'oneDNN')
  assert 'oneDNN convolutions unavailable' in result.stderr


@needs_onednn
def test_several_devices_keep_xla_convs():
  # XLA's SPMD partitioner has no rule for the custom calls: with more than
  # one device the model keeps XLA's convolutions (and stays sharded).
  script = (
      'import jax, jax.numpy as jnp\n'
      'from flax_resnet import cpu\n'
      'assert jax.device_count() == 2\n'
      'f = jax.jit(lambda x, k: cpu.conv_general_dilated(x, k, (1, 1), '
      "'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))\n"
      'hlo = f.lower(jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 2))).as_text()\n'
      "assert 'flax_resnet_onednn' not in hlo and 'convolution' in hlo\n"
      "print('ok')\n")
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run([sys.executable, '-c', script], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'
