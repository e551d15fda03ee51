"""The coalition network's padding: the image border leaves no trace in its features."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax.models import coalition_net


def test_every_convolution_gives_a_uniform_input_the_same_output_at_the_border_as_inside():
  # Zero padding would give every pixel at the border outputs of its own (and, through the seven
  # stacked 3x3 convolutions, every pixel within 7 of it); reflected padding sees a uniform
  # input everywhere. Each convolution is checked on its own: through the whole network, the
  # instance norms of a uniform map (variance 0) amplify float rounding without bound.
  params = coalition_net.init_params(jax.random.key(0), 6, 0.125)
  for name, _ in coalition_net.CONV_LAYERS:
    kernel = params[name]["kernel"]
    values = jnp.linspace(0.1, 0.9, kernel.shape[2])
    uniform = jnp.broadcast_to(values, (1, 20, 20, kernel.shape[2]))
    output = np.asarray(nn.Conv(kernel.shape[3], (3, 3), padding=coalition_net.PADDING).apply(
        {"params": params[name]}, uniform))[0]
    assert output.shape[:2] == (20, 20) and np.abs(output).max() > 0.01, name
    np.testing.assert_allclose(output, np.broadcast_to(output[10, 10], output.shape), atol=1e-5,
                               err_msg=name)
    zero_padded = np.asarray(nn.Conv(kernel.shape[3], (3, 3), padding="SAME").apply(
        {"params": params[name]}, uniform))[0]
    assert np.abs(zero_padded[0] - zero_padded[10]).max() > 1e-3, name  # The test can fail.
