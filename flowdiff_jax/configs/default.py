"""Default configuration: every field, with what it means.

Experiment configs import this file and override what they change. Any field
can be overridden on the command line, e.g. `--config.training.batch_size=64`.
Images live in [-1, 1]; `operator.sigma_y` is stated on that scale (docs/design.md §2).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Which objective trains the diffusion prior (docs/design.md §2.6):
  #   "clean": DSM on clean images (oracle upper bound);
  #   "naive": DSM on A⁺y, the corrupted images (lower bound);
  #   "amortized": the conditional flow q(x | y) alone, against a fixed prior
  #     (see `amortized` below);
  #   "flowdiff": the flow and the diffusion prior trained jointly from corrupted
  #     data only (docs/design.md §2.4; `amortized` and `flowdiff` below).
  config.method = "flowdiff"
  # Root seed: model init and every training draw (t, ε, dropout) derive from it.
  config.seed = 0

  # --- Data -------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  # tfds name: "fashion_mnist", "mnist", "cifar10" or "celeb_a"; or measurements
  # in files (no clean images): "npz" or "folder" (see data.path below and
  # flowdiff_jax/measurements.py).
  data.dataset = "cifar10"
  # tfds data directory; None means tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  data.data_dir = ml_collections.config_dict.placeholder(str)
  # Directory of the Fashion-MNIST idx files (Debian package dataset-fashion-mnist).
  # Used before any download is attempted; set to "" to skip.
  data.fmnist_idx_dir = "/usr/share/datasets/fashion-mnist"
  # Side of the square images fed to the models (celeb_a: centre crop, then resize).
  # 0 means the dataset's native size (28 for (fashion_)mnist, 32 for cifar10, 64 for celeb_a;
  # for "npz"/"folder" the files' size, which a non-zero value must match).
  data.image_size = 0
  # Use only the first N training examples (0: all). The corruptions stay those of
  # the full set: they depend on an example's index, not on N.
  data.max_train_examples = 0
  # Number of held-out test images used by periodic evaluation.
  data.num_eval_examples = 256
  # Seed of the fixed per-example corruption (noise draw, mask): docs/design.md §2.5.
  data.corruption_seed = 0
  # Seed of the shuffling order of the training set.
  data.shuffle_seed = 0
  # grain read threads: records are read, decoded and resized in these, ahead of the step.
  data.read_threads = 4
  # Measurements in files (data.dataset "npz" or "folder"): the .npz file (array
  # "y" [N, H, W(, C)], plus "mask" [N, H, W(, 1)] for the inpainting operators)
  # or the folder of PNG/JPEG/TIFF images (sorted by file name).
  data.path = ml_collections.config_dict.placeholder(str)
  # "folder" with an inpainting operator: folder of binary masks (0 = missing,
  # 1 or 255 = observed) named like the images.
  data.mask_dir = ml_collections.config_dict.placeholder(str)
  # (lo, hi): the clean signal's range in the files' units, mapped linearly to
  # [-1, 1]; None: by dtype (uint8 0..255, uint16 0..65535, floats 0..1).
  data.value_range = ml_collections.config_dict.placeholder(tuple)
  # Noisy measurements may leave (lo, hi): observed values may reach this
  # fraction of its half-width beyond it ([-1 - m, 1 + m] after mapping); more is an error.
  data.value_margin = 1.0
  # Channels of the measurements; 0: from the files (the training program fills
  # it and data.image_size in, and checks non-zero values against the files).
  data.channels = 0
  # Estimate σ_y from the measurements (Haar-wavelet MAD over fully observed
  # 2x2 blocks) and use it instead of operator.sigma_y; the estimate is logged
  # and written to <workdir>/sigma_y_estimate.json either way.
  data.estimate_sigma_y = False
  # Optional clean reference, for evaluation only (PSNR etc.): an .npz with "x"
  # in the order of "y", or a folder with an image per measurement under its file name.
  data.reference_path = ml_collections.config_dict.placeholder(str)

  # --- Forward operator A_ω and measurement noise ---------------------------
  config.operator = op = ml_collections.ConfigDict()
  # "denoise" (A = I), "blur" (Gaussian, circular boundary),
  # "inpaint_random" (each pixel dropped w.p. drop_prob), "inpaint_box" (one square missing).
  op.name = "denoise"
  # Measurement-noise std on the [-1, 1] image scale (0.2 here is 0.1 on [0, 1]).
  op.sigma_y = 0.2
  # Gaussian blur: odd kernel side in pixels and kernel std in pixels.
  op.kernel_size = 9
  op.kernel_std = 2.0  # pixels
  # Tikhonov weight of the blur pseudo-inverse A⁺ = (AᵀA + reg I)⁻¹Aᵀ.
  op.pinv_reg = 1e-3
  # Random inpainting: probability that a pixel is dropped.
  op.drop_prob = 0.6
  # Box inpainting: side of the missing square in pixels.
  op.box_size = 8

  # --- Diffusion process (docs/design.md §2.2) --------------------------------
  config.diffusion = diff = ml_collections.ConfigDict()
  # VP schedule in log-SNR form: "linear" (DDPM betas) or "cosine".
  diff.kind = "linear"
  # Linear schedule: the discrete DDPM betas beta_min…beta_max over num_timesteps.
  diff.beta_min = 1e-4
  diff.beta_max = 0.02  # the last step's beta
  # T of the matching discrete DDPM; also scales the U-Net's time embedding.
  diff.num_timesteps = 1000
  # Cosine schedule offset s (Nichol & Dhariwal).
  diff.cosine_s = 0.008
  # Smallest diffusion time used in training and sampling (keeps log-SNR finite).
  diff.t_min = 1e-3

  # --- Score network: DDPM U-Net (ε-prediction) -------------------------------
  config.model = model = ml_collections.ConfigDict()
  # "unet": the DDPM U-Net below. "gaussian": the exact ε-network of a Gaussian
  # N(μ, Σ) with learnable μ, Σ (a D×D Cholesky per example, D = H·W·C: only for
  # small images, e.g. the Gaussian oracle); the fields below are then unused.
  model.name = "unet"
  # Channels at the first level; level i has base_channels * channel_mult[i].
  model.base_channels = 128
  # One entry per resolution; len - 1 downsamplings, so image_size must divide by 2**(len-1).
  model.channel_mult = (1, 2, 2, 2)
  # Residual blocks per resolution level.
  model.num_res_blocks = 2
  # Spatial sizes (in pixels) at which self-attention is used.
  model.attn_resolutions = (16,)
  # Dropout rate inside residual blocks.
  model.dropout = 0.1
  # GroupNorm groups (must divide every level's channel count).
  model.num_groups = 32
  # Dtype the networks compute in: "float32" or "bfloat16". With "bfloat16" the
  # U-Net's and the flow's coupling/conditioning convolutions and dense layers
  # (and the activations between them) are bfloat16, with float32 parameters,
  # optimiser and EMA; GroupNorm statistics, attention softmax, the flow's
  # ActNorm, 1x1 convolutions, coupling scale/shift application and
  # log-determinants, the noise schedule and every loss term stay float32 (the
  # flow stays exactly invertible). Faster where bf16 matmuls are (GPU/TPU; on
  # most CPUs it is slower). It changes results: losses move by ~1e-3 relative,
  # so runs are not bit-comparable with float32 ones and a checkpoint resumes
  # only with the same value. Evaluation and sampling of the run use it too.
  model.compute_dtype = "float32"

  # --- Optimiser of the score network -----------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  # Peak learning rate (AdamW), reached after warmup_steps of linear warm-up.
  optim.learning_rate = 2e-4
  optim.warmup_steps = 1000  # linear warm-up from 0
  # > 0: then a cosine decay to 0 at this update (warm-up included; e.g.
  # training.num_train_steps); 0: constant. The jointly trained score network
  # fits samples that change every step, and a constant rate leaves its fit
  # noisy (experiments/gaussian, "What limits flowdiff here").
  optim.decay_steps = 0
  # Adam moments and epsilon.
  optim.b1 = 0.9
  optim.b2 = 0.999  # second-moment decay
  optim.eps = 1e-8  # added to the root of the second moment
  # Decoupled weight decay (AdamW); 0 disables it.
  optim.weight_decay = 0.0
  # Clip gradients to this global norm; 0 disables clipping.
  optim.grad_clip_norm = 1.0
  # Decay of the exponential moving average of the score params used for sampling.
  optim.ema_decay = 0.999

  # --- Conditional flow q_φ(x | y, ω): multi-scale conditional Glow ------------
  config.flow = flow = ml_collections.ConfigDict()
  # Levels (squeeze, steps, split); image_size must divide by 2**num_levels.
  flow.num_levels = 2
  # Flow steps (ActNorm, 1x1 conv, coupling) per level.
  flow.num_steps = 8
  # Width of the coupling networks.
  flow.hidden_channels = 64
  # Conditioning features per level, computed from [A⁺y, mask].
  flow.cond_channels = 32
  # "affine" or "additive" coupling.
  flow.coupling = "affine"
  # Model x − A⁺y instead of x (the flow then starts near the pseudo-inverse).
  flow.residual = True
  # The flow's restoration x̂₀(y): its conditioning image and, with `residual`,
  # its base. "pinv": A⁺y. "gaussian_em": the posterior mean of a Gaussian
  # N(μ, Σ) fitted by EM to the training observations at the start (section
  # `gaussian_em`), so a fresh flow is already a Wiener-type restorer. The
  # Fashion-MNIST configs use "gaussian_em" (it wins there on every number);
  # the default stays "pinv" until the fit has been tuned and measured at
  # CIFAR/CelebA sizes (a dense Σ is D×D: 600 MB at 64×64×3).
  flow.base = "pinv"

  # --- Gaussian EM fit of the observations (flow.base = "gaussian_em") ---------
  config.gaussian_em = gem = ml_collections.ConfigDict()
  # Rank r of Σ = U Uᵀ + diag(d); 0: a dense Σ (denoise and blur only).
  gem.rank = 64
  # EM iterations.
  gem.num_iters = 16
  # Σ₀ = init_var · I: what the directions the data do not see keep (docs/design.md §2.9).
  gem.init_var = 0.1
  # Training observations fitted (0: all of them).
  gem.max_examples = 0
  # Examples per vmapped E-step chunk (per-example operators).
  gem.batch_size = 256

  # --- EM with a posterior-sampling E-step (method "em", the peers) -----------
  config.em = em = ml_collections.ConfigDict()
  # The E-step's posterior sampler: "mmps" (Rozet et al. 2024: the Tweedie
  # covariance by vector-Jacobian products and conjugate gradients) or "dps"
  # (the E-step of EMDiffusion, Bai et al. 2024).
  em.e_step = "mmps"
  # M-step: score-network updates (DSM on the lap's samples) per lap.
  em.steps_per_lap = 1000
  # Training observations sampled in each E-step: the first N (0: all of them).
  em.num_observations = 0
  # Observations solved together in one sharded E-step chunk (a multiple of the device count).
  em.batch_size = 64
  # Lap 0's samples: "gaussian_em" (exact posterior samples of N(μ, Σ) fitted
  # by EM to the observations, section `gaussian_em`), "pinv" (A⁺y), or
  # "prior" (the sampler under the freshly initialised network).
  em.warm_start = "gaussian_em"
  # The prior of the E-step: "ema" (the EMA score params) or "params" (the current ones).
  em.sample_with = "ema"
  # Sampler steps (+1 final step) per posterior sample.
  em.num_steps = 64
  # DDIM η of the sampler: 1 ancestral (DDPM), 0 deterministic.
  em.eta = 1.0
  # MMPS: conjugate-gradient iterations per step (each a VJP of the network).
  em.cg_iters = 1
  # DPS: the step size ζ of x_s = x'_s − ζ ∇‖y − A x̂₀‖ (inverse.TASKS has tuned values).
  em.dps_zeta = 1.0
  # Clip x̂₀ and the samples to [-1, 1].
  em.clip = True

  # --- Optimiser of the flow (same fields as `optim`) ---------------------------
  config.flow_optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4,  # peak, after the warm-up
      warmup_steps=500,  # linear warm-up from 0
      decay_steps=0,  # > 0: then a cosine decay to 0 at this update; 0: constant
      b1=0.9,  # first-moment decay
      b2=0.999,  # second-moment decay
      eps=1e-8,  # added to the root of the second moment
      weight_decay=0.0,  # decoupled (AdamW)
      grad_clip_norm=1.0,  # global-norm clipping of the flow's gradient; 0 disables
  ))

  # --- The flow's amortized inference loss (methods "amortized" and "flowdiff") ---
  config.amortized = am = ml_collections.ConfigDict()
  # "amortized" only: the fixed prior. "diffusion": the EMA score network of a
  # finished clean/naive run (its NLL bound is −log p); "gaussian": N(mean, cov)
  # fitted to clean training images, an oracle prior for checking the flow, not a
  # method. ("flowdiff" always uses its own, jointly trained score network.)
  am.prior = "diffusion"
  # "amortized" only: workdir of the clean/naive run whose newest checkpoint is the prior.
  am.prior_workdir = ml_collections.config_dict.placeholder(str)
  # Weights of the loss terms: data fidelity, prior NLL, log q (entropy).
  am.beta_data = 1.0
  am.beta_prior = 1.0  # prior NLL (the final value when warmed up)
  am.beta_ent = 1.0  # log q (the final value when annealed)
  # β_prior rises linearly from 0 to beta_prior over this many steps (0: constant).
  # Early in "flowdiff" the prior is untrained; the flow then starts as a
  # likelihood + entropy posterior.
  am.beta_prior_warmup_steps = 5000
  # β_ent moves linearly from beta_ent_init to beta_ent over this many steps
  # (0: constant beta_ent), e.g. entropy annealing from a wider posterior.
  am.beta_ent_init = 1.0
  am.beta_ent_anneal_steps = 0  # 0: constant beta_ent
  # Flow samples per observation in the loss.
  am.num_flow_samples = 1
  # (t, ε) draws per flow sample in the diffusion NLL bound.
  am.num_time_samples = 1
  # How the bound draws t: "log_snr" (importance sampling, λ uniform: lower
  # variance) or "uniform" (t uniform, weighted by −λ'(t)).
  am.time_sampling = "log_snr"
  # Gradient of the prior term through x: "exact" (through the U-Net) or "sds"
  # (cheaper, biased: the U-Net Jacobian replaced by σ_t I; see diffusion.nll_bound).
  am.prior_gradient = "exact"
  # Clean training images used to fit the "gaussian" prior.
  am.gaussian_fit_examples = 10_000
  # Posterior samples per held-out observation for the posterior mean/std.
  am.eval_num_samples = 16
  # The flow params that draw posterior samples outside training (evaluation,
  # export, grids): "params" (the current ones) or "ema" (their EMA, decay
  # optim.ema_decay; it averages out the step-to-step noise of the flow's
  # updates, but lags a flow that is still improving).
  am.posterior_params = "params"

  # --- Joint training (method "flowdiff") ---------------------------------------
  config.flowdiff = fd = ml_collections.ConfigDict()
  # k flow updates per score-network update: the score network's gradients of k
  # consecutive steps are averaged into one update (optax.MultiSteps); its
  # optimiser settings are `optim`, the flow's `flow_optim`.
  fd.flow_updates_per_score_update = 1
  # The prior hand-over (needs flow.base="gaussian_em"): for the first
  # gaussian_prior_steps steps the flow's prior term is the log-density of the
  # Gaussian fitted by EM to the observations, not the (still untrained)
  # diffusion prior, so the flow's samples, on which the score network trains,
  # are never drawn against a wide prior; then it moves linearly to the
  # diffusion prior over handover_steps. Both 0: the diffusion prior throughout.
  fd.gaussian_prior_steps = 0  # steps with the fitted Gaussian as the whole prior term
  fd.handover_steps = 0  # then the linear move to the diffusion prior
  # One score-network pass per step instead of two: the flow's prior bound and
  # the score network's DSM loss on the flow's samples share their (t, ε) draws
  # and one forward and backward pass of the U-Net, whose gradient is split
  # between the two (diffusion.nll_bound_and_dsm). Each term keeps its
  # expectation, but the draws are shared, dropout is on in the bound too and
  # the DSM is importance-weighted from the bound's time proposal, so a run
  # differs from the two-pass one; about 1.3-1.5x faster steps
  # (experiments/bench). Needs amortized.prior_gradient="exact".
  fd.shared_score_pass = False

  # --- Training loop --------------------------------------------------------
  config.training = training = ml_collections.ConfigDict()
  # Global batch size over all devices and hosts (must divide by the device count).
  training.batch_size = 128
  # Total number of optimisation steps.
  training.num_train_steps = 800_000
  # Rematerialisation: the U-Net's residual/attention blocks and the flow's
  # coupling networks recompute their activations in the backward pass instead
  # of keeping them (jax.checkpoint): less device memory, about one extra
  # forward pass of compute. Same parameters and, up to float rounding
  # (~1e-6 relative), the same results; for batches that do not fit otherwise.
  training.remat = False
  # K training steps per dispatch: one jitted call runs K steps (lax.scan over K
  # batches stacked on a leading axis), saving K-1 host round trips of Python
  # and dispatch overhead; worth it when a step takes a few milliseconds
  # (small models, fast accelerators). The same draws and updates as K=1 up to
  # float rounding (~1e-7 relative: XLA fuses the scanned step differently), so
  # runs with different K are not bit-identical, and resuming under another K
  # needs --allow_config_change. num_train_steps and the log/eval/sample/
  # checkpoint intervals must be multiples of K; a SIGTERM stops at the next
  # dispatch boundary (after up to K more steps). The K steps are unrolled into
  # one program (XLA:CPU runs rolled loops' bodies several times slower), so
  # compilation takes about K times as long: keep K small (2-8).
  training.steps_per_dispatch = 1
  # Trace N training steps with jax.profiler (clu's Profile action) into
  # WORKDIR/plugins/profile/ (TensorBoard's profile tab, or xprof) on process 0,
  # from the third dispatch of the run on, past the first step's compilation; 0:
  # no trace. The traced steps wait for the device at each step, so the trace
  # shows device time per step; everything else is unchanged.
  training.profile_steps = 0
  # Write training metrics every N steps.
  training.log_every_steps = 100
  # Scalars and image grids also to TensorBoard event files in the workdir
  # (clu's writer, through TensorFlow's filesystems: local, gs://). False: to
  # the log only, e.g. where TensorFlow cannot reach the workdir's filesystem.
  training.tensorboard = True
  # Evaluate (held-out DSM loss) every N steps; 0 disables.
  training.eval_every_steps = 5_000
  # Write a PNG grid of prior samples every N steps (and at the end); 0 disables.
  training.sample_every_steps = 10_000
  # Save a checkpoint every N steps (and at the end).
  training.checkpoint_every_steps = 5_000
  # Number of checkpoints kept in the workdir.
  training.keep_checkpoints = 3
  # A step whose loss terms, gradients or update are not finite (NaN/inf) is
  # skipped: params, optimiser state and EMA stay as they were. After this many
  # skipped steps in a row the run stops (checked when metrics are logged or a
  # checkpoint is due, never with a host sync per step), naming the loss terms
  # that went non-finite; no checkpoint is written after the divergence.
  training.max_consecutive_nonfinite_steps = 10

  # --- Sampling and evaluation ---------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  # Sampler of the diffusion prior: "ancestral", "ddim" or "heun".
  ev.sampler = "ddim"
  # Number of sampler steps.
  ev.sample_steps = 100
  # Number of samples in the periodic PNG grid (a square number reads best).
  ev.num_samples = 64
  # Batch size of the held-out evaluation.
  ev.batch_size = 256
  # (t, ε) draws per held-out image in the NLL bound (eval/nll_bpd_clean).
  ev.nll_time_samples = 4

  return config
