"""A tiny random CNN (32x32 inputs, 10 classes) for fast tests of the CLIs, which otherwise load
EfficientNet-Lite0 and score 224x224 images.

Run as a script, ``python tests/tiny_model.py MODULE [FLAGS ...]`` is ``python -m MODULE [FLAGS ...]``
(``experiments.imagenet``, ``.evaluate``, ``.sweep``, ``.reproduce``) with the model registered as
``--model=tiny_cnn``.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "tiny_cnn"
SIZE = 32


def build(weights):
    """The classifier (random, seeded: the same in every process); ``weights`` is ignored."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from la_iprop.models.zoo import ModelFn

    class TinyCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jax.nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
            return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

    del weights
    module = TinyCNN()
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    return ModelFn(variables=variables, module=module, preprocess=lambda x: x * 2.0 - 1.0, name=TINY,
                   input_size=SIZE, num_classes=10)


def spec():
    from la_iprop.models.zoo import ModelSpec
    return ModelSpec(TINY, build, "a tiny random CNN for tests (32x32, 10 classes)", default_weights=dict)


def main() -> None:
    from absl import app

    from la_iprop.models import zoo

    zoo._MODELS[TINY] = spec()
    module = importlib.import_module(sys.argv[1])
    sys.argv = [f"{sys.argv[1]} (with {TINY})", *sys.argv[2:]]
    if hasattr(module, "define_flags"):  # the CLIs that define their flags only when run as a script
        module.define_flags()
    app.run(module.main, **({"flags_parser": module.parse_flags} if hasattr(module, "parse_flags") else {}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
