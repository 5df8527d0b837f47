"""Let accelerate run FSDP on CPU processes (test-only): `install()` before anything builds an Accelerator.

accelerate 1.15 applies an FSDP config only to multi-GPU/NPU/XPU/HPU launches; with no GPU it silently falls
back to DDP over gloo (`AcceleratorState.__init__` switches `distributed_type` to FSDP only from those types).
torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo, so for the test the state is switched to FSDP after
accelerate's own checks, with the plugin built from the launcher's FSDP_* environment exactly as on GPUs.
Each run then checks, before saving its final model, that the policy really is sharded (FSDP2 modules, DTensor
parameters of which each rank holds a part) and prints one `[fsdp]` line on rank 0.
"""

from __future__ import annotations

import os


def install() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if wants_fsdp and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if getattr(self, "fsdp_plugin", None) is None:
                self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    state.AcceleratorState.__init__ = init

    import rlx.train

    save_final = rlx.train._save_final

    def checked_save_final(trainer, tokenizer, run_dir):
        from torch.distributed.fsdp import FSDPModule

        model = trainer.model_wrapped
        modules = sum(isinstance(m, FSDPModule) for m in model.modules())
        params = list(model.parameters())
        sharded = [p for p in params if hasattr(p, "to_local") and p.to_local().numel() < p.numel()]
        assert modules > 0 and sharded, f"not sharded by FSDP2: {type(model).__name__}"
        if trainer.accelerator.is_main_process:
            print(
                f"[fsdp] {modules} FSDP2 modules, {len(sharded)}/{len(params)} parameters sharded", flush=True
            )
        return save_final(trainer, tokenizer, run_dir)

    rlx.train._save_final = checked_save_final
