"""Default CPU experiment: walker2d feet-contact archive sized for 2 cores.

`make run` runs it into runs/default/; `default.py:hopper_uni` is the same
run on another env. Override any field from the command line, e.g.
`--config.archive.num_iterations=400`.
"""

import ml_collections


def get_archive_config() -> ml_collections.ConfigDict:
    """Archive-stage settings shared by every experiment config."""
    return ml_collections.ConfigDict(
        dict(
            env="walker2d_uni",  # walker2d_uni, halfcheetah_uni, humanoid_uni,
            # hopper_uni (1-D descriptor), ant_uni (4-D descriptor)
            backend="spring",  # spring (fastest on CPU), positional, generalized, mjx
            episode_length=250,  # every rollout's length (the search's if unset below)
            # The search's own episode length, when it should select elites on
            # longer episodes than the codec, sweep and evaluation roll out
            # (unset: episode_length). The stored returns and foot contact are
            # then measured over it.
            search_episode_length=ml_collections.config_dict.placeholder(int),
            policy_hidden_sizes=(128, 128),
            normalise_obs=False,
            emitter="map_elites",  # map_elites (isoline variation), pga_me or dcrl_me
            batch_size=256,  # offspring per iteration, sharded over devices
            # Initial policies: 0 draws batch_size independent ones; N > 0 draws
            # N and repeats them, so the archive grows from N ancestors.
            num_ancestors=0,
            num_iterations=300,
            log_period=10,  # iterations per jitted chunk / log / checkpoint
            # Episodes each offspring is scored on: 1 is QDax's deterministic
            # scoring (every policy from one fixed start state); N > 1 scores
            # it from N random starts (mean return and foot contact), for
            # elites that hold their gait from other states; N times the env
            # steps. map_elites only.
            scoring_episodes=1,
            # Random-start episodes per elite of the check the stage ends with
            # (how many stored cells the elites still fill re-run from random
            # starts; meta.json "reevaluation"); 0 skips it.
            reeval_episodes=8,
            iso_sigma=0.005,
            line_sigma=0.05,
            tessellation="grid",  # grid or cvt
            grid_shape=(32, 32),  # cells per descriptor dimension (grid)
            num_cvt_cells=1024,  # number of cells (cvt)
            # PGA-ME only (fields of qdax PGAMEConfig).
            pga=dict(
                proportion_mutation_ga=0.5,
                num_critic_training_steps=300,
                num_pg_training_steps=100,
                replay_buffer_size=200_000,
                critic_hidden_layer_size=(256, 256),
                critic_learning_rate=3e-4,
                greedy_learning_rate=3e-4,
                policy_learning_rate=1e-3,
                noise_clip=0.5,
                policy_noise=0.2,
                discount=0.99,
                reward_scaling=1.0,
                batch_size=256,
                soft_tau_update=0.005,
                policy_delay=2,
            ),
            # DCRL-ME only (fields of qdax DCRLMEConfig; its GA emitter gets
            # the rest of batch_size). Its descriptor-conditioned actor is
            # saved with the archive. Training steps sized for CPU, like pga.
            dcrl=dict(
                dcrl_batch_size=64,
                ai_batch_size=64,
                lengthscale=0.1,
                critic_hidden_layer_size=(256, 256),
                num_critic_training_steps=300,
                num_pg_training_steps=100,
                batch_size=100,
                replay_buffer_size=200_000,
                discount=0.99,
                reward_scaling=1.0,
                critic_learning_rate=3e-4,
                actor_learning_rate=3e-4,
                policy_learning_rate=1e-3,
                noise_clip=0.5,
                policy_noise=0.2,
                soft_tau_update=0.005,
                policy_delay=2,
            ),
        )
    )


def get_codec_config() -> ml_collections.ConfigDict:
    """Weight-codec settings shared by every experiment config."""
    return ml_collections.ConfigDict(
        dict(
            latent_dim=64,
            encoder_features=64,  # per-tensor encoder width
            encoder_hidden=256,
            decoder_hidden=256,  # decoder trunk width
            row_features=128,  # per-row generator width
            basis_dim=0,  # full-size basis tensors in the decoder (0: none)
            num_steps=8000,
            log_period=200,  # steps per jitted chunk / log / checkpoint
            batch_size=64,
            learning_rate=1e-3,
            warmup_steps=200,
            weight_decay=0.0,
            grad_clip=1.0,
            # Holds the latents near unit scale, so the decoder is smooth where
            # samples land between elites (walker2d: 3.5% of generated policies
            # fell at 1e-6, 1.7% at 3e-3).
            kl_weight=3e-3,
            input_noise=0.01,  # on standardised weights
            latent_noise=0.01,
            # Action matching on the elites' own states (and the visited ones,
            # below); 300 over 100 with visits every 1,000 steps: walker2d codec
            # reward 0.968 -> 0.988 on one archive.
            functional_weight=300.0,
            obs_per_policy=64,  # observations per elite for that term
            # Random-reset episodes per elite those observations come from
            # (0: the one episode from the archive's fixed start state).
            obs_episodes=0,
            # Every this many steps, add the states the decoded policies visit
            # (labelled with the elites' actions) to that term (0: never):
            # DAgger's data, the largest single gain in the codec's reward.
            visit_period=1000,
            eval_episodes=8,  # episodes per policy in the reconstruction report
            eval_batch_size=256,  # policies per evaluation call
        )
    )


def get_diffusion_config() -> ml_collections.ConfigDict:
    """Latent-diffusion settings shared by every experiment config."""
    return ml_collections.ConfigDict(
        dict(
            num_timesteps=600,
            prediction="v",  # v or epsilon
            cond_dropout=0.1,  # trains the null condition used by guidance
            # The return rank's own drop rate (None: cond_dropout); the
            # dropped branch is what plain asks, which leave the return out,
            # use. 0.3 against 0.1, mean of five denoiser draws: walker2d plain
            # reward 0.980 -> 0.990, coverage 0.958 -> 0.969, uniform asks' QD
            # score 0.917 -> 0.888; hopper 0.984 -> 0.998, 0.948 -> 0.961.
            return_dropout=0.3,
            # Also condition on each elite's return rank among this many
            # elites nearest in descriptor space (0: descriptor only).
            return_neighbours=16,
            # Which returns it ranks: "stored" (the archive's, which QDax
            # scores from one fixed start) or "reevaluated" (each elite's mean
            # over the codec check's random-start episodes).
            return_source="stored",
            # Fourier octaves of the descriptor (and return) condition; 0: raw.
            cond_frequencies=6,
            architecture="transformer",  # transformer or unet
            num_tokens=8,  # transformer: the latent is cut into this many tokens
            width=64,
            depth=3,
            num_heads=4,
            unet_channels=(40, 80),  # unet: channels per resolution
            num_steps=10_000,
            log_period=500,
            batch_size=128,
            # 3e-3 fits walker2d's latents better in these steps (coverage
            # 0.931 -> 0.950 over three sample seeds) but costs hopper reward
            # (0.994 -> 0.984 at guidance 1, 0.971 at its sweep's pick).
            learning_rate=1e-3,
            warmup_steps=500,
            weight_decay=1e-4,
            grad_clip=1.0,
            ema_decay=0.999,
            sample_steps=100,  # DDIM steps
            eta=1.0,  # DDIM noise: 1 is stochastic (DDPM-like), 0 deterministic
            sweep_guidance=(0.0, 1.0, 2.0, 4.0),
            sweep_conditions=256,  # archive descriptors used by the sweep
            sweep_episodes=4,
            sweep_batch_size=256,
        )
    )


def get_text_config() -> ml_collections.ConfigDict:
    """Labels and the text-conditioned denoiser (its architecture, batch and
    optimiser are config.diffusion's)."""
    return ml_collections.ConfigDict(
        dict(
            # Your own labels (format in the README); unset: automatic labels.
            labels_file=ml_collections.config_dict.placeholder(str),
            label_episodes=4,  # random-reset episodes per elite for its label
            label_batch_size=256,  # policies per labelling call
            num_steps=10_000,
            log_period=500,
        )
    )


def get_evaluate_config() -> ml_collections.ConfigDict:
    """Evaluation settings (the protocol: README, "The evaluation stage")."""
    return ml_collections.ConfigDict(
        dict(
            episodes=8,  # random-reset episodes per policy (the paper: 50)
            batch_size=0,  # policies per jitted call; 0: as many as fit in memory
            memory_fraction=0.25,  # of device memory (CPU: RAM) rollouts may take
            uniform_conditions=0,  # descriptors of the uniform sweep; 0: one per elite
            text_samples=64,  # generated policies per prompt of the text metric
            # Score the copy-and-perturb baselines (6 of the 11 policy sets).
            baselines=True,
            # Guidance scale; unset: the diffusion stage's sweep pick.
            guidance=ml_collections.config_dict.placeholder(float),
        )
    )


# Grids of about a thousand cells for the other descriptor sizes.
GRIDS = {"hopper_uni": (1024,), "ant_uni": (6, 6, 6, 6)}


def get_config(env: str = "walker2d_uni") -> ml_collections.ConfigDict:
    """``default.py`` or ``default.py:<env>``: the same run on another env,
    with a grid sized for its descriptor (hopper 1-D: 1024 cells; ant 4-D:
    6^4)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.archive = get_archive_config()
    config.archive.update(env=env, grid_shape=GRIDS.get(env, (32, 32)))
    config.codec = get_codec_config()
    config.diffusion = get_diffusion_config()
    config.text = get_text_config()
    config.evaluate = get_evaluate_config()
    return config
