"""Everything that touches QDax: tasks, scoring, emitters, MAP-Elites, metrics.

Keeping QDax behind this one module means a QDax upgrade touches one file.
The scoring contract is QDax's: ``scoring_fn(genotypes, key) -> (fitnesses
[B], descriptors [B, D], extra)``; later stages score sampled policies with
exactly the function built here.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
from brax import envs as brax_envs
from brax.envs.wrappers import training as brax_training
from qdax.core.containers.mapelites_repertoire import (
    MapElitesRepertoire,
    compute_cvt_centroids,
    compute_euclidean_centroids,
)
from qdax.core.emitters.mutation_operators import isoline_variation
from qdax.core.emitters.standard_emitters import MixingEmitter
from qdax.core.map_elites import MAPElites
from qdax.core.neuroevolution.buffers.buffer import DCRLTransition
from qdax.core.neuroevolution.networks.networks import MLPDC
from qdax.tasks.brax.descriptor_extractors import get_feet_contact_proportion
from qdax.tasks.brax.v2 import reward_offset as QDAX_REWARD_OFFSET
from qdax.tasks.brax.v2.env_creators import (
    create_brax_scoring_fn,
    get_mask_from_transitions,
    make_policy_network_play_step_fn_brax,
)
from qdax.tasks.brax.v2.envs.base_env import QDEnv
from qdax.tasks.brax.v2.wrappers.locomotion_wrappers import FeetContactWrapper
from qdax.utils.metrics import default_qd_metrics

from lpd.errors import LpdError

__all__ = ["MapElitesRepertoire", "MAPElites", "ENVS"]

# Feet-contact tasks: name -> Brax body. The descriptor is the fraction of
# steps each foot touches the ground, in [0, 1].
ENVS = {
    "walker2d_uni": "walker2d",
    "halfcheetah_uni": "halfcheetah",
    "humanoid_uni": "humanoid",
    "hopper_uni": "hopper",
    "ant_uni": "ant",
}
BACKENDS = ("spring", "positional", "generalized", "mjx")
EMITTERS = ("map_elites", "pga_me", "dcrl_me")


# A foot touches the ground when its contact distance is at most this, per
# backend. The positional backend projects bodies out of the ground, so a foot
# resting on it reads a distance of 1e-6 to 1e-4, never <= 0: with QDax's test
# every descriptor would be 0. 1 mm separates resting feet from lifted ones.
CONTACT_TOLERANCE = {"spring": 0.0, "positional": 1e-3, "generalized": 0.0, "mjx": 0.0}


class FeetContact(FeetContactWrapper):
    """QDax's feet-contact descriptor, with a per-backend contact tolerance.

    For the ant, the feet are found by our own mapping: QDax names them after
    Brax-v1 bodies ("$ Body 4", ...), which the MJCF ant lacks, so QDax's
    descriptor would be empty. The ant's feet are the four lower-leg links,
    each the child of a hip link ``aux_1`` .. ``aux_4``.
    """

    def __init__(self, env: brax_envs.Env, body: str, tolerance: float):
        super().__init__(env, body)
        self._tolerance = tolerance
        if body == "ant":
            names, parents = env.sys.link_names, env.sys.link_parents
            self._feet_idx = jnp.array(
                [
                    i
                    for i, p in enumerate(parents)
                    if p >= 0 and names[p].startswith("aux_")
                ]
            )

    def _get_feet_contact(self, state) -> jax.Array:
        contact = state.pipeline_state.contact
        touching = contact.dist <= self._tolerance
        feet = jax.vmap(lambda i: (contact.link_idx[1] == i) & touching)
        return jnp.any(feet(self._feet_idx), axis=-1).astype(jnp.float32)


class _LocalMjx:
    """MuJoCo's ``mjx`` module, with ``put_model`` and ``make_data`` placing
    on this process's first device when no device is named.

    MJX's own default is ``jax.devices()[0]``, which in a run over several
    hosts belongs to process 0: every other process would fail to load a
    body ("Cross-host transfers are not supported").
    """

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def put_model(self, m, device=None, **kwargs):
        return self._module.put_model(m, device or jax.local_devices()[0], **kwargs)

    def make_data(self, m, device=None, **kwargs):
        return self._module.make_data(m, device or jax.local_devices()[0], **kwargs)


def _place_mjx_locally() -> None:
    """Points the ``mjx`` that Brax's loaders use at :class:`_LocalMjx`, in
    a run over several hosts (one process changes nothing)."""
    if jax.process_count() == 1:
        return
    from brax import contact
    from brax.io import mjcf
    from brax.mjx import pipeline

    for module in (contact, mjcf, pipeline):
        if not isinstance(module.mjx, _LocalMjx):
            module.mjx = _LocalMjx(module.mjx)


def make_env(env_name: str, episode_length: int, backend: str) -> brax_envs.Env:
    """A feet-contact task: a Brax body wrapped for descriptors and episodes.

    No auto-reset: the scoring function masks every step after the first done.
    """
    _place_mjx_locally()
    if env_name not in ENVS:
        raise LpdError(f"unknown env {env_name!r}; choose one of {sorted(ENVS)}")
    if backend not in BACKENDS:
        raise LpdError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    body = ENVS[env_name]
    env = brax_envs.get_environment(body, backend=backend, debug=True)
    env = FeetContact(env, body, CONTACT_TOLERANCE[backend])
    return brax_training.EpisodeWrapper(env, episode_length, action_repeat=1)


def descriptor_names(env: brax_envs.Env) -> list[str]:
    """One name per descriptor dimension: the foot's link name."""
    names = env.sys.link_names
    idx = [int(i) for i in env._feet_idx]
    return [names[i] or f"leg_{k + 1}" for k, i in enumerate(idx)]


def fitness_offset(env_name: str, episode_length: int) -> float:
    """Offset that makes episode returns non-negative, for QD scores."""
    return float(QDAX_REWARD_OFFSET[env_name]) * episode_length


def make_scoring_fn(
    env: brax_envs.Env,
    policy: Callable,
    episode_length: int,
    init_key: jax.Array,
    sharding: jax.sharding.Sharding,
    num_episodes: int = 1,
    dcrl_transitions: bool = False,
) -> Callable:
    """QDax's Brax scoring function, with the batch sharded over ``sharding``.

    With ``num_episodes`` 1, every policy starts from the same initial state
    (drawn once from ``init_key``), as in QDax's deterministic evaluation.
    With more, each policy runs that many episodes from random resets drawn
    from the call's key, and its fitness and descriptor are their means
    (the transitions keep the episodes: ``[B, T, num_episodes, ...]``).
    With ``dcrl_transitions``, the transitions are QDax's ``DCRLTransition``
    (the DCRL-ME emitter fills in their descriptors); one episode only.
    """
    if num_episodes > 1:
        scoring_fn = episodes_scoring_fn(
            env, policy, episode_length, num_episodes, sharding
        )

        def mean_scoring_fn(genotypes, key):
            fitnesses, descriptors, extra = scoring_fn(genotypes, key)
            return fitnesses.mean(axis=1), descriptors.mean(axis=1), extra

        return mean_scoring_fn
    scoring_fn = create_brax_scoring_fn(
        env,
        policy,
        get_feet_contact_proportion,
        init_key,
        play_step_fn=_dcrl_play_step_fn(env, policy) if dcrl_transitions else None,
        episode_length=episode_length,
        deterministic=True,
    )

    def sharded_scoring_fn(genotypes, key):
        genotypes = jax.lax.with_sharding_constraint(genotypes, sharding)
        return scoring_fn(genotypes, key)

    return sharded_scoring_fn


def _dcrl_play_step_fn(env, policy) -> Callable:
    """QDax's Brax play step, its transitions recorded as ``DCRLTransition``s
    (zero descriptors, which the DCRL-ME emitter sets)."""
    play_step_fn = make_policy_network_play_step_fn_brax(env, policy)
    zeros = jnp.zeros(env.descriptor_length)

    def dcrl_play_step_fn(env_state, policy_params, key):
        *state, transition = play_step_fn(env_state, policy_params, key)
        fields = {
            f.name: getattr(transition, f.name) for f in dataclasses.fields(transition)
        }
        return *state, DCRLTransition(**fields, desc=zeros, desc_prime=zeros)

    return dcrl_play_step_fn


def episodes_scoring_fn(
    env, policy, episode_length: int, num_episodes: int, sharding=None
):
    """QDax's stochastic Brax scoring function, each policy on ``num_episodes``.

    The env is wrapped in Brax's ``VmapWrapper``, so each policy drives its
    episodes as one batch (its weights are read once per step for all of
    them) instead of being copied per episode. Returns and descriptors come
    out ``[B, num_episodes]`` and ``[B, num_episodes, D]``. With
    ``sharding``, the batch is sharded over it (as :func:`make_scoring_fn`).
    """
    scoring_fn = create_brax_scoring_fn(
        brax_training.VmapWrapper(env, batch_size=num_episodes),
        policy,
        get_feet_contact_proportion,
        jax.random.key(0),  # Unused: resets are drawn from the call's key.
        episode_length=episode_length,
        deterministic=False,
    )
    if sharding is None:
        return scoring_fn
    return lambda genotypes, key: scoring_fn(
        jax.lax.with_sharding_constraint(genotypes, sharding), key
    )


def valid_steps(transitions) -> jax.Array:
    """1.0 where a step of QDax's ``transitions`` belongs to its episode (up to
    and including the first done), 0.0 after; the transitions' shape."""
    return 1.0 - get_mask_from_transitions(transitions)


def make_centroids(
    tessellation: str,
    grid_shape: tuple[int, ...],
    num_cvt_cells: int,
    num_descriptors: int,
    key: jax.Array,
) -> jax.Array:
    """Cell centroids ``[C, D]`` over ``[0, 1]^D``: a grid or a CVT."""
    if tessellation == "grid":
        if len(grid_shape) != num_descriptors:
            raise LpdError(
                f"archive.grid_shape has {len(grid_shape)} entries but the env has "
                f"{num_descriptors} descriptor dimensions"
            )
        return compute_euclidean_centroids(grid_shape, 0.0, 1.0)
    if tessellation == "cvt":
        return compute_cvt_centroids(
            num_descriptors, 50 * num_cvt_cells, num_cvt_cells, 0.0, 1.0, key
        )
    raise LpdError(f"unknown tessellation {tessellation!r}; choose 'grid' or 'cvt'")


def _register_brax_v1_shim() -> None:
    """Lets QDax 0.5.0's policy-gradient emitters import under brax 0.14.

    They import ``qdax.tasks.brax.v1`` only for a type hint, and that package
    needs ``brax.v1``, which brax 0.14 no longer ships; registering the v2
    ``QDEnv`` under the v1 module names satisfies the import.
    """
    names = [
        "qdax.tasks.brax.v1",
        "qdax.tasks.brax.v1.envs",
        "qdax.tasks.brax.v1.envs.base_env",
    ]
    for name in names:
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.QDEnv = QDEnv
            sys.modules[name] = module


def dcrl_actor(policy) -> MLPDC:
    """DCRL-ME's descriptor-conditioned actor for ``policy``: the same MLP
    (tanh layers, tanh actions) on the observation and the descriptor
    scaled to ``[-1, 1]``, so that with a descriptor folded into its first
    layer's bias it is a ``policy`` (see :func:`actor_as_policies`)."""
    return MLPDC(
        layer_sizes=(*policy.hidden_sizes, policy.action_size),
        activation=jnp.tanh,
        kernel_init=jax.nn.initializers.lecun_uniform(),
        final_activation=jnp.tanh,
    )


def actor_as_policies(actor_params, descriptors: jax.Array) -> dict:
    """The DCRL actor conditioned on each of ``descriptors`` ``[N, D]`` (in
    ``[0, 1]``): ``N`` policy parameter sets, as DCRL-ME's actor injection
    builds them (descriptor rows of the first kernel folded into its bias)."""
    num_dims = descriptors.shape[-1]
    first = actor_params["params"]["Dense_0"]
    kernel, desc_rows = first["kernel"][:-num_dims], first["kernel"][-num_dims:]

    def one(descriptor):
        bias = first["bias"] + (2.0 * descriptor - 1.0) @ desc_rows
        layers = {**actor_params["params"], "Dense_0": {"kernel": kernel, "bias": bias}}
        return {"params": layers}

    return jax.vmap(one)(jnp.asarray(descriptors, jnp.float32))


def make_emitter(
    emitter: str,
    batch_size: int,
    variation: dict,
    settings: dict,
    policy,
    env: brax_envs.Env,
):
    """A QDax emitter producing ``batch_size`` offspring per iteration.

    Args:
        emitter: "map_elites" (isoline variation), "pga_me" or "dcrl_me".
        batch_size: offspring per iteration.
        variation: ``iso_sigma``, ``line_sigma`` of the isoline operator.
        settings: the emitter's own settings: for "pga_me" the fields of
            QDax's ``PGAMEConfig``, for "dcrl_me" those of ``DCRLMEConfig``
            but ``ga_batch_size`` (the rest of ``batch_size``).
        policy: the Flax policy module.
        env: the task.
    """
    variation_fn = functools.partial(
        isoline_variation,
        iso_sigma=variation["iso_sigma"],
        line_sigma=variation["line_sigma"],
    )
    if emitter == "map_elites":
        return MixingEmitter(
            mutation_fn=None,
            variation_fn=variation_fn,
            variation_percentage=1.0,
            batch_size=batch_size,
        )
    if emitter == "pga_me":
        _register_brax_v1_shim()
        from qdax.core.emitters.pga_me_emitter import PGAMEConfig, PGAMEEmitter

        config = PGAMEConfig(env_batch_size=batch_size, **settings)
        return PGAMEEmitter(config, policy, env, variation_fn)
    if emitter == "dcrl_me":
        _register_brax_v1_shim()
        from qdax.core.emitters.dcrl_me_emitter import DCRLMEConfig, DCRLMEEmitter

        ga_batch_size = (
            batch_size - settings["dcrl_batch_size"] - settings["ai_batch_size"]
        )
        config = DCRLMEConfig(ga_batch_size=ga_batch_size, **settings)
        return DCRLMEEmitter(config, policy, dcrl_actor(policy), env, variation_fn)
    raise LpdError(f"unknown emitter {emitter!r}; choose one of {list(EMITTERS)}")


def make_map_elites(scoring_fn: Callable, emitter, qd_offset: float) -> MAPElites:
    """QDax's MAP-Elites with the standard QD metrics (coverage in %)."""
    metrics_fn = functools.partial(default_qd_metrics, qd_offset=qd_offset)
    return MAPElites(scoring_fn, emitter, metrics_fn)


def fill_archive(fitnesses, descriptors, centroids, fitness_offset: float) -> dict:
    """Inserts scored policies into a fresh QDax archive with ``centroids``.

    Args:
        fitnesses: ``[N]`` returns; descriptors: ``[N, D]``; centroids ``[C, D]``.

    Returns:
        ``cell_fitnesses [C]`` (the best return per cell, ``-inf`` where
        empty) and QDax's ``qd_score`` (with ``fitness_offset``),
        ``coverage`` (%) and ``max_fitness``.
    """
    num = fitnesses.shape[0]
    repertoire = MapElitesRepertoire.init(
        genotypes=jnp.arange(num),
        fitnesses=jnp.asarray(fitnesses, jnp.float32)[:, None],
        descriptors=jnp.asarray(descriptors, jnp.float32),
        centroids=jnp.asarray(centroids, jnp.float32),
    )
    metrics = default_qd_metrics(repertoire, fitness_offset)
    return {
        "cell_fitnesses": repertoire.fitnesses[:, 0],
        **{k: float(v) for k, v in metrics.items()},
    }
