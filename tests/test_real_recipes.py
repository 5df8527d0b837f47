"""The GPU recipes' loading code, exercised on CPU with a local HF-format Qwen3 directory and local data files
shaped like the real ones (GSM8K jsonl, UltraFeedback-binarized parquet)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import read_metrics

CPU = [
    "model.dtype=float32",
    "trainer.bf16=false",
    "trainer.gradient_checkpointing=false",
    "trainer.max_steps=2",
    "trainer.gradient_accumulation_steps=1",
    "trainer.save_strategy=no",
    "trainer.report_to=[]",
]


@pytest.fixture(scope="module")
def local_qwen3(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rlx.embedded import build_tokenizer

    d = tmp_path_factory.mktemp("qwen3_local")
    tok = build_tokenizer()
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        head_dim=16,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gsm8k_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gsm8k")
    rows = [
        {
            "question": f"Tom has {a} apples and buys {b} more. How many?",
            "answer": f"{a}+{b}={a + b}\n#### {a + b}",
        }
        for a, b in [(3, 4), (10, 5), (7, 8), (1, 1), (12, 30), (2, 9), (6, 6), (4, 40)]
    ]
    for split in ("train", "test"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


@pytest.fixture(scope="module")
def ultrafeedback_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("uf")
    rows = []
    for i in range(8):
        q = f"Say something nice number {i}."
        rows.append(
            {
                "prompt": q,
                "chosen": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"You are great {i}!"},
                ],
                "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "no"}],
                "score_chosen": 8.0,
                "score_rejected": 2.0,
            }
        )
    path = d / "train_prefs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.slow
def test_grpo_qwen3_gsm8k_loads_local_model_and_data(run_recipe, local_qwen3, gsm8k_files):
    run = run_recipe(
        "grpo_qwen3_gsm8k",
        *CPU,
        "trainer.use_vllm=false",  # the GPU recipe generates with vLLM; HF generate here
        f"model.name_or_path={local_qwen3}",
        f"task.dataset={gsm8k_files / 'train.jsonl'}",
        f"task.eval_dataset={gsm8k_files / 'test.jsonl'}",
        "task.max_eval_samples=4",
        "eval.max_new_tokens=8",
        "trainer.per_device_train_batch_size=4",
        "trainer.num_generations=4",
        "trainer.max_completion_length=8",
    )
    rows = [r for r in read_metrics(run) if "reward" in r]
    assert len(rows) == 2 and all(0.0 <= r["reward"] <= 1.0 for r in rows)
    info = json.loads((run / "run_info.json").read_text())
    assert info["base_model"] == str(local_qwen3) and info["global_step"] == 2
    assert (run / "final" / "config.json").exists()


@pytest.mark.slow
def test_grpo_qwen3_4b_lora_recipe_trains_adapters_on_every_projection(run_recipe, local_qwen3, gsm8k_files):
    """The 4B LoRA recipe as written (rank 64 on attention and MLP projections), on the tiny local Qwen3."""
    from safetensors.torch import load_file

    run = run_recipe(
        "grpo_qwen3_4b_lora",
        *CPU,
        "trainer.use_vllm=false",
        f"model.name_or_path={local_qwen3}",
        f"task.dataset={gsm8k_files / 'train.jsonl'}",
        f"task.eval_dataset={gsm8k_files / 'test.jsonl'}",
        "task.max_eval_samples=4",
        "eval.max_new_tokens=8",
        "trainer.per_device_train_batch_size=4",
        "trainer.num_generations=4",
        "trainer.steps_per_generation=1",
        "trainer.max_completion_length=8",
    )
    assert len([r for r in read_metrics(run) if "reward" in r]) == 2
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 128
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(adapter["target_modules"]) == projections
    weights = load_file(str(run / "final" / "adapter_model.safetensors"))
    # one A and one B per projection per layer (2 layers), nothing else: the base weights are not saved
    assert len(weights) == 2 * len(projections) * 2 and all(".lora_" in k for k in weights)
    assert not (run / "final" / "model.safetensors").exists()
    cfg = (run / "config.yaml").read_text()
    assert "learning_rate: 1.0e-05" in cfg and "name_or_path: " + str(local_qwen3) in cfg


@pytest.mark.slow
def test_dpo_qwen3_ultrafeedback_loads_local_model_and_parquet(run_recipe, local_qwen3, ultrafeedback_file):
    run = run_recipe(
        "dpo_qwen3_ultrafeedback",
        *CPU,
        f"model.name_or_path={local_qwen3}",
        f"task.dataset={ultrafeedback_file}",
        f"task.eval_dataset={ultrafeedback_file}",
        "trainer.per_device_train_batch_size=4",
        "trainer.max_length=64",
    )
    rows = [r for r in read_metrics(run) if "rewards/accuracies" in r]
    assert len(rows) == 2 and all(0.0 <= r["rewards/accuracies"] <= 1.0 for r in rows)


def test_missing_local_dataset_is_a_user_error(tmp_path):
    from rlx.config.schema import TaskConfig
    from rlx.errors import UserError
    from rlx.tasks import get_task

    task = get_task(TaskConfig(name="gsm8k", dataset=str(tmp_path / "nope.jsonl")))
    with pytest.raises(UserError, match="cannot load dataset"):
        task.train_dataset()
