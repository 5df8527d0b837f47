"""PPO with a learned critic and GAE, owned by rlx, on TRL's GRPO machinery (design: docs/ppo.md).

What is reused from `trl.GRPOTrainer` unchanged: the prompt sampler and rollout buffer (`_prepare_inputs`,
`num_iterations` = PPO epochs, `steps_per_generation` = minibatches), generation (HF `generate` under the ZeRO-3
unwrap, or vLLM), the reward-function calling convention (`_calculate_rewards`), the old/reference log-prob
passes, the fused LM head and the metric logging (`self._metrics` -> `log`).

What PPO changes (each override calls `super()` and adds to it):
- `_generate_and_score_completions`: after GRPO's rollout, replaces the group advantages with whitened GAE
  advantages over the KL-shaped per-token reward, and stores old log-probs, critic values and returns (the
  rollout's scores, old log-probs and KL are read by `kl_shaped_rollout`, which REINFORCE++ shares);
- `_compute_loss`: clipped policy loss + `vf_coef` * clipped value loss (rlx/algorithms/ppo.py).

The critic is a separate network (its own backbone and a scalar head) registered as a submodule of the policy,
`policy.rlx_critic`, so the Trainer's single model / optimizer / DDP wrapper / DeepSpeed engine covers both. It
is stripped from saved policy checkpoints and saved next to them in `critic/`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlx.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    token_level_rewards,
)
from rlx.algorithms.stats import kl_estimate, masked_mean, masked_whiten
from rlx.errors import UserError
from rlx.instruments.base import backbone_of, log_metrics, unwrap_policy
from rlx.trainers.common import bind
from rlx.trainers.grpo import RLXGRPOTrainer
from rlx.trainers.ppo_config import PPOConfig

CRITIC_ATTR = "rlx_critic"


def global_moments(
    accelerator: Any, x: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and unbiased variance of x over all ranks (the rollout is sharded across processes)."""
    m = mask.to(x.dtype)
    s = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])
    s = accelerator.reduce(s, reduction="sum")
    n = s[2].clamp(min=1)
    mean = s[0] / n
    var = (s[1] - n * mean**2).clamp(min=0) / (n - 1).clamp(min=1)
    return mean, var


@dataclass
class KLShapedRollout:
    """This rank's share of one GRPO generation batch, as the trainers with a KL-shaped reward read it (PPO,
    REINFORCE++). B completions, C completion positions, P prompt positions."""

    input_ids: torch.Tensor
    """(B, P + C) prompt and completion tokens."""
    attention_mask: torch.Tensor
    """(B, P + C)."""
    mask: torch.Tensor
    """(B, C) float: completion tokens that count (tool tokens left out)."""
    scores: torch.Tensor
    """(B,) task score: weighted sum of the reward functions, as GRPO's `reward` metric (unscorable -> 0)."""
    old_logps: torch.Tensor
    """(B, C) log pi_old of the sampled tokens (the rollout policy)."""
    kl: torch.Tensor
    """(B, C) per-token KL_t(pi_old || pi_ref) with the configured estimator, masked; 0 without a reference."""


def kl_shaped_rollout(trainer: Any, out: dict[str, Any], kl_estimator: str) -> KLShapedRollout:
    """Read `out` (what `RLXGRPOTrainer._generate_and_score_completions` returned) into a `KLShapedRollout`:
    computes log pi_old when GRPO skipped it (a rollout used once) and the KL against GRPO's reference log-probs."""
    prompt_ids, completion_ids = out["prompt_ids"], out["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    c = completion_ids.size(1)
    mask = out["completion_mask"].float()
    if "tool_mask" in out:
        mask = mask * out["tool_mask"]
    b = completion_ids.size(0)

    rpf = trainer._rlx_rewards_per_func  # (N_all_ranks, n_funcs), gathered by GRPO
    w = trainer.reward_weights.to(rpf.device)
    scores_all = torch.nan_to_num((rpf * w.unsqueeze(0)).nansum(dim=1), nan=0.0)
    i0 = trainer.accelerator.process_index * b
    scores = scores_all[i0 : i0 + b].to(mask.device)

    with torch.no_grad():
        old_logps = out.get("old_per_token_logps")
        if old_logps is None:  # GRPO skips it when the rollout is used once; the KL needs it
            old_logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model,
                input_ids,
                attention_mask,
                c,
                batch_size=trainer.args.per_device_train_batch_size,
            )
        ref_logps = out.get("ref_per_token_logps")
        if ref_logps is not None:
            kl = kl_estimate(old_logps, ref_logps, kl_estimator) * mask
        else:
            kl = torch.zeros_like(mask)
    return KLShapedRollout(input_ids, attention_mask, mask, scores, old_logps, kl)


class ValueModel(nn.Module):
    """Critic V(s): a decoder backbone and a scalar head on its last hidden states.

    `forward(input_ids, attention_mask) -> (B, S)`: V at position j is the value of the state made of tokens <= j,
    i.e. the state in which token j+1 is chosen (aligned with the per-token log-probs).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, init_std: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.v_head = nn.Linear(hidden_size, 1)
        if init_std > 0:
            nn.init.normal_(self.v_head.weight, std=init_std)
        else:
            nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return self.v_head(h.to(self.v_head.weight.dtype)).squeeze(-1)


def build_value_model(policy: nn.Module | str, args: PPOConfig, **load_kwargs: Any) -> ValueModel:
    """The critic: a backbone from `args.value_model` (a directory) or a copy of the policy's, plus a fresh head.

    `load_kwargs` go to `AutoModel.from_pretrained` (dtype, attn_implementation, ...) when a path is loaded.
    """
    source = args.value_model or (policy if isinstance(policy, str) else None)
    if source is not None:
        from transformers import AutoModel

        kwargs = {**(args.model_init_kwargs or {}), **load_kwargs}
        backbone = AutoModel.from_pretrained(source, **kwargs)
        backbone = getattr(backbone, getattr(backbone, "base_model_prefix", ""), None) or backbone
    else:
        backbone = copy.deepcopy(backbone_of(unwrap_policy(policy)))
    hidden = backbone.config.hidden_size
    critic = ValueModel(backbone, hidden, args.value_head_init_std)
    return critic.to(next(backbone.parameters()).dtype)


class RLXPPOTrainer(RLXGRPOTrainer):
    """PPO on GRPO's machinery, with the rlx instrument seam (inherited from `RLXGRPOTrainer`).

    Same constructor as `RLXGRPOTrainer` (`model`, `reward_funcs`, `args`, ..., `instruments`, `run`) with
    `args` a `PPOConfig` and an optional prebuilt `value_model` (a `ValueModel`).
    """

    rlx_algo = "ppo"
    _tag_names = ["trl", "ppo", "rlx"]

    def __init__(
        self, model: Any, reward_funcs: Any = None, args: PPOConfig | None = None, value_model=None, **kwargs
    ):
        if not isinstance(args, PPOConfig):
            raise TypeError(f"PPO needs an rlx PPOConfig, got {type(args).__name__}")
        # Build the critic before GRPO wraps the policy (PEFT) so it copies the plain backbone.
        critic = value_model if value_model is not None else build_value_model(model, args)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        policy = unwrap_policy(self.model)
        policy.add_module(CRITIC_ATTR, critic.to(self.accelerator.device))
        for p in critic.parameters():
            p.requires_grad_(True)
        if args.disable_dropout:
            for m in critic.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        self.kl_ctl = (
            AdaptiveKLController(args.beta, args.kl_target, args.kl_horizon)
            if args.adaptive_kl
            else FixedKLController(args.beta)
        )

    # ---- helpers ---------------------------------------------------------------------------------------

    @staticmethod
    def critic_of(model: nn.Module) -> ValueModel:
        return getattr(unwrap_policy(model), CRITIC_ATTR)

    def _values(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, c: int
    ) -> torch.Tensor:
        """(B, C) critic values V(s_t) of the states that choose completion tokens."""
        with self.accelerator.autocast():
            v = self.critic_of(model)(input_ids, attention_mask)
        return v[:, -c - 1 : -1].float()

    def _global_moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return global_moments(self.accelerator, x, mask)

    # ---- rollout ---------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        args: PPOConfig = self.args
        rollout = kl_shaped_rollout(self, out, args.kl_estimator)
        mask, kl, old_logps = rollout.mask, rollout.kl, rollout.old_logps
        b, c = mask.shape

        with torch.no_grad():
            values = self._values(self.model, rollout.input_ids, rollout.attention_mask, c) * mask
            beta = self.kl_ctl.value
            rewards = token_level_rewards(rollout.scores, kl, mask, beta)
            advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)

            adv_mean, adv_var = self._global_moments(advantages, mask)
            if args.whiten_advantages:
                whitened = masked_whiten(advantages, mask, moments=(adv_mean, adv_var))
            else:
                whitened = advantages

            ret_mean, ret_var = self._global_moments(returns, mask)
            _, res_var = self._global_moments(returns - values, mask)
            val_mean, _ = self._global_moments(values, mask)
            seq_kl = self.accelerator.gather(kl.sum(1)).mean()
            n_global = b * self.accelerator.num_processes

        # of the rollout-time critic, from the variances over all ranks
        ev = explained_variance(values, returns, mask, variances=(res_var, ret_var))
        metrics = {
            "kl": seq_kl,
            "kl_coef": beta,
            "advantages/mean_raw": adv_mean,
            "advantages/std_raw": adv_var.sqrt(),
            "returns/mean": ret_mean,
            "values/mean": val_mean,
            "value/explained_variance": ev,
        }
        log_metrics(self, metrics, reduce="none", mode=mode)  # moments over every rank's tokens already
        if mode == "train":
            self.kl_ctl.update(seq_kl.item(), n_global)

        out["advantages"] = whitened
        out["old_per_token_logps"] = old_logps
        out["old_values"] = values
        out["returns"] = returns
        out["ppo_mask"] = mask
        return out

    # ---- loss ------------------------------------------------------------------------------------------

    def _loss_extras(self, inputs):
        return {
            "advantages": inputs["advantages"],  # (B, C) whitened GAE advantages the loss uses
            "old_logps": inputs["old_per_token_logps"],
            "ref_logps": inputs.get("ref_per_token_logps"),
            "group_ids": inputs.get("rlx_group_ids"),
            "sample_ids": inputs.get("rlx_sample_ids"),
            "rewards": inputs.get("rlx_rewards"),
            "completion_len": inputs["completion_ids"].size(1),
            "values": inputs["old_values"],
            "returns": inputs["returns"],
        }

    def _compute_loss(self, model, inputs):
        return self._instrumented(bind(self._ppo_loss, model, inputs), model, inputs)

    def _ppo_loss(self, model, inputs):
        """Clipped policy loss + vf_coef * clipped value loss, token-mean over the micro-batch, GA-scaled."""
        args: PPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        c = completion_ids.size(1)
        mask = inputs["ppo_mask"]

        logps, entropy, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, c, compute_entropy=True
        )
        values = self._values(model, input_ids, attention_mask, c)
        pg = clipped_policy_loss(
            logps,
            inputs["old_per_token_logps"],
            inputs["advantages"],
            self.epsilon_low,
            self.epsilon_high,
            args.dual_clip,
        )
        vf, vf_clipped = clipped_value_loss(
            values, inputs["old_values"], inputs["returns"], args.cliprange_value
        )
        pg_tok = pg.loss
        if "importance_sampling_ratio" in inputs:
            # vLLM rollouts: TRL's correction for vLLM's sampling probabilities differing from the trainer's
            # (token (B, C) or sequence (B, 1) ratios, truncated or masked per vllm_importance_sampling_mode)
            pg_tok = pg_tok * inputs["importance_sampling_ratio"]
        pg_loss = masked_mean(pg_tok, mask)
        vf_loss = masked_mean(vf, mask)
        loss = pg_loss + args.vf_coef * vf_loss
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps

        with torch.no_grad():
            # approx KL(pi_old || pi_theta) with the k3 estimator on tokens sampled from pi_old
            approx_kl = kl_estimate(inputs["old_per_token_logps"], logps.detach(), "k3")
            stats = {
                "entropy": entropy.detach(),
                "clip_ratio/policy": pg.clipped,
                "clip_ratio/dual": pg.dual_clipped,
                "clip_ratio/value": vf_clipped,
                "approx_kl": approx_kl,
                "ratio/mean": pg.ratio.detach(),
            }
            metrics = {name: self._global_moments(x.float(), mask)[0] for name, x in stats.items()}
            totals = self.accelerator.reduce(
                torch.stack([pg_loss.detach(), vf_loss.detach()]), reduction="mean"
            )
            metrics["loss/policy"], metrics["loss/value"] = totals[0], totals[1]
            log_metrics(self, metrics, reduce="none", mode=mode)  # token means over every rank already

        return loss

    # ---- optimizer and checkpoints --------------------------------------------------------------------

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        lr_v = self.args.value_learning_rate
        if lr_v is None or lr_v == self.args.learning_rate:
            return optimizer
        critic_ids = {id(p) for p in self.critic_of(self.model).parameters()}
        new_groups = []
        for group in list(optimizer.param_groups):
            critic_params = [p for p in group["params"] if id(p) in critic_ids]
            if critic_params:
                group["params"] = [p for p in group["params"] if id(p) not in critic_ids]
                new_groups.append(
                    {**{k: v for k, v in group.items() if k != "params"}, "params": critic_params, "lr": lr_v}
                )
        for g in new_groups:
            optimizer.add_param_group(g)
        return optimizer

    def _clip_gradients(self, model):
        """Clip the policy's and the critic's gradients to `max_grad_norm` each (`grad_clip: separate`), or
        together (`joint`, the Trainer's clip). Logs both pre-clip norms; returns the pre-clip norm of both,
        which the Trainer logs as `grad_norm`.

        Called by InstrumentedMixin._clip_grad_norm after the instruments' `on_before_clip`.
        The gradients are complete here (accumulated and, under DDP, all-reduced), so local norms are global.
        DeepSpeed (the engine clips), FSDP and XLA (sharded gradients) and mixed-mesh DTensor gradients keep
        the Trainer's joint clip."""
        from accelerate.utils import DistributedType

        dt = self.accelerator.distributed_type
        if dt == DistributedType.DEEPSPEED or dt == DistributedType.FSDP or dt == DistributedType.XLA:
            return super()._clip_gradients(model)
        if self._has_mixed_mesh_grads(model):
            return super()._clip_gradients(model)
        critic_ids = {id(p) for p in self.critic_of(model).parameters()}
        params = [p for p in model.parameters() if p.grad is not None]
        policy = [p for p in params if id(p) not in critic_ids]
        critic = [p for p in params if id(p) in critic_ids]
        if self.args.grad_clip == "joint":
            with torch.no_grad():
                n_pi = torch.nn.utils.get_total_norm([p.grad for p in policy])
                n_v = torch.nn.utils.get_total_norm([p.grad for p in critic])
            total = super()._clip_gradients(model)
        else:
            self.accelerator.unscale_gradients()  # fp16 AMP; a no-op otherwise (once, for both groups)
            max_norm = self.args.max_grad_norm
            n_pi = torch.nn.utils.clip_grad_norm_(policy, max_norm)
            n_v = torch.nn.utils.clip_grad_norm_(critic, max_norm)
            total = torch.sqrt(n_pi.float() ** 2 + n_v.float() ** 2)
        # the gradients are all-reduced here, so the norms are global
        log_metrics(self, {"grad_norm/policy": n_pi, "grad_norm/value": n_v}, reduce="none", mode="train")
        return total

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the policy without the critic (a clean HF checkpoint) and the critic in `output_dir/critic`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        policy = unwrap_policy(self.model)
        critic = policy._modules.pop(CRITIC_ATTR, None)
        prefix = None
        critic_state = None
        if state_dict is not None:
            prefix = next((k.split(CRITIC_ATTR + ".")[0] for k in state_dict if CRITIC_ATTR + "." in k), None)
            if prefix is not None:
                head = prefix + CRITIC_ATTR + "."
                critic_state = {k[len(head) :]: v for k, v in state_dict.items() if k.startswith(head)}
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head)}
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            if critic is not None:
                policy.add_module(CRITIC_ATTR, critic)
        if self.args.should_save and critic is not None:
            import safetensors.torch

            os.makedirs(os.path.join(output_dir, "critic"), exist_ok=True)
            sd = critic_state if critic_state is not None else critic.state_dict()
            sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
            safetensors.torch.save_file(sd, os.path.join(output_dir, "critic", "model.safetensors"))

    # ---- exact resume ---------------------------------------------------------------------------------

    def _rlx_trainer_state(self):
        return {**super()._rlx_trainer_state(), "kl_coef": self.kl_ctl.value}

    def _rlx_load_trainer_state(self, state):
        super()._rlx_load_trainer_state(state)
        self.kl_ctl.value = float(state["kl_coef"])

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Load the policy as HF does (the checkpoint's policy has no critic keys), then the critic from `critic/`."""
        policy = unwrap_policy(self.model)
        critic = policy._modules.pop(CRITIC_ATTR, None)
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            if critic is not None:
                policy.add_module(CRITIC_ATTR, critic)
        path = os.path.join(resume_from_checkpoint, "critic", "model.safetensors")
        if critic is not None:
            import safetensors.torch

            if not os.path.isfile(path):
                raise UserError(
                    f"{resume_from_checkpoint} has no critic ({path}); it is not a PPO checkpoint of this run."
                )

            critic.load_state_dict(
                safetensors.torch.load_file(path, device=str(next(critic.parameters()).device))
            )


def build_ppo_trainer(cfg: Any, run: Any, model_dir: str, task: Any, common: dict[str, Any]) -> RLXPPOTrainer:
    """`algo: ppo`: policy, critic, reference (by GRPO), data, rewards."""
    from rlx.models import _DTYPES, load_causal_lm, outside_zero3_init
    from rlx.trainers.construction import grpo_needs_reference, make_trainer_config, rollout_prompts
    from rlx.trainers.grpo import preloaded_reference

    args = make_trainer_config(cfg, run, task)
    # Policy, reference and critic all take model.* and load whole (also under ZeRO-3, which partitions them
    # when the trainer prepares them); the critic is a copy of the policy's backbone unless value_model is set.
    policy = load_causal_lm(model_dir, cfg)
    ref = load_causal_lm(model_dir, cfg) if grpo_needs_reference(cfg) else None
    load_kwargs: dict[str, Any] = {
        "dtype": _DTYPES.get(cfg.model.dtype, "auto"),
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.model.attn_implementation:
        load_kwargs["attn_implementation"] = cfg.model.attn_implementation
    with outside_zero3_init():
        critic = build_value_model(policy, args, **load_kwargs)
    with preloaded_reference(ref):
        return RLXPPOTrainer(
            model=policy,
            reward_funcs=task.reward_funcs,
            args=args,
            train_dataset=rollout_prompts(cfg, task, common["processing_class"], policy, args),
            value_model=critic,
            **common,
        )
