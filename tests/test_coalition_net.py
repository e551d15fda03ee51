"""The coalition network's padding: the image border leaves no trace in its features."""

import jax
import jax.numpy as jnp
import numpy as np

from pfc_jax.models import coalition_net


def test_uniform_image_gives_every_convolution_the_same_output_at_the_border_as_inside():
  # Zero padding would give every pixel within 7 of the border (7 stacked 3x3 convolutions)
  # outputs of its own; reflected padding sees a uniform image everywhere.
  network = coalition_net.CoalitionNet(num_channels=6, width=0.125)
  params = coalition_net.init_params(jax.random.key(0), 6, 0.125)
  image = jnp.full((1, 20, 20, 3), 0.3) + jnp.array([0.0, 0.2, 0.4])
  _, state = network.apply({"params": params}, image, capture_intermediates=True)
  for name, _ in coalition_net.CONV_LAYERS:
    output = np.asarray(state["intermediates"][name]["__call__"][0])[0]  # [H, W, C] before ReLU.
    assert output.shape[:2] == (20, 20) and np.abs(output).max() > 0.01, name
    np.testing.assert_allclose(output, np.broadcast_to(output[10, 10], output.shape), atol=1e-5,
                               err_msg=name)
