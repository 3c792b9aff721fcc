"""Run with 8 virtual CPU devices: sharded training equals single-device training."""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaoptimize.optax import metaoptimize, step_sizes


def loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def train(params: dict[str, jax.Array], blocks: str) -> tuple[dict[str, jax.Array], dict]:
    opt = metaoptimize(
        base="adamw",
        meta="adam",
        alpha0=1e-2,
        meta_lr=5e-2,
        gamma=0.95,
        weight_decay=0.1,
        blocks=blocks,
    )
    state = opt.init(params)

    @jax.jit
    def step(params: dict, state: object, x: jax.Array, y: jax.Array) -> tuple[dict, object]:
        updates, state = opt.update(jax.grad(loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(1)
    for _ in range(20):
        x, y = rng.standard_normal((32, 16)), rng.standard_normal((32, 1))
        params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
    return params, step_sizes(state, params)


def main() -> None:
    devices = jax.devices()
    print("devices", len(devices))
    rng = np.random.default_rng(0)
    host = {"w": rng.standard_normal((16, 64)) * 0.3, "v": rng.standard_normal((64, 1)) * 0.3}
    mesh = Mesh(np.array(devices), ("shard",))
    spec = {"w": PartitionSpec(None, "shard"), "v": PartitionSpec("shard", None)}
    same = True
    for blocks in ("scalar", "tensor", "weight"):
        single, single_sizes = train({k: jnp.asarray(v) for k, v in host.items()}, blocks)
        sharded_params = {
            k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, spec[k])) for k, v in host.items()
        }
        assert len(sharded_params["w"].sharding.device_set) == 8
        sharded, sharded_sizes = train(sharded_params, blocks)
        for key in host:
            same &= bool(
                np.allclose(
                    np.asarray(single[key]), np.asarray(sharded[key]), rtol=1e-12, atol=1e-14
                )
            )
        for key in single_sizes:
            same &= bool(
                np.allclose(
                    np.asarray(single_sizes[key]),
                    np.asarray(sharded_sizes[key]),
                    rtol=1e-12,
                    atol=0,
                )
            )
            same &= bool(np.any(np.asarray(single_sizes[key]) != 1e-2))
    print("sharded == single-device:", same)


if __name__ == "__main__":
    main()
