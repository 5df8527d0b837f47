"""Every file rlx writes under `<run_dir>/diagnostics/`, declared once: path, version, columns and dtypes.

A `Dump` is one kind of file: the instrument that owns it, its path under `diagnostics/` (a pattern with the
fields the writer fills in, e.g. `grad_alignment/step_{step:06d}.parquet`), its schema version and its fields:
parquet columns with their arrow types, safetensors tensors with their dtypes, or JSON keys. Writers go through
`DiagnosticsWriter.write(dump, data, **path_fields)`, which checks the data against the declaration (an
undeclared column, tensor or key, or a tensor of the wrong dtype, raises) and writes parquet with the declared
arrow schema, so every file of a kind has the same columns whatever the rows held (a column a row lacks is
null). The analysis package reads these names and nothing else, and `analysis.synthetic` writes its fixtures
through the same declarations.

Growing tables are written as shards (one file per logged step, round or flush), never rewritten: the path
pattern of such a dump holds the step or round. Files one rank writes alone carry `.rank{r}` before the suffix
(`per_rank`). A `standalone` dump is written by a command outside training (`python -m rlx.replay.analysis`):
a directory whose manifest lists only standalone dumps is complete without `config.yaml` and `metrics.jsonl`.

Adding a dump: declare it here (bump `version` when a column changes meaning or goes, say in `history` which
older versions the readers still take), write it with `writer.write(DUMP, ...)`, read it in `analysis/` by
its declared names. This module imports only pyarrow and the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

STR, F64, I64, BOOL = pa.string(), pa.float64(), pa.int64(), pa.bool_()


@dataclass(frozen=True)
class Field:
    """One column (parquet: `type` is a pyarrow type), tensor (safetensors: `type` is a dtype name such as
    "float16") or top-level key (JSON: `type` is a Python type). A `name` with `{...}` is a family of names
    (e.g. the sketch tensors `{kind}/{step:06d}`, the rollout columns `reward/{function}`)."""

    name: str
    type: Any
    doc: str
    optional: bool = False
    """Tensors and JSON keys only: may be absent (parquet columns are always written, null when absent)."""

    @property
    def is_family(self) -> bool:
        return "{" in self.name

    def matches(self, name: str) -> bool:
        return _pattern(self.name).fullmatch(name) is not None


@dataclass(frozen=True)
class Dump:
    """One kind of diagnostics file (see the module docstring)."""

    kind: str
    instrument: str
    path: str
    version: int
    fields: tuple[Field, ...]
    description: str
    name: str | None = None
    """Manifest name; None: the file stem (without `.rank{r}`)."""
    per_rank: bool = False
    metadata: tuple[str, ...] = ()
    """safetensors header keys the writer sets (besides schema_version and instrument)."""
    standalone: bool = False
    history: str = ""

    @property
    def format(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def relpath(self, **values: Any) -> str:
        """The path under `diagnostics/` (before `.rank{r}`) for the pattern's fields."""
        try:
            return self.path.format(**values)
        except KeyError as e:
            raise TypeError(f"dump {self.kind}: path {self.path} needs the field {e.args[0]}") from None

    def matches(self, entry: Mapping[str, Any]) -> bool:
        """Whether a manifest entry is a file of this dump (same instrument, path matching the pattern)."""
        path = _RANK.sub("", str(entry.get("path", "")))
        return entry.get("instrument") == self.instrument and _pattern(self.path).fullmatch(path) is not None

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.fields if not f.is_family]

    def field(self, name: str) -> Field | None:
        exact = next((f for f in self.fields if f.name == name), None)
        return exact or next((f for f in self.fields if f.is_family and f.matches(name)), None)

    def schema(self, names: Sequence[str] = ()) -> pa.Schema:
        """The arrow schema of a parquet dump: the declared columns, then the family columns in `names`."""
        if self.format != "parquet":
            raise TypeError(f"dump {self.kind} is {self.format}, not parquet")
        extra = [n for n in dict.fromkeys(names) if n not in self.columns]
        fields = [f for f in self.fields if not f.is_family]
        return pa.schema(
            [pa.field(f.name, f.type) for f in fields] + [pa.field(n, self._field(n).type) for n in extra]
        )

    def _field(self, name: str) -> Field:
        f = self.field(name)
        if f is None:
            known = ", ".join(f.name for f in self.fields)
            raise ValueError(f"dump {self.kind} ({self.path}) declares no field {name!r}; it has: {known}")
        return f


_RANK = re.compile(r"\.rank\d+(?=\.[^.]+$)")
_CACHE: dict[str, re.Pattern] = {}


def _pattern(template: str) -> re.Pattern:
    """`a/step_{step:06d}.parquet` -> a regex matching what `template.format(...)` yields."""
    if template not in _CACHE:
        parts = re.split(r"(\{[^}]*\})", template)
        body = "".join(
            (r"\d+" if re.fullmatch(r"\{\w+:0?\d*d\}", p) else r"[^/]+?")
            if p.startswith("{")
            else re.escape(p)
            for p in parts
        )
        _CACHE[template] = re.compile(body)
    return _CACHE[template]


# ---- checks and conversion (used by DiagnosticsWriter.write) ------------------------------------------------


def arrow_table(dump: Dump, data: Any) -> pa.Table:
    """`data` (a list of row dicts, or a pandas DataFrame) as a table with the dump's declared schema.

    Raises ValueError naming the column when `data` has a column the dump does not declare or a value that does
    not convert to the declared type; a declared column `data` lacks is written as nulls."""
    if hasattr(data, "columns"):  # a DataFrame
        names = [str(c) for c in data.columns]
        values = {str(c): data[c].tolist() for c in data.columns}
        n = len(data)
    else:
        rows = list(data)
        names = list(dict.fromkeys(k for r in rows for k in r))
        values = {k: [r.get(k) for r in rows] for k in names}
        n = len(rows)
    for name in names:
        dump._field(name)
    schema = dump.schema(names)
    arrays = []
    for f in schema:
        try:
            arrays.append(pa.array(values.get(f.name, [None] * n), type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ValueError(f"dump {dump.kind}: column {f.name!r} does not convert to {f.type}: {e}") from e
    return pa.Table.from_arrays(arrays, schema=schema)


def check_tensors(dump: Dump, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Raise ValueError unless every tensor is declared with its dtype, every required one is present and every
    metadata key is declared."""
    for name, t in tensors.items():
        f = dump._field(name)
        dtype = str(getattr(t, "dtype", "")).removeprefix("torch.")
        if dtype != f.type:
            raise ValueError(f"dump {dump.kind}: tensor {name!r} is {dtype}, declared {f.type}")
    for f in dump.fields:
        if not f.optional and not f.is_family and f.name not in tensors:
            raise ValueError(f"dump {dump.kind}: tensor {f.name!r} is missing")
    extra = set(metadata or {}) - set(dump.metadata)
    if extra:
        raise ValueError(
            f"dump {dump.kind}: undeclared metadata {sorted(extra)}; declared {list(dump.metadata)}"
        )


def check_json(dump: Dump, obj: Any) -> None:
    """Raise ValueError unless `obj` is an object whose keys are declared and whose required keys are present."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"dump {dump.kind}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        dump._field(key)
    missing = [f.name for f in dump.fields if not f.optional and f.name not in obj]
    if missing:
        raise ValueError(f"dump {dump.kind}: keys {missing} are missing")


# ---- the declarations ---------------------------------------------------------------------------------------

_ALIGNMENT_COLUMNS = (
    Field("step", I64, "optimizer step (1-based)"),
    Field("target", STR, "the target set D' (e.g. heldout_chosen, final_exact)"),
    Field("variant", STR, "param | activation"),
    Field("norm_target", F64, "||g_T||"),
    Field("R_T", F64, "NLL of D' before the step"),
    Field(
        "component",
        STR,
        "total, pos, neg, kl, top, mid, bot, other, update, or layer:<group> (docs/gradient_alignment.md)",
    ),
    Field("G", F64, "<g_T, grad L_component> (update: minus <g_T, delta theta>)"),
    Field("cos", F64, "cosine of the same pair (NaN where not computed)"),
    Field("norm", F64, "||grad L_component||"),
    Field("n_tokens", F64, "tokens in the component"),
    Field(
        "drift", F64, "total row, param variant: cos(grad L, grad L of the drift_lag-th previous logged step)"
    ),
    Field("cos_pos_neg", F64, "pos and neg rows: cos(grad L_pos, grad L_neg)"),
    Field("delta_R", F64, "update row: measured R_T after minus before the step"),
    Field("norm_source", STR, "exact | sketch | rank_mean: how the norm was obtained under DDP"),
    Field("kl_split", STR, "none | fit | unmodelled: whether the KL term's part is split off"),
    Field("kl_split_reason", STR, "why the KL term is unmodelled ('' otherwise)"),
    Field("kl_fit_residual", F64, "relative residual of the per-sequence KL fit (NaN with kl_split none)"),
)

GRAD_ALIGNMENT = Dump(
    "grad_alignment",
    "grad_alignment",
    "grad_alignment/step_{step:06d}.parquet",
    1,
    _ALIGNMENT_COLUMNS,
    "gradient alignment G = <g_T, grad L_c> per logged step and component (docs/gradient_alignment.md)",
    name="grad_alignment",
    history="runs before the shards wrote the whole table to grad_alignment.parquet (same columns); read as well",
)
GRAD_ALIGNMENT_SKETCHES = Dump(
    "grad_alignment_sketches",
    "grad_alignment",
    "grad_alignment_sketches/step_{step:06d}.safetensors",
    1,
    (
        Field(
            "{kind}/{step:06d}", "float16", "(k,) CountSketch of grad L (kind loss), g_T (target), components"
        ),
    ),
    "CountSketch of grad L (loss), g_T (target) and components",
    metadata=("step", "sketch_dim", "seed"),
)
GRAD_ALIGNMENT_TOKENS = Dump(
    "grad_alignment_tokens",
    "grad_alignment",
    "grad_alignment_tokens/step_{step:06d}.safetensors",
    1,
    (
        Field("w", "float32", "(B, T) w_t = dL/dl_t of the logged step's micro-batches, right-padded"),
        Field("w_kl", "float32", "(B, T) the KL term's part of w_t (zeros without one)"),
        Field("mask", "float32", "(B, T) loss mask"),
        Field("sample_id", "int64", "(B,) rollout sample id (-1 where the trainer has none); joins rollouts"),
    ),
    "per-token w_t (and KL part) of the logged step; sample_id per row (GRPO/PPO)",
    metadata=("step",),
)
_SUMMARY_KEYS = (
    Field("n_logged", int, "logged steps"),
    Field("n_nonfinite", int, "steps whose G_total is not finite"),
    Field("frac_positive", float, "share of logged steps with G_total > 0"),
    Field("sign_flip_rate", float, "share of consecutive logged steps whose G_total changes sign"),
    Field("cv", float, "std / |mean| of G_total"),
    Field("mean", float, "mean G_total"),
    Field("std", float, "population std of G_total"),
    Field("regime", str, "supervised-like | RL-like (docs/gradient_alignment.md)"),
    Field("target", str, "D' label"),
    Field("target_option", str, "the target option as given"),
    Field("variant", str, "param | activation"),
    Field("algo", str, "the run's algorithm"),
)
GRAD_ALIGNMENT_SUMMARY = Dump(
    "grad_alignment_summary",
    "grad_alignment",
    "grad_alignment_summary.json",
    1,
    _SUMMARY_KEYS,
    "run summary: fraction of logged steps with G_total > 0, sign-flip rate, CV, regime",
)
ALIGNMENT_EXACT = Dump(
    "alignment_exact",
    "grad_alignment",
    "grad_alignment_{table}.parquet",
    1,
    _ALIGNMENT_COLUMNS,
    "gradient alignment recomputed offline at the saved steps (python -m analysis alignment-exact); "
    "table final_exact or replay_online",
)
ALIGNMENT_EXACT_SUMMARY = Dump(
    "alignment_exact_summary",
    "grad_alignment",
    "grad_alignment_{table}_summary.json",
    1,
    (
        *_SUMMARY_KEYS,
        Field("steps", list, "the saved steps recomputed"),
        Field("save_every", int, "diagnostics.grad_alignment.exact.save_every of the run", optional=True),
        Field("n_target", int, "responses in D'"),
    ),
    "run summary of the offline alignment",
)

RELAX_TRAJECTORIES = Dump(
    "relax_trajectories",
    "relax",
    "relax/trajectories_step{step:06d}.parquet",
    1,
    (
        Field("step", I64, "optimizer step (1-based)"),
        Field("micro_step", I64, "recorded micro-batch (joins the spectra files)"),
        Field("index", I64, "row in the micro-batch"),
        Field("sample_id", I64, "rollout sample id (-1 without one); joins diagnostics/rollouts"),
        Field("group_id", I64, "prompt group"),
        Field("advantage", F64, "sequence advantage"),
        Field("a", F64, "the advantage weight of the exploration loss"),
        Field("length", I64, "completion tokens"),
        Field("dsd", F64, "Dynamic Spectral Dispersion of the trajectory"),
        Field("masked", BOOL, "DSD > xi: its push is detached and it gets the adaptive KL"),
        Field("xi", F64, "the DSD threshold"),
    ),
    "ReLaX per-trajectory DSD, advantage, length and KL mask at one optimizer step.",
    per_rank=True,
)
RELAX_SPECTRA_SUMMARY = Dump(
    "relax_spectra_summary",
    "relax",
    "relax/spectra_summary_step{step:06d}.safetensors",
    2,
    (
        Field("step", "int64", "(K,) step of each recorded micro-batch"),
        Field("micro_step", "int64", "(K,)"),
        Field("n", "int64", "(K,) trajectories in the micro-batch"),
        Field("levels", "float32", "(Q,) quantile levels"),
        Field(
            "quantiles", "float16", "(K, Q, m) quantiles of each sorted |s_j| (NaN-padded to the widest m)"
        ),
        Field("mean", "float16", "(K, m) mean of each sorted |s_j|"),
    ),
    "ReLaX spectrum summary per recorded micro-batch: fp16 quantiles (levels) and mean over its trajectories "
    "of each sorted singular value of K.",
    per_rank=True,
    metadata=("step", "spectrum", "levels"),
)
RELAX_SPECTRA = Dump(
    "relax_spectra",
    "relax",
    "relax/spectra_step{step:06d}.safetensors",
    2,
    (
        Field("singular_values", "float32", "(N, m) spectrum of each trajectory's Koopman operator"),
        Field("step", "int64", "(N,)"),
        Field("micro_step", "int64", "(N,)"),
        Field(
            "index", "int64", "(N,) row in the micro-batch: joins the trajectories on step, micro_step, index"
        ),
        Field("dsd", "float32", "(N,)"),
    ),
    "ReLaX spectrum of each trajectory's Koopman operator at step 1 and every full_spectra_every steps.",
    per_rank=True,
    metadata=("step", "spectrum"),
    history="v2: full spectra only at step 1 and every full_spectra_every steps, with micro_step/index, next to "
    "the summaries; v1 (the full spectrum of every recorded trajectory, no micro_step/index) is read as well",
)
RELAX_DICTIONARY = Dump(
    "relax_dictionary",
    "relax",
    "relax/dictionary.safetensors",
    1,
    (Field("W", "float32", "(m, d) Koopman dictionary, psi(h) = sigmoid(W h)"),),
    "ReLaX Koopman dictionary W (m, d), psi(h) = sigmoid(W h); reused on resume.",
    metadata=("fit_step", "xi"),
)
RELAX_DICTIONARY_FIT = Dump(
    "relax_dictionary_fit",
    "relax",
    "relax/dictionary_fit.json",
    2,
    (
        Field("xi", float, "the calibrated DSD threshold"),
        Field("xi_median", float, "median DSD of the first batch (xi = xi_scale * it)"),
        Field(
            "fits",
            list,
            "per fit: fit_step, n_trajectories, world_size, adam_steps, lr, loss_before, loss_after, "
            "weight_change, seconds, losses",
        ),
    ),
    "ReLaX dictionary fits and the calibrated xi",
    history="v1 held one fit's `losses` (and `fit_step`); read as well",
)

CORRECTNESS_PROBE = Dump(
    "correctness_probe",
    "correctness_probe",
    "correctness_probe/step_{step:06d}.parquet",
    1,
    (
        Field("step", I64, "optimizer step (1-based) whose loss forward was measured"),
        Field("layer", I64, "residual-stream layer, HF hidden_states order (0 = embeddings, L = last block)"),
        Field("direction", STR, "diff_means | logistic"),
        Field("frozen", BOOL, "scored with the first fitted direction (freeze) rather than this step's fit"),
        Field("fit_step", I64, "step whose fit is the direction used (-1: none)"),
        Field("auroc", F64, "AUROC of <h, v> against correct over the held-out half's rollouts"),
        Field("auroc_logp", F64, "AUROC of the mean completion log-prob, same rollouts"),
        Field("gap", F64, "auroc - auroc_logp ('knows vs says')"),
        Field("pairwise_acc", F64, "P[s(i+) > s(i-)] over (correct, wrong) pairs of one held-out prompt"),
        Field("pairwise_acc_logp", F64, "the same for the mean log-prob"),
        Field("cos_to_first", F64, "cos(this step's fitted direction, the first fitted direction)"),
        Field("update_cos", F64, "cos(v, -g), g = sum of dL/dh over the step's response positions"),
        Field("update_norm", F64, "|g| (the trainer's loss scaling, summed over ranks)"),
        Field("n_rollouts", I64, "rollouts with a reward and a non-empty completion"),
        Field("n_fit_groups", I64, "mixed groups of the fit half (what the direction was fitted on)"),
        Field("n_eval", I64, "held-out rollouts scored"),
        Field("n_eval_pairs", I64, "within-group (correct, wrong) pairs of the held-out half"),
        Field("accuracy", F64, "share of the step's rollouts that are correct"),
    ),
    "correctness direction read-out per measured step and layer: held-out AUROC vs the policy's mean log-prob, "
    "drift to the first direction, alignment with the loss gradient on the residual stream",
    name="correctness_probe",
)
CORRECTNESS_PROBE_SCORES = Dump(
    "correctness_probe_scores",
    "correctness_probe",
    "correctness_probe/scores_step_{step:06d}.parquet",
    1,
    (
        Field("step", I64, "optimizer step (1-based)"),
        Field("layer", I64, "residual-stream layer"),
        Field("sample_id", I64, "rollout sample id; joins diagnostics/rollouts"),
        Field("group_id", I64, "prompt group"),
        Field("heldout", BOOL, "in the held-out half (scored, not fitted on)"),
        Field("reward", F64, "task reward"),
        Field("correct", BOOL, "reward >= threshold"),
        Field("score", F64, "<h, v> with the direction used at this step (NaN without one)"),
        Field("mean_logp", F64, "mean completion token log-prob under the policy of the loss forward"),
    ),
    "per-rollout correctness-probe scores of a measured step (best-of-N and AUROC offline)",
    name="correctness_probe_scores",
)
CORRECTNESS_PROBE_DIRECTIONS = Dump(
    "correctness_probe_directions",
    "correctness_probe",
    "correctness_probe/directions_step_{step:06d}.safetensors",
    1,
    (
        Field("layers", "int64", "(K,) the chosen layers"),
        Field("fitted", "float32", "(K, d) unit direction fitted at this step (NaN rows: none)"),
        Field("used", "float32", "(K, d) unit direction the step was scored with (the first under freeze)"),
        Field("grad", "float32", "(K, d) g = sum of dL/dh over response positions (NaN rows: not measured)"),
    ),
    "correctness-probe directions and residual-stream loss gradients per layer at a measured step",
    metadata=("step", "direction"),
)
ACTIVATIONS = Dump(
    "activations",
    "activations",
    "activations/step_{step:06d}.safetensors",
    1,
    (
        Field("last", "float16", "(N, L+1, d) hidden states at the last completion token"),
        Field("mean", "float16", "(N, L+1, d) the same averaged over completion tokens"),
        Field("reward", "float32", "(N,) task reward (NaN without one)"),
        Field("prompt_id", "int64", "(N,) row of the probe prompt in the held-out split"),
        Field("mean_logp", "float32", "(N,) mean token log-prob of the completion"),
        Field("completion_len", "int64", "(N,) completion tokens"),
        Field("token_logp", "float32", "(T,) per completion token"),
        Field("token_entropy", "float32", "(T,) per completion token (nats)"),
        Field("token_sample", "int64", "(T,) the completion each token belongs to"),
        Field("token_id", "int64", "(T,) the token"),
    ),
    "pooled per-layer states, rewards and token log-probs/entropies of the probe set",
    per_rank=True,
    metadata=("step", "pooling", "num_layers"),
)

ROLLOUTS = Dump(
    "rollouts",
    "rollouts",
    "rollouts/round_{round:06d}.parquet",
    1,
    (
        Field(
            "sample_id", I64, "(round << 32) | global index in the generation batch; joins ReLaX trajectories"
        ),
        Field("round", I64, "generation round (0-based over the run)"),
        Field("step", I64, "the first optimizer step trained on this rollout (1-based)"),
        Field("rank", I64, "process that generated it"),
        Field("group_id", I64, "prompt group (the num_generations completions of one prompt share it)"),
        Field("prompt", STR, "prompt text (special tokens dropped)"),
        Field("completion", STR, "completion text (special tokens dropped)"),
        Field("completion_length", I64, "completion tokens (mask)"),
        Field(
            "advantage",
            F64,
            "the advantage the loss uses (PPO: mean of the whitened per-token GAE advantages)",
        ),
        Field("old_logp_mean", F64, "mean per-token log-prob under the sampling policy, when computed"),
        Field("ref_logp_mean", F64, "mean per-token log-prob under the reference, when computed"),
        Field(
            "reward", F64, "weighted sum of the reward functions (NaN when every function returned NaN/None)"
        ),
        Field("reward/{function}", F64, "each reward function's value"),
    ),
    "completions of one generation round with rewards, advantages and sample ids",
    per_rank=True,
)
PREFERENCE_PAIRS = Dump(
    "preference_pairs",
    "rollouts",
    "rollouts/preference_pairs.parquet",
    1,
    (
        Field("split", STR, "train | eval"),
        Field("pair_index", I64, "row in the split"),
        Field("prompt", STR, "prompt text"),
        Field("chosen", STR, "chosen completion"),
        Field("rejected", STR, "rejected completion"),
        Field("chosen_source", STR, "policy (a sample verified correct) | reference (the solution)"),
        Field("rejected_source", STR, "policy (a sample verified wrong) | corruption (of the solution)"),
    ),
    "the preference pairs rlx sampled from the policy and verified, train and held-out",
)

EVAL = Dump(
    "eval",
    "eval",
    "eval/step_{step:06d}.parquet",
    2,
    (
        Field("step", I64, "optimizer step the policy had taken (0 = base policy)"),
        Field("prompt_index", I64, "row of the held-out split"),
        Field("kind", STR, "greedy | sample"),
        Field("sample", I64, "sample number within the prompt (0 for greedy)"),
        Field("completion", STR, "decoded completion"),
        Field("reward", F64, "the task's reward (task.score) of the completion"),
        Field("correct", BOOL, "reward >= 1"),
        Field("replay", STR, "off (the plain evaluation) | learnable | direct (Activation Replay pass)"),
    ),
    "every held-out completion of the in-training evaluation at this step",
    history="v1 has no `replay` column: every row is a plain evaluation (read as replay = off)",
)

REPLAY_KL_BUCKETS = Dump(
    "replay_kl_buckets",
    "activation_replay",
    "replay_kl_buckets.parquet",
    1,
    (
        Field("schema_version", I64, "1"),
        Field("layer", I64, "decoder layer (its output); -1 = all layers"),
        Field("bucket", I64, "0 = lowest base entropy"),
        Field("bucketing", STR, "relative | quantile | absolute"),
        Field("bucket_lo", F64, "bucket edge in the bucketing's unit (relative fraction or nats)"),
        Field("bucket_hi", F64, "upper bucket edge"),
        Field("entropy_lo", F64, "lowest base entropy observed in the bucket (nats)"),
        Field("entropy_hi", F64, "highest base entropy observed in the bucket (nats)"),
        Field("n_positions", I64, "positions in the bucket"),
        Field("kl_mean", F64, "mean KL(base || RL) in nats"),
        Field("kl_sem", F64, "its standard error"),
        Field("base_entropy_mean", F64, "mean base entropy (nats)"),
        Field("top1_agree", F64, "share of positions where base and RL agree on the top-1 token"),
        Field("base_model", STR, "base model"),
        Field("rl_model", STR, "RL model"),
    ),
    "Activation Replay finding: mean KL(base||RL) of logit-lens distributions per layer and base-entropy "
    "bucket (layer -1 = all layers)",
    standalone=True,
)
REPLAY_KL_POSITIONS = Dump(
    "replay_kl_positions",
    "activation_replay_positions",
    "replay_kl_positions.parquet",
    1,
    (
        Field("schema_version", I64, "1"),
        Field("prompt_index", I64, "prompt"),
        Field("position", I64, "index within the unpadded prompt"),
        Field("token_id", I64, "the input token"),
        Field("layer", I64, "decoder layer (its output)"),
        Field("base_entropy", F64, "entropy of the base logit-lens distribution (nats)"),
        Field("rl_entropy", F64, "the same for the RL model"),
        Field("relative_entropy", F64, "base entropy / its max over the prompt's positions at the layer"),
        Field("kl", F64, "KL(base || RL) (nats)"),
        Field("top1_agree", BOOL, "base and RL agree on the top-1 token"),
        Field("selected", BOOL, "H <= rho * max (what learnable replay selects)"),
        Field("bucket", I64, "0 = lowest base entropy"),
        Field("bucket_lo", F64, "bucket edge"),
        Field("bucket_hi", F64, "upper bucket edge"),
    ),
    "Activation Replay finding: per input position and layer, base/RL logit-lens entropy and KL",
    standalone=True,
)
HIDDEN_RANK = Dump(
    "hidden_rank",
    "hidden_rank",
    "hidden_rank/step_{step:06d}.parquet",
    1,
    (
        Field("sample_id", I64, "rollout sample id (-1 without one); joins diagnostics/rollouts"),
        Field("step", I64, "optimizer step (1-based) whose loss forward was measured"),
        Field("reward", F64, "task reward (NaN when unscored)"),
        Field("length", I64, "completion tokens (the loss mask)"),
        Field("erank", F64, "effective rank of the response's last hidden states (form: exp or entropy)"),
        Field("d1", F64, "mean first difference of the prefix effective ranks (NaN: fewer than 2 prefixes)"),
        Field("d2", F64, "mean second difference of the prefix effective ranks (NaN: fewer than 3 prefixes)"),
        Field("n_prefixes", I64, "prefix windows of the response (j*stride + 1 tokens, j*stride < length)"),
    ),
    "per-rollout effective rank of the last hidden states and its prefix differences at a measured step",
    name="hidden_rank",
)
PROBES = Dump(
    "probes",
    "probes",
    "probes/step_{step:06d}.parquet",
    1,
    (
        Field("sample_id", I64, "rollout sample id (-1 without one); joins diagnostics/rollouts"),
        Field("step", I64, "optimizer step (1-based) whose loss forward was scored"),
        Field("probe", STR, "the probe's name (its file's `name` metadata, else the file stem)"),
        Field("score", F64, "<h_layer(position), direction> + bias (NaN: the position does not exist)"),
        Field("reward", F64, "task reward (NaN when unscored)"),
    ),
    "frozen linear probe scores, one row per rollout and probe, at a scored step",
    name="probes",
)

H_NEURONS_STEPS = Dump(
    "h_neurons_steps",
    "h_neurons",
    "h_neurons/steps_step{step:06d}.parquet",
    1,
    (
        Field("step", I64, "optimizer step (1-based) whose loss forward was measured"),
        Field(
            "bucket", STR, "all | correct (reward >= threshold) | wrong: the rollouts the row averages over"
        ),
        Field("n_rollouts", I64, "rollouts in the bucket with answer tokens"),
        Field("set_size", F64, "|H0| (NaN: no set was fitted at step 1)"),
        Field(
            "mass",
            F64,
            "mean over the bucket of sum_{j in H0} CETT_j averaged over the rollout's answer tokens",
        ),
        Field("mass_sem", F64, "standard error of that mean"),
        Field(
            "mass_random", F64, "the same for layer-matched random sets of |H0| neurons (mean over the sets)"
        ),
        Field(
            "mass_matched",
            F64,
            "the same for activation-matched sets (same layer, close mean CETT at step 1)",
        ),
        Field(
            "mass_other", F64, "the same as mass over the rollout's other tokens (prompt, non-answer tokens)"
        ),
        Field("auroc", F64, "bucket all: AUROC of the frozen probe's score for wrong vs correct rollouts"),
        Field("auroc_mass", F64, "bucket all: AUROC of the H0 mass alone, wrong vs correct"),
        Field(
            "grad_share_down",
            F64,
            "bucket all: sum_{j in H0} ||dL/dW_down[:, j]||^2 / the same over all neurons",
        ),
        Field("grad_share_mlp", F64, "bucket all: the same with W_up and W_gate rows j added"),
        Field("grad_share_down_random", F64, "bucket all: grad_share_down of the random sets (mean)"),
        Field("grad_share_mlp_random", F64, "bucket all: grad_share_mlp of the random sets (mean)"),
        Field("grad_share_down_matched", F64, "bucket all: grad_share_down of the activation-matched sets"),
        Field("grad_share_mlp_matched", F64, "bucket all: grad_share_mlp of the activation-matched sets"),
        Field("grad_share_chance", F64, "bucket all: |H0| / (L m), the share of a uniform spread"),
    ),
    "H-Neurons at a measured step: CETT mass of the frozen set by reward bucket next to random sets, transfer AUROC "
    "of the frozen probe, share of the unclipped gradient on the set's MLP weights (docs/probes.md)",
    name="h_neurons_steps",
)
H_NEURONS_ROLLOUTS = Dump(
    "h_neurons_rollouts",
    "h_neurons",
    "h_neurons/rollouts_step{step:06d}.parquet",
    1,
    (
        Field("step", I64, "optimizer step (1-based)"),
        Field("sample_id", I64, "rollout sample id; joins diagnostics/rollouts"),
        Field("group_id", I64, "prompt group (-1 without one)"),
        Field("reward", F64, "task reward (NaN when unscored)"),
        Field("wrong", BOOL, "reward < threshold"),
        Field(
            "n_answer_tokens", I64, "answer tokens (the completion minus a trailing EOS, after answer_marker)"
        ),
        Field("n_other_tokens", I64, "other real tokens (prompt and non-answer completion tokens)"),
        Field("mass", F64, "sum_{j in H0} of the rollout's mean answer-token CETT (NaN: no H0 or no answer)"),
        Field("mass_other", F64, "the same over its other tokens"),
        Field("mass_random", F64, "the mean over the random control sets of their answer-token mass"),
        Field("mass_matched", F64, "the same over the activation-matched control sets"),
        Field("score", F64, "the frozen probe's logit theta . x_ans + b"),
        Field("used_in_fit", BOOL, "fit steps: the rollout is in the fit's data (null on other steps)"),
    ),
    "per-rollout H-Neurons values at a measured step",
    name="h_neurons_rollouts",
)
H_NEURONS_FITS = Dump(
    "h_neurons_fits",
    "h_neurons",
    "h_neurons/fits_step{step:06d}.parquet",
    1,
    (
        Field("step", I64, "optimizer step whose rollouts were fitted (1 = H0, on the base model)"),
        Field("fit", STR, "full | half_a | half_b (the two disjoint halves of the fit's groups)"),
        Field("C", F64, "inverse L1 strength (scikit-learn convention)"),
        Field(
            "data", STR, "consistent (the consistency filter) | all (every scored rollout) | none (no fit)"
        ),
        Field("note", STR, "why the data fell back or no fit was made ('' otherwise)"),
        Field("n_rollouts", I64, "rollouts fitted on"),
        Field("n_groups", I64, "prompt groups fitted on"),
        Field("n_wrong", I64, "wrong rollouts fitted on"),
        Field("n_right", I64, "right rollouts fitted on"),
        Field("n_samples", I64, "rows of the 3-vs-1 design (answer and other features of each rollout)"),
        Field("n_positive", I64, "rows labelled 1 (answer features of wrong rollouts)"),
        Field("n_features", I64, "features the solver saw (L m, or max_features)"),
        Field("set_size", I64, "neurons with a positive weight (|H|)"),
        Field("n_nonzero", I64, "neurons with a non-zero weight"),
        Field("intercept", F64, "the probe's intercept"),
        Field("objective", F64, "||theta||_1 + C sum_i loss_i at the solution"),
        Field("converged", BOOL, "the optimality conditions hold within tol"),
        Field("iterations", I64, "FISTA iterations"),
        Field("kkt_violation", F64, "largest violation of the optimality conditions / lambda"),
        Field("train_auroc", F64, "AUROC of the probe on its own rollouts' answer features, wrong vs right"),
        Field("wall_time", F64, "wall time of the fit (seconds)"),
        Field(
            "split_jaccard", F64, "full row: Jaccard of the two half fits' sets (same model, disjoint data)"
        ),
        Field("jaccard", F64, "full row of a refit: |H0 n H_t| / |H0 u H_t|"),
        Field("overlap", F64, "full row of a refit: |H0 n H_t| / min(|H0|, |H_t|)"),
        Field("jaccard_chance", F64, "full row of a refit: the Jaccard of random sets of these sizes"),
        Field(
            "overlap_chance", F64, "full row of a refit: the overlap of random sets, |H0||H_t| / (L m) / min"
        ),
        Field(
            "cross_jaccard",
            F64,
            "full row of a refit: mean Jaccard of step-1 half sets vs this step's half sets",
        ),
    ),
    "H-Neurons fits (step 1 and each refit): data, solver, set size, stability against H0 and chance",
    name="h_neurons_fits",
)
H_NEURONS_SET = Dump(
    "h_neurons_set",
    "h_neurons",
    "h_neurons/set_step{step:06d}.parquet",
    1,
    (
        Field("step", I64, "the fit's step"),
        Field("fit", STR, "full | half_a | half_b"),
        Field("layer", I64, "decoder block (0-based)"),
        Field("neuron", I64, "index j of the MLP neuron (column of W_down, input of down_proj)"),
        Field("weight", F64, "the probe's weight theta (CETT units); non-zero weights only"),
        Field("in_set", BOOL, "weight > 0: an H-Neuron"),
    ),
    "the neurons of each H-Neurons fit with their probe weights",
    name="h_neurons_set",
)

DUMPS: dict[str, Dump] = {
    d.kind: d
    for d in (
        GRAD_ALIGNMENT,
        GRAD_ALIGNMENT_SKETCHES,
        GRAD_ALIGNMENT_TOKENS,
        GRAD_ALIGNMENT_SUMMARY,
        ALIGNMENT_EXACT,
        ALIGNMENT_EXACT_SUMMARY,
        RELAX_TRAJECTORIES,
        RELAX_SPECTRA_SUMMARY,
        RELAX_SPECTRA,
        RELAX_DICTIONARY,
        RELAX_DICTIONARY_FIT,
        CORRECTNESS_PROBE,
        CORRECTNESS_PROBE_SCORES,
        CORRECTNESS_PROBE_DIRECTIONS,
        ACTIVATIONS,
        ROLLOUTS,
        PREFERENCE_PAIRS,
        EVAL,
        REPLAY_KL_BUCKETS,
        REPLAY_KL_POSITIONS,
        H_NEURONS_STEPS,
        H_NEURONS_ROLLOUTS,
        H_NEURONS_FITS,
        H_NEURONS_SET,
        HIDDEN_RANK,
        PROBES,
    )
}
"""Every declared dump by kind."""


def dump_of(entry: Mapping[str, Any]) -> Dump | None:
    """The declared dump a manifest entry is a file of, or None (a legacy path or an undeclared instrument)."""
    return next((d for d in DUMPS.values() if d.matches(entry)), None)


def newest_version(entry: Mapping[str, Any]) -> int:
    """The newest schema version of the entry's file that the readers take: its dump's version, else the newest
    of its instrument's dumps (legacy paths), else 1 (an instrument rlx does not declare)."""
    d = dump_of(entry)
    if d is not None:
        return d.version
    same = [d.version for d in DUMPS.values() if d.instrument == entry.get("instrument")]
    return max(same, default=1)
