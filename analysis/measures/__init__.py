"""Measures: each a function from a loaded `Run` to a tidy pandas table.

| module | tables | needs |
|---|---|---|
| `training` | `training_curves` | metrics.jsonl |
| `grad_alignment` | `components`, `tertiles`, `layer_groups`, `pos_neg_cosine`, `classify`, `sketch_similarity`, `drift` | diagnostics.grad_alignment |
| `relax` | `dsd_over_steps`, `masked_fraction`, `spectra` | regularizers=[relax] |
| `entropy` | `entropy_dynamics`, `entropy_metrics` | diagnostics.activations / logged metrics |
| `activation_shift` | `activation_shift`, `shift_matrix` | the Activation Replay analysis |
| `correctness` | `correctness_direction`, `probe_accuracy` | diagnostics.activations |
| `correctness_probe` | `correctness_probe`, `best_of_n`, `direction_drift` | diagnostics.correctness_probe |
| `h_neurons` | `mass_by_bucket`, `gradient_share`, `transfer`, `stability`, `layer_histogram`, `fits` | diagnostics.h_neurons |
| `rollouts` | `rollout_samples`, `best_worst_groups`, `preference_pairs` | diagnostics.rollouts |
| `passk` | `passk_curves`, `replay_curves`, `replay_gain`, `crossing`, `eval_over_steps` | eval.every (eval.replay) |
| `hidden_rank` | `rank_over_steps`, `rank_and_dsd` | diagnostics.hidden_rank (regularizers=[relax] for the DSD) |
| `probes` | `score_over_steps`, `probe_auroc` | diagnostics.probes |

Every function returns an empty table (with its columns) when the run did not record what it needs.
"""

from analysis.measures import (
    activation_shift,
    correctness,
    correctness_probe,
    entropy,
    grad_alignment,
    h_neurons,
    hidden_rank,
    passk,
    probes,
    relax,
    rollouts,
    training,
)

__all__ = [
    "activation_shift",
    "correctness",
    "correctness_probe",
    "entropy",
    "grad_alignment",
    "h_neurons",
    "hidden_rank",
    "passk",
    "probes",
    "relax",
    "rollouts",
    "training",
]
