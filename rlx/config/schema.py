"""Typed run configuration.

A run is described by one `RunConfig`. Recipes (YAML in `recipes/`) set only what differs from these
defaults; `key.sub=value` command-line overrides go on top; the resolved config is written to
`<output_dir>/config.yaml`. Every field carries a docstring: that is the documentation of the option.

`trainer` is the one free-form section: it holds TRL training arguments (`GRPOConfig`, `DPOConfig`,
`SFTConfig`, or rlx's `PPOConfig`: the registered trainer's config class, chosen by `algo`) and is validated
against that class's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EmbeddedModelConfig:
    """Shape of the embedded tiny Qwen2-family model (built locally; used when model.name_or_path=embedded)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of decoder blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 512
    """Width of the MLP."""
    max_position_embeddings: int = 128
    """Longest sequence (prompt + completion) the model supports."""


@dataclass
class LoraConfig:
    """PEFT LoRA adapters; when enabled only the adapters train and the reference is the adapter-disabled model."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get adapters."""


@dataclass
class ModelConfig:
    """Which policy to train."""

    name_or_path: str = "embedded"
    """`embedded` (the built-in tiny model, warm-started on the task), a local HF-format directory, or a hub id."""
    embedded: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig)
    """Shape of the embedded model."""
    dtype: str = "float32"
    """Weights dtype when loading: float32, bfloat16, float16 or auto."""
    attn_implementation: str | None = None
    """Attention kernel passed to from_pretrained (eager, sdpa, flash_attention_2); None lets transformers choose."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model directory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters."""


@dataclass
class TaskConfig:
    """The verifiable task: prompts, references, reward, splits."""

    name: str = "arithmetic"
    """arithmetic | countdown (embedded, generated) | gsm8k (real data) | ultrafeedback (real preference data) |
    jsonl (your own prompts file, with `task.reward` plug-ins; docs/custom_tasks.md)."""
    num_train: int = 8000
    """Generated tasks: number of training problems."""
    num_eval: int = 200
    """Generated tasks: number of held-out problems (disjoint from train)."""
    data_seed: int = 1234
    """Seed of the problem generator; fixed apart from `seed` so the held-out set never moves."""
    min_digits: int = 1
    """arithmetic: fewest digits per operand."""
    max_digits: int = 2
    """arithmetic: most digits per operand."""
    operations: list[str] = field(default_factory=lambda: ["+", "-"])
    """arithmetic: operators to draw from."""
    countdown_sizes: list[int] = field(default_factory=lambda: [3])
    """countdown: how many numbers a puzzle has (drawn uniformly from this list)."""
    countdown_max_number: int = 20
    """countdown: numbers are drawn from [1, countdown_max_number]."""
    dataset: str | None = None
    """Real-data tasks: a hub dataset id, a local dataset directory, or a local .json/.jsonl/.parquet file."""
    dataset_config: str | None = None
    """Hub dataset configuration name (e.g. `main` for gsm8k)."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str = "test"
    """Split used for held-out evaluation."""
    eval_dataset: str | None = None
    """Optional separate file or id for the held-out split (default: `dataset` with `eval_split`)."""
    max_train_samples: int | None = None
    """Truncate the training split (real data)."""
    max_eval_samples: int | None = 200
    """Truncate the held-out split (real data)."""
    system_prompt: str | None = None
    """Real-data tasks: system message prepended to each conversational prompt."""
    reward: list[str] = field(default_factory=list)
    """Plug-in reward functions replacing the task's own for training: `module:function` (importable, the
    working directory included) or `path/to/file.py:function`, in TRL's reward-function convention; several
    are summed with `trainer.reward_weights`. Held-out accuracy still uses the task's verifier (for
    task=jsonl: the first plug-in). See docs/custom_tasks.md."""
    answer_column: str = "answer"
    """task=jsonl: the column holding the reference answer."""
    overlong_prompts: str = "error"
    """GRPO/PPO training prompts longer than the model's context minus trainer.max_completion_length:
    `error` (default) refuses the run and names the longest row; `drop` removes them and prints how many.
    Prompts are never truncated."""


@dataclass
class WarmStartConfig:
    """Supervised warm start of the embedded model, cached on disk keyed by its config and seed."""

    enabled: bool = True
    """Warm-start the embedded model before RL (ignored for real models)."""
    steps: int = 2000
    """Optimizer steps of next-token training on the teacher's solutions."""
    batch_size: int = 64
    """Sequences per step."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    min_lr_ratio: float = 0.05
    """The cosine decay ends at this fraction of the peak, not at 0. A model annealed to lr 0 sits in a narrow
    basin that any later optimizer restart (RL or more SFT at a small lr) knocks it out of; ending at the
    RL learning-rate scale makes the warm start a point training can continue from."""
    teacher_bug_rate: float = 0.6
    """Fraction of training problems whose warm-start target is a systematically buggy solver's answer instead of
    the correct one (arithmetic: addition that forgets the carry, subtraction that takes the smaller digit from the
    larger; `rlx.tasks.arithmetic.buggy_op`). The base policy then has a structural flaw, a habit shared across
    prompts, which is what RL with a verifiable reward can find and fix at this scale; with 0 the clean tiny
    model's errors are per-problem and GRPO barely moves its greedy accuracy (docs/tiny_rl.md). Drawn once per
    problem with `seed`. Tasks that define no bug (countdown) train on correct solutions whatever this says."""
    cache_dir: str | None = None
    """Where warm-started models are cached (default: $RLX_CACHE or ~/.cache/rlx)."""


@dataclass
class PreferenceConfig:
    """How DPO preference pairs are built from a verifiable task."""

    num_pairs: int = 1024
    """Pairs to build from training prompts."""
    source: str = "policy"
    """policy: sample from the warm-started policy, chosen = a verified correct sample, rejected = a verified
    wrong one (prompts lacking either fall back to `synthetic`); synthetic: chosen = the reference solution,
    rejected = a verified-wrong corruption of it."""
    samples_per_prompt: int = 8
    """policy source: samples drawn per prompt to find one correct and one wrong completion."""
    temperature: float = 1.0
    """policy source: sampling temperature."""


@dataclass
class EvalConfig:
    """Held-out evaluation (rlx/evaluate.py, and before/after accuracy of a training run)."""

    num_prompts: int | None = None
    """Held-out prompts to evaluate (default: the whole held-out split)."""
    num_samples: int = 16
    """Sampled completions per prompt for pass@k (must be >= max(ks))."""
    ks: list[int] = field(default_factory=lambda: [1, 4, 16])
    """k values for unbiased pass@k."""
    temperature: float = 1.0
    """Sampling temperature for pass@k samples."""
    top_p: float = 1.0
    """Nucleus sampling for pass@k samples."""
    max_new_tokens: int | None = None
    """Completion budget (default: trainer.max_completion_length or the task's own)."""
    batch_size: int = 64
    """Prompts per generate call."""
    before_after: bool = True
    """train.py: evaluate greedy accuracy before and after training and write it to eval_before_after.json."""
    every: int = 0
    """train.py: evaluate during training every N optimizer steps, at step 0 and at the end (0 = off): greedy
    accuracy and pass@k with the settings above, on all ranks, logged as eval/* and saved per step to
    diagnostics/eval/ (rlx/eval_loop.py). `python -m analysis passk RUN` plots the pass@k curves. Each
    evaluation also logs its cost, eval/seconds (wall) and eval/cpu_seconds (process CPU); run_info.json's
    eval_cost holds the totals and their fraction of the training loop."""
    replay: str = "off"
    """train.py, with eval.every: off | learnable | direct. Each in-training evaluation also evaluates the
    current policy with Activation Replay in this mode (the same prompts, seeds and decoding), logged as
    eval_replay/* with eval_replay/gain_* = replay minus plain, its rows in the same parquet (column `replay`).
    The base model is replay.base_model when set, else the model the run started from (the step-0 policy),
    loaded once per rank and kept frozen; every other setting is replay.* (ReplayConfig; its `mode` is for
    rlx/evaluate.py and is not used here). Not under FSDP. docs/activation_replay.md."""


@dataclass
class GradAlignmentExactConfig:
    """What the exact two-pass form of the paper's D' needs (docs/gradient_alignment.md, "The exact two-pass form").

    Pass 1 is this run: at every `save_every`-th logged step the instrument saves, under
    <output_dir>/grad_alignment_exact/step_NNNNNN/, the policy's trainable parameters as they were before that
    step's update (the whole model without PEFT, the LoRA adapters with it) and the exact micro-batches it measured
    (the loss forwards' inputs, the per-token weights w_t = dL/dl_t, the trainer's batch: token ids and masks, and
    for GRPO/PPO the rollouts' advantages and old/reference log-probs). Pass 2, after training,
    `python -m analysis alignment-exact RUN_DIR` generates D' from this run's final model and recomputes every row
    of the instrument at each saved step against it (label `final_exact`). Single process, parameter variant only.
    """

    enabled: bool = False
    """Save the weights and batches of the logged steps for `python -m analysis alignment-exact`."""
    save_every: int = 1
    """Save every K-th logged step (logged steps are counted from 0, so the first logged step is always saved).
    Disk per saved step: the trainable parameters once (twice with `save_update`) plus the batch (small)."""
    save_update: bool = True
    """Also save the trainable parameters after the step's update, so the offline pass recomputes the `update`
    row (realised alignment) and delta_R too; false halves the bytes and drops that row."""


@dataclass
class GradAlignmentConfig:
    """Gradient-alignment diagnostics (arXiv 2512.00778); see rlx/alignment."""

    enabled: bool = False
    """Log alignment of each update with a target gradient."""
    every: int = 10
    """Log every N optimizer steps."""
    target: str = "auto"
    """The target set D': auto | heldout_chosen | final:<run_dir> | responses:<path> | probe_rollouts.
    auto = heldout_chosen for every algorithm: held-out prompts with their verified reference solution (the
    chosen answer for preference data). final:<run_dir> = the paper's D' in pilot form, the greedy responses of
    that finished run's final model to the held-out prompts, written by `python -m rlx.alignment.final_responses
    RUN_DIR` (labelled final_pilot; same task and base model required, same seed expected). responses:<path> =
    any .jsonl of responses. probe_rollouts = the run's own first rollouts, frozen: an option, not the paper's
    D' (it overlaps the batch being trained and its g_T is mostly sampling noise)."""
    target_size: int = 256
    """Sequences in the target set D' (capped by the held-out split, the responses file, or the first rollout
    micro-batch for probe_rollouts). Short answers need many sequences: with 32 arithmetic answers (~100
    tokens) g_T is dominated by sampling noise and even SFT looks RL-like."""
    layer_groups: int = 2
    """Number of groups the decoder blocks are split into (plus embeddings and head)."""
    sketch_dim: int = 16384
    """Dimension of the saved gradient sketches (0 disables them)."""
    drift_lag: int = 1
    """K in drift cos(grad L(t), grad L(t-K)), in logged steps."""
    save_token_weights: bool = False
    """Also save per-token w_t and d_t shards (safetensors)."""
    variant: str = "auto"
    """auto | param | activation. auto = param except under DeepSpeed ZeRO-2/3 (activation)."""
    exact: GradAlignmentExactConfig = field(default_factory=GradAlignmentExactConfig)
    """Save what the paper's D' in exact two-pass form needs (`python -m analysis alignment-exact RUN_DIR`)."""


@dataclass
class ActivationsConfig:
    """Pooled per-layer hidden states of a fixed probe prompt set, saved at chosen steps."""

    enabled: bool = False
    """Save activations."""
    every: int = 50
    """Save every N optimizer steps (and at the first and last step)."""
    num_prompts: int = 64
    """Probe prompts (fixed, from the held-out split)."""
    samples_per_prompt: int = 4
    """Completions sampled per probe prompt (the correctness direction needs correct and wrong ones)."""


@dataclass
class RolloutsConfig:
    """GRPO/PPO rollout dumps: prompt, completion, rewards per function, advantage, log-prob summaries and a
    sample id that ReLaX's per-trajectory rows carry too (rlx/instruments/rollouts.py)."""

    enabled: bool = True
    """Write diagnostics/rollouts/round_NNNNNN.rank{r}.parquet."""
    fraction: float = 0.1
    """Share of each round's completions kept (a hash of the sample id picks them); 1 keeps all."""
    every: int = 1
    """Keep every N-th generation round."""


@dataclass
class CorrectnessProbeConfig:
    """`correctness_probe` monitor: a linear correctness direction fitted from mixed-reward rollout groups, tracked
    over training (rlx/instruments/correctness_probe.py, docs/probes.md)."""

    enabled: bool = False
    """Turn the monitor on."""
    every: int = 10
    """Measure at step 1 and every N optimizer steps (on-policy steps only when rollouts are reused)."""
    layers: list[int] | None = None
    """Residual-stream layers to read, in HF hidden_states order: 0 = token embeddings, l = output of block l
    (L = the last block, before the final norm); negative values count from the end (-1 = L, -2 = L-1). None: the
    middle block and the last, [max(1, L // 2), L]. The first entry is the primary layer (unprefixed metrics)."""
    direction: str = "diff_means"
    """How the direction is fitted on the fit half: `diff_means` (mean over mixed groups of mean correct state minus
    mean wrong state) or `logistic` (L2-regularised logistic regression on the group-centred states)."""
    l2: float = 0.01
    """`direction: logistic` only: L2 penalty on the weights (mean log-loss + l2/2 |w|^2, states scaled to unit
    per-coordinate RMS); > 0."""
    token_offset: int = 0
    """Which token's state is read: 0 = each rollout's last completion token (EOS when it stopped), k = the token k
    positions before it (rollouts with fewer than k + 1 tokens are left out)."""
    threshold: float = 1.0
    """A rollout is correct when its task reward is >= threshold (NaN rewards are left out)."""
    freeze: bool = False
    """Score every step with the first fitted direction (step 1's, the weights before any update) instead of the
    step's own fit; the step's own fit is still made, for the drift `cos_to_first`."""
    min_mixed_groups: int = 2
    """Fewest mixed groups (prompts with both a correct and a wrong rollout) in the fit half for a direction to be
    fitted; below it the step's direction metrics are NaN (not logged) and nothing fails."""
    update_alignment: bool = True
    """Measure cos(v, -dL/dh), the alignment of the loss gradient on the residual stream with the direction: one
    extra partial backward (from the loss down to the lowest chosen layer) per measured micro-batch."""
    save_scores: bool = True
    """Write each measured step's per-rollout scores (sample_id, group, reward, score per layer, mean log-prob)."""
    save_directions: bool = True
    """Write each measured step's directions (fitted, used) and loss gradients per layer as safetensors."""


@dataclass
class HNeuronsConfig:
    """`h_neurons` monitor: a sparse set of MLP neurons whose CETT predicts wrong answers, fitted on the base model and
    followed through training (rlx/instruments/h_neurons.py, docs/probes.md)."""

    enabled: bool = False
    """Turn the monitor on."""
    every: int = 10
    """Measure at step 1 and every N optimizer steps (on-policy steps only when rollouts are reused); 0 = step 1
    (and the refit steps) only."""
    threshold: float = 1.0
    """A rollout is right when its task reward is >= threshold, wrong below (NaN rewards are in neither class)."""
    C: float = 10.0
    """Inverse strength of the L1 penalty, scikit-learn's convention (the paper's code): the fit minimises
    ||theta||_1 + C * sum of the logistic losses, so a larger C keeps more neurons (and, the loss being a sum, more
    rollouts do too). The default keeps 0.7-1.4% of the embedded model's 2048 neurons on grpo_tiny's first batch
    (docs/probes.md); the paper grid-searches C on its own models and keeps under 0.1%."""
    consistent_only: bool = True
    """Fit only on groups (prompts) whose rollouts, two or more, are all right or all wrong: the paper's consistency
    filter (in GRPO these are the zero-advantage groups). When it leaves fewer than `min_per_class` wrong or right
    rollouts, the fit uses every scored rollout instead and says so (fits dump column `note`, a warning)."""
    min_per_class: int = 16
    """Fewest wrong and fewest right rollouts a fit needs (each half of the split-half fits needs half of it);
    with fewer even without the filter there is no fit: no H0 at step 1 (the set metrics stay NaN) or no refit."""
    refit_every: int = 50
    """Refit the set on the rollouts of every N-th step with the same C and compare it with H0 (Jaccard, overlap,
    against chance); 0 = never."""
    split_half: bool = True
    """At each fit also fit each of two disjoint halves of the groups: their Jaccard is the set's reproducibility on
    the same model, the yardstick for the Jaccard across time (fits dump: split_jaccard, cross_jaccard)."""
    answer_marker: str | None = None
    """Answer tokens are the completion's tokens minus a trailing EOS (the embedded arithmetic completion is the
    answer). With a marker (e.g. "####" for gsm8k, "<answer>"), only the tokens after its last occurrence in the
    completion are answer tokens; a completion without it has no answer and is left out. Other tokens: the real
    prompt tokens and the completion's non-answer tokens."""
    standardize: bool = False
    """Penalise each neuron by its CETT standard deviation (an L1 fit on standardised features) instead of in raw
    CETT units as the paper does; weights are reported in CETT units either way."""
    max_features: int = 0
    """Fit only on the N neurons whose CETT varies most over the fit's rows (the others keep weight 0); 0 = all L*m.
    Large models: 5000 brings the fit to seconds."""
    num_random: int = 8
    """Random control sets: each has as many neurons in each layer as H0, drawn among the other neurons of that
    layer (fixed per run); their mean CETT mass and gradient share are logged next to H0's."""
    tol: float = 1.0e-4
    """The fit stops when no optimality condition of the L1 problem is violated by more than tol * lambda."""
    max_iter: int = 20000
    """Most FISTA iterations per fit, over all its working sets (fits dump column `converged`: tol reached)."""


@dataclass
class HiddenRankConfig:
    """`hidden_rank` monitor: effective rank of each rollout's last hidden states and its differences over the
    response (rlx/instruments/hidden_rank.py, docs/probes.md)."""

    enabled: bool = False
    """Turn the monitor on."""
    every: int = 10
    """Measure at step 1 and every N optimizer steps (on-policy steps only when rollouts are reused)."""
    threshold: float = 1.0
    """A rollout is correct when its task reward is >= threshold (NaN rewards are in neither bucket)."""
    stride: int = 20
    """Prefix stride in tokens: the differences compare the effective rank of the first j*stride + 1 response tokens,
    j = 1, 2, ... (the hidden-state RLVR code's default, 20). A response needs 2*stride + 1 tokens for d1 and
    3*stride + 1 for d2: set 1 for short answers (the tiny arithmetic task)."""
    form: str = "exp"
    """exp: erank = exp(entropy of the normalised singular values) (the reference code's effective rank);
    entropy: the entropy itself (nats)."""
    diff: str = "running_mean"
    """How a prefix value is compared with the earlier ones: running_mean (the reference code: the value minus the
    mean of all earlier prefix values) or consecutive (minus the previous prefix value). d2 is the difference of
    successive d1 values either way."""
    center: bool = True
    """Subtract each trajectory's mean state before the singular values (the reference code does); false: the raw
    states."""
    max_tokens: int = 0
    """Cost cap: only each response's first N tokens enter the effective rank and its prefixes (0: the whole
    response, as the reference code). The cost grows with the cube of the window length (docs/probes.md)."""
    save_rows: bool = True
    """Write each measured step's per-rollout rows (sample_id, step, reward, length, erank, d1, d2, n_prefixes)."""


@dataclass
class ProbesConfig:
    """`probes` monitor: frozen linear probes loaded from safetensors files, scored on every rollout
    (rlx/instruments/probes.py, docs/probes.md)."""

    enabled: bool = False
    """Turn the monitor on."""
    every: int = 1
    """Score at step 1 and every N optimizer steps (on-policy steps only when rollouts are reused)."""
    paths: list[str] = field(default_factory=list)
    """Probe files (safetensors: tensor `direction` (d,), optional `bias`, metadata `layer` and `position`; write
    one with `rlx.instruments.probes.save_probe`). Each is checked against the model before the first step."""
    threshold: float = 1.0
    """A rollout is correct when its task reward is >= threshold (NaN rewards are in neither bucket)."""
    save_rows: bool = True
    """Write each scored step's rows (sample_id, step, probe, score, reward), one per rollout and probe."""


@dataclass
class DiagnosticsConfig:
    """Instruments that only measure (they never change the loss)."""

    grad_alignment: GradAlignmentConfig = field(default_factory=GradAlignmentConfig)
    """Gradient alignment."""
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    """Saved activations for offline probes."""
    rollouts: RolloutsConfig = field(default_factory=RolloutsConfig)
    """Rollout dumps (GRPO, PPO)."""
    correctness_probe: CorrectnessProbeConfig = field(default_factory=CorrectnessProbeConfig)
    """Correctness direction monitor (GRPO-family, PPO)."""
    h_neurons: HNeuronsConfig = field(default_factory=HNeuronsConfig)
    """H-Neurons monitor (GRPO-family, PPO)."""
    hidden_rank: HiddenRankConfig = field(default_factory=HiddenRankConfig)
    """Hidden-state effective-rank monitor (GRPO-family, PPO)."""
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    """Frozen linear probes scored on rollouts (GRPO-family, PPO)."""


@dataclass
class RelaxConfig:
    """ReLaX latent-exploration regularizer (arXiv 2512.07558); see rlx/regularizers/ and docs/relax.md."""

    alpha: float = 0.1
    """Weight of the advantage-shaped exploration loss L_xp (paper Table 3: 0.1)."""
    beta: float = 0.01
    """Weight of the adaptive KL on trajectories with A > 0 and DSD > xi; 0 switches the KL off. The
    reference log-probs come from the trainer when it computes them (trainer.beta > 0); with trainer.beta = 0
    (the recipes) the reference model is built on demand and scores only the KL-masked rows."""
    xi: float | None = None
    """DSD threshold; None calibrates it once on the first rollout batch as xi_scale * median DSD."""
    xi_scale: float = 25.0
    """When xi is None: xi = xi_scale * median DSD at step 0 (paper: DSD ~ 1 at step 0 and xi = 25)."""
    dict_size: int = 50
    """m, the number of dictionary features psi(h) = sigmoid(W h)."""
    ridge: float = 1e-3
    """lambda in the EDMD ridge solve K = (Px^T Px + lambda I)^-1 Px^T Py."""
    eps: float = 1e-3
    """eps in the smoothed modulus r_j = sqrt(s_j^2 + eps) (authors' code: 1e-3); spectrum=svd, or eig with
    eig_eps=true."""
    spectrum: str = "svd"
    """svd (singular values of K; authors' code, default) | eig (eigenvalue moduli; paper Eq. 6)."""
    eig_eps: bool = False
    """spectrum=eig only: smooth the moduli as sqrt(|lambda|^2 + eps). False (default) is Eq. 6 exactly,
    DSD = Var(|lambda|) with no eps."""
    group: str = "prompt"
    """Set of the log-mean-exp: prompt (the prompt group, paper) | batch (the micro-batch, authors' code)."""
    dict_lr: float = 1e-3
    """Dictionary learning: Adam learning rate (authors' code 1e-3; paper 1e-4)."""
    dict_batch_size: int = 64
    """Dictionary learning: trajectories per Adam step."""
    dict_steps: int = 128
    """Dictionary learning: Adam steps per fit (the authors' one epoch is 16-128 steps at their batch sizes);
    a smaller fitting batch is revisited in reshuffled epochs until the budget is spent. 0 = run dict_epochs
    epochs instead."""
    dict_epochs: int = 1
    """Dictionary learning: epochs over the fitting batch, used only when dict_steps = 0 (0 and 0 = no fit:
    W stays at its seeded initialisation)."""
    dict_max_positions: int = 512
    """Dictionary learning: only the first N completion positions of each trajectory are used."""
    dict_seed: int = 42
    """Seed of the dictionary initialisation (a private generator; the global RNG is untouched)."""
    refit_every: int = 50
    """Refit the dictionary every N optimizer steps, from the current W, on the rollout batch of that step
    (authors' code: 50, the default); 0 = fit once at step 0 (paper Alg. 1)."""
    code_compat: bool = False
    """Reproduce the authors' code quirks: zero-padded states to max_completion_length with all transitions
    used, and advantage scaled by L / L_max. For full parity also set group=batch and xi=10."""
    max_completion_length: int | None = None
    """L_max for code_compat (default: trainer.max_completion_length)."""
    save_every: int = 1
    """Record per-trajectory DSD and a compact spectrum summary (fp16 quantiles over the micro-batch's
    trajectories of each sorted singular value) every N optimizer steps (0 = never)."""
    full_spectra_every: int = 50
    """Also keep every trajectory's full singular-value spectrum (float32, m values) at step 1 and every N
    steps (0 = never, 1 = every recorded step). Full spectra are ~200 bytes per trajectory (m = 50): ~100 KB per
    step on the tiny recipe, against ~1 KB for the summary. docs/relax.md."""
    flush_every: int = 50
    """Write the recorded rows as one shard every N optimizer steps (and at the end of training)."""


@dataclass
class EntropyBonusConfig:
    """Token-level entropy bonus: loss -= coef * mean token entropy."""

    coef: float = 0.01
    """Weight of the entropy bonus (token-mean over the micro-batch's completion tokens)."""


@dataclass
class CovConfig:
    """Clip-Cov / KL-Cov (Cui et al., arXiv 2505.22617)."""

    clip_ratio: float = 0.0002
    """Clip-Cov: fraction of tokens whose gradient is detached (chosen among covariance in [low, high])."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower covariance bound."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper covariance bound."""
    kl_ratio: float = 0.002
    """KL-Cov: fraction of highest-covariance tokens that get the KL penalty (verl 7B recipe: 0.002); the
    reference variant selects max(1, int(kl_ratio * n_tokens)), the penalty variant int(kl_ratio * n_tokens)."""
    kl_coef: float = 1.0
    """KL-Cov: weight of the penalty |log pi - log pi_old| on those tokens; needs old log-probs, i.e. an
    off-policy GRPO setting (trainer.num_iterations > 1 or steps_per_generation > gradient_accumulation_steps)."""
    kl_variant: str = "reference"
    """KL-Cov: reference (default; verl's compute_policy_loss_kl_cov): the unclipped policy-gradient loss
    token-mean(-A * rho) on every completion token replaces the trainer's clipped one, plus the penalty on at
    least one token | penalty (rlx's earlier variant): the trainer's clipped loss plus the penalty only, on
    int(kl_ratio * n) tokens, possibly none. docs/relax.md."""


@dataclass
class RegularizersConfig:
    """Exploration regularizers added to the policy loss. `regularizers=[relax,entropy]` sets `enabled`."""

    enabled: list[str] = field(default_factory=list)
    """Names from the registry: relax, entropy, clip_cov, kl_cov."""
    relax: RelaxConfig = field(default_factory=RelaxConfig)
    """ReLaX options."""
    entropy: EntropyBonusConfig = field(default_factory=EntropyBonusConfig)
    """Entropy-bonus options."""
    clip_cov: CovConfig = field(default_factory=CovConfig)
    """Clip-Cov options."""
    kl_cov: CovConfig = field(default_factory=CovConfig)
    """KL-Cov options."""


@dataclass
class ReplayConfig:
    """Activation Replay at evaluation time (arXiv 2511.19972); see rlx/replay. Read by rlx/evaluate.py
    (`replay=MODE`) and, for every key but `mode`, by the in-training evaluation (`eval.replay=MODE`)."""

    mode: str = "off"
    """rlx/evaluate.py: off | learnable (the paper's method) | direct (replace layer inputs with the base
    model's). Training uses eval.replay instead."""
    base_model: str | None = None
    """The base (pre-RL) model whose logit-lens distributions are replayed. In training (eval.replay), unset
    means the model the run started from."""
    rho: float = 0.4
    """Positions with base logit-lens entropy <= rho * max are selected."""
    top_k: int = 50
    """KL is restricted to the base model's top-k tokens."""
    lr: float = 10.0
    """Learning rate of plain gradient descent on the offsets."""
    steps: int = 25
    """Optimisation steps."""
    num_layers: int = 16
    """L, the number of early layers in the loss (capped at the model's depth)."""
    align: str = "code"
    """code (the released code's one-layer offset: RL layer-l input vs base layer-l output) | paper (output vs output)."""
    positions: str = "auto"
    """Eligible positions. auto = image/video pad tokens for VLMs, prompt tokens for text models (learnable), every
    non-pad token (direct); prompt | visual | all force one rule."""
    exclude_special: bool = True
    """Text models: special tokens (chat-template markers, bos/eos) are never eligible for learnable replay."""
    fp32: bool = False
    """Compute the logit-lens norm, logits and KL in float32 (the released code stays in the model dtype)."""
    lens_chunk_size: int = 16384
    """Vocabulary rows per chunk in full-vocabulary logit-lens entropy, top-k and KL."""
    log_final_loss: bool = False
    """Also evaluate the loss at the final offsets (one extra forward; the released code never does)."""
    direct_num_layers: int = 7
    """direct: L, the number of early layers whose inputs are replaced (released agent/video scripts: 7)."""
    direct_thresholds: list[float] | None = None
    """direct: absolute per-layer base-entropy thresholds in nats (released scripts: Qwen2.5-VL values); None uses
    the relative rule entropy <= rho * max over eligible positions."""
    direct_require_lower: bool = True
    """direct: also require base entropy < RL entropy at the position (the released scripts do)."""


@dataclass
class GuardConfig:
    """Divergence guard: stops a run that has diverged or collapsed with exit code 3 (docs/resume.md)."""

    enabled: bool = True
    """Check every optimizer step and every logged step."""
    nonfinite: bool = True
    """Stop on a non-finite gradient (checked before the optimizer step, so the weights are still finite), on
    weights made non-finite by a step, and on sampling that meets non-finite probabilities."""
    collapse_steps: int = 5
    """Stop when the policy looks collapsed for this many consecutive logged steps: entropy at its uniform
    maximum (see `entropy_fraction`), or every reward function returning NaN. 0 turns collapse checks off."""
    entropy_fraction: float = 0.98
    """Logged mean token entropy >= entropy_fraction * ln(vocabulary size) counts as uniform (collapsed)."""
    checkpoint: bool = True
    """Write a checkpoint of the state at the stop (not when the weights are non-finite or exploded): to inspect,
    or to start a new run from (model.name_or_path=RUN/checkpoint-N)."""


@dataclass
class RunConfig:
    """One training or evaluation run."""

    recipe: str = ""
    """Name of the recipe this config came from (set by the loader)."""
    algo: str = "grpo"
    """grpo | dpo | sft | ppo: a registered trainer (rlx/trainers/catalog.py)."""
    output_dir: str | None = None
    """Run directory; default runs/<recipe>/<timestamp>, decided once on rank 0."""
    seed: int = 0
    """Seed of model init (embedded), sampling and training."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Task and data."""
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    """Warm start of the embedded model."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """DPO pair construction."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """TRL training arguments for the algorithm (validated against its config class)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    """Measuring instruments."""
    regularizers: RegularizersConfig = field(default_factory=RegularizersConfig)
    """Exploration regularizers."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Activation Replay (evaluate.py)."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Divergence guard (non-finite gradients, collapsed policy): exit 3."""
    print_config: bool = False
    """Print the resolved config and exit."""
