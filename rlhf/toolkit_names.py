"""Names users bring from other toolkits (TRL's GRPOConfig and TrainingArguments, SB3, CleanRL),
and the one error that reports a recipe's unknown keys.

A name from elsewhere gets exactly one of three answers, never a knob that means something else:

- ``EQUIVALENT``: our key for the same setting ("did you mean lr?"). A TRL field of the same
  name and meaning needs no entry: it loads as it is (``SAME_NAME``, a test keeps the list).
- ``SENTENCE``: one sentence on how the setting differs here, naming our key where one comes close.
- ``NO_COUNTERPART``: nothing here corresponds; the error says so and suggests nothing.

A name in none of them (a typo) is matched against our keys and these names; a near match
(``difflib`` ratio >= ``CUTOFF``) becomes the hint, and a near match of a name from elsewhere
gives that name's answer. ``beta`` is not here: it is an old name of ours (rlhf/renamed_keys.py)
and loads as ``kl_coef``, with one line saying so.
"""
from __future__ import annotations

import difflib

CUTOFF = 0.8  # below it, a "did you mean" pointed at unrelated keys (logging_steps -> max_nonfinite_steps)

# TRL fields whose name and meaning are ours: they load as they are (tests/test_toolkit_names.py)
SAME_NAME = ("chat_template_kwargs", "disable_dropout", "gradient_checkpointing", "max_grad_norm", "min_p",
             "report_to", "run_name", "scale_rewards", "seed", "temperature", "top_k", "top_p",
             "warmup_steps", "weight_decay")

# family -> name elsewhere -> our key with the same meaning
EQUIVALENT: dict[str, dict[str, str]] = {
    "LMConfig": {
        # TRL GRPOConfig / TrainingArguments
        "learning_rate": "lr", "num_generations": "group_size", "epsilon": "clip_range",
        "epsilon_high": "clip_range_high", "num_iterations": "epochs", "max_completion_length": "max_new_tokens",
        "mask_truncated_completions": "mask_truncated", "hub_private_repo": "hub_private",
        "vllm_importance_sampling_cap": "tis_cap",
        # TRL PPOConfig, the GRPO trainer's argument, and TRL's scripts (ModelConfig, ScriptArguments)
        "cliprange": "clip_range", "cliprange_value": "clip_range_value", "num_ppo_epochs": "epochs",
        "num_mini_batches": "minibatches", "response_length": "max_new_tokens", "reward_funcs": "rewards",
        "model_name_or_path": "model", "model_revision": "revision", "lora_target_modules": "lora_targets",
        "dataset_name": "task", "dataset_config": "task_config", "dataset_train_split": "task_split",
        "dataset_test_split": "eval_split",
        # CleanRL
        "clip_coef": "clip_range", "num_minibatches": "minibatches",
    },
    "GymConfig": {
        # SB3 / rl-zoo
        "learning_rate": "lr", "total_timesteps": "total_steps", "n_epochs": "epochs",
        "clip_range_vf": "clip_range_value", "normalize_advantage": "norm_adv",
        "exploration_initial_eps": "eps_start", "exploration_final_eps": "eps_end",
        "exploration_fraction": "eps_fraction", "target_update_interval": "target_update",
        # CleanRL
        "env_id": "env", "num_envs": "n_envs", "num_steps": "n_steps", "update_epochs": "epochs",
        "num_minibatches": "minibatches", "clip_coef": "clip_range", "start_e": "eps_start",
        "end_e": "eps_end", "target_network_frequency": "target_update",
        # TRL
        "lam": "gae_lambda", "cliprange": "clip_range", "cliprange_value": "clip_range_value",
    },
}

_STEPS = "counts rollouts here, each followed by epochs x minibatches optimiser steps; TRL counts optimiser " \
         "steps (the same when epochs and minibatches are 1)"
_EVAL = "held-out prompts are scored after training, by rlhf eval RUN_DIR (eval_problems of them), not during it"

# family -> name elsewhere -> how it differs here (the rest of "unknown recipe key 'x': ...")
SENTENCE: dict[str, dict[str, str]] = {
    "LMConfig": {
        "num_train_epochs": "steps sets a run's length here (rollouts of prompts_per_step prompts each), and "
            "epochs is the update passes over each rollout (TRL's num_iterations), not passes over the dataset",
        "max_steps": f"steps: N {_STEPS}",
        "save_steps": f"save_every: N writes the adapter every N steps, which {_STEPS}",
        "gradient_accumulation_steps": "it follows from the rollout here, where an optimiser step accumulates the "
            "gradients of prompts_per_step x group_size / (processes x minibatches x micro_batch_size) "
            "micro-batches, normalised by its whole minibatch, so set micro_batch_size (TRL's "
            "per_device_train_batch_size) for memory, and prompts_per_step, group_size and minibatches for the "
            "completions per step (minibatches: N is not accumulation, it makes N optimiser steps per epoch)",
        "per_device_train_batch_size": "micro_batch_size: N is the completions one process runs per forward/"
            "backward (0: its whole minibatch); an optimiser step sees prompts_per_step x group_size / minibatches "
            "completions over all processes, TRL's per_device_train_batch_size x gradient_accumulation_steps x "
            "processes",
        "generation_batch_size": "a rollout here samples prompts_per_step x group_size completions; set "
            "prompts_per_step (distinct prompts) and group_size (completions per prompt)",
        "steps_per_generation": "minibatches: N splits each pass over a rollout into N optimiser steps on whole "
            "groups (prompts_per_step / N prompts each), as TRL reuses one generation for several steps",
        "reward_weights": "weights go with the reward names here, as rewards: [{name: weight}, ...]",
        "loss_type": "agg is how the loss is averaged here, with its own values (TRL's dapo and bnpo are "
            "token_mean, grpo is seq_mean, dr_grpo is constant); its other loss types have no counterpart",
        "use_bias_correction_kl": "kl_estimator: k3+ (the default in the loss) is TRL's bias-corrected k3, and "
            "kl_estimator: k3 the uncorrected one",
        "bf16": "dtype: bfloat16 loads the base model's weights in bf16 (LoRA, log-probs and the loss stay fp32)",
        "fp16": "dtype: float16 loads the base model's weights in fp16 and trains with a loss scaler (LoRA, "
            "log-probs and the loss stay fp32)",
        "torch_dtype": "dtype: float32 | bfloat16 | float16 | auto sets the base model's weights",
        "model_init_kwargs": "the model is loaded by model, revision and dtype here",
        "output_dir": "out_dir is the folder that holds run directories (each named run_name, by default the "
            "recipe's name and the time); TRL's output_dir is the run directory itself",
        "logging_steps": "every step writes a row to metrics.jsonl (and to the trackers of report_to): there "
            "is nothing to set",
        "log_completions": "log_completions_every: N writes sampled completions to completions.jsonl every N "
            "steps (0: never)",
        "hub_model_id": "push_to_hub: user/name names the Hub repo the adapter is uploaded to when the run ends",
        "resume_from_checkpoint": "resume a run with rlhf train --resume RUN_DIR",
        "lr_scheduler_type": "the learning rate rises linearly over warmup_steps and then stays constant; there "
            "is no other schedule",
        "warmup_ratio": "warmup_steps: N counts steps here (a linear warm-up, then constant)",
        "optim": "the optimiser is AdamW here (lr, weight_decay)",
        "generation_kwargs": "the sampling settings here are temperature, top_k, top_p, min_p and stop",
        "use_peft": "LoRA is on with lora_r >= 1 (lora_alpha, lora_dropout, lora_targets); lora_r: 0 trains "
            "every weight (what TRL does without use_peft)",
        "vllm_importance_sampling_correction": "tis: token | sequence | none | auto corrects the sampler/trainer "
            "mismatch by truncated importance sampling here, whatever the sampler (auto is token in bf16 and fp16)",
        "vllm_importance_sampling_mode": "tis: token or sequence truncates the weight at tis_cap (TRL's "
            "token_truncate, sequence_truncate); the masking modes have no counterpart",
        "eval_strategy": _EVAL, "eval_steps": _EVAL, "do_eval": _EVAL,
        "per_device_eval_batch_size": "eval_batch: N sets the prompts per greedy generation batch of rlhf eval",
    },
    "GymConfig": {
        "anneal_lr": "lr_schedule: linear decays lr to 0 over total_steps, as CleanRL's anneal_lr does",
        "normalize": "norm_obs and norm_reward are VecNormalize's two halves here",
        "policy_kwargs": "hidden, layers, activation and ortho_init set the networks here",
        "net_arch": "hidden (width) and layers (count) set the networks here",
        "policy_lr": "lr is the one learning rate of actor and critic here",
        "q_lr": "lr is the one learning rate of actor and critic here",
        "autotune": "sac tunes its entropy temperature when alpha is unset (alpha: null, the default); a "
            "number fixes it",
        "policy_frequency": "sac updates actor and critics together here, gradient_steps per update phase",
        "vf_clip_param": "clip_range_value is the value clipping epsilon here",
        "train_frequency": "train_freq: N counts steps of each env here, as SB3 does (CleanRL's train_frequency "
            "counts the steps of all envs together, the same with n_envs: 1)",
    },
}

# a value of a key we share that the toolkit writes another way: the sentence joins the type error
VALUE_NOTE: dict[str, dict[str, str]] = {
    "LMConfig": {"push_to_hub": "it takes the Hub repo here (push_to_hub: user/name), not true/false",
                 "scale_rewards": "TRL's true is group here, and false is none",
                 "warmup_steps": "it counts steps here (TRL's float in [0, 1) is a fraction of the run)",
                 "min_p": "0 turns it off here (TRL's null)"},
    "GymConfig": {"clip_range_value": "CleanRL's clip_vloss: true is clip_range_value: C, its clip_coef C",
                  "ent_coef": "sac tunes its entropy temperature when alpha is unset (alpha: null)"},
}

# TRL settings (GRPOConfig, TrainingArguments, ModelConfig, ScriptArguments) nothing here corresponds to:
# engines, distributed back ends, other losses, evaluation during training, quantisation, ...
NO_COUNTERPART: dict[str, frozenset] = {"LMConfig": frozenset((
    'accelerator_config', 'activation_checkpointing', 'activation_checkpointing_kwargs',
    'adam_beta1', 'adam_beta2', 'adam_epsilon', 'attn_implementation', 'auto_find_batch_size',
    'average_tokens_across_devices', 'batch_eval_metrics', 'bf16_full_eval',
    'bnb_4bit_quant_storage', 'bnb_4bit_quant_type', 'cache_implementation',
    'cast_lm_head_to_fp32', 'data_seed', 'dataloader_drop_last', 'dataloader_in_order',
    'dataloader_multiprocessing_context', 'dataloader_num_workers',
    'dataloader_persistent_workers', 'dataloader_pin_memory', 'dataloader_prefetch_factor',
    'dataset_streaming', 'ddp_backend', 'ddp_broadcast_buffers', 'ddp_bucket_cap_mb',
    'ddp_find_unused_parameters', 'ddp_static_graph', 'ddp_timeout', 'debug', 'deepspeed',
    'delta', 'disable_tqdm', 'do_predict', 'do_train', 'ds3_gather_for_generation',
    'enable_jit_checkpoint', 'entropy_coef', 'entropy_coef_delta', 'entropy_coef_max',
    'entropy_coef_min', 'entropy_target', 'eval_accumulation_steps', 'eval_delay',
    'eval_do_concat_batches', 'eval_on_start', 'eval_use_gather_object', 'fp16_full_eval',
    'fsdp', 'fsdp_config', 'full_determinism', 'gradient_checkpointing_kwargs',
    'greater_is_better', 'hub_always_push', 'hub_revision', 'hub_strategy', 'hub_token',
    'ignore_bias_buffers', 'ignore_data_skip', 'importance_sampling_level',
    'include_for_metrics', 'include_num_input_tokens_seen', 'label_names',
    'label_smoothing_factor', 'length_column_name', 'liger_kernel_config',
    'load_best_model_at_end', 'load_in_4bit', 'load_in_8bit', 'local_rank',
    'log_completions_hub_repo', 'log_level', 'log_level_replica', 'log_multimodal',
    'log_on_each_node', 'log_unique_prompts', 'logging_first_step', 'logging_nan_inf_filter',
    'logging_strategy', 'lora_modules_to_save', 'lora_target_parameters', 'lora_task_type',
    'lr_scheduler_kwargs', 'max_tool_calling_iterations', 'metric_for_best_model',
    'multi_objective_aggregation', 'neftune_noise_alpha', 'num_completions_to_print',
    'num_generations_eval', 'off_policy_mask_threshold', 'optim_args', 'optim_target_modules',
    'pad_to_multiple_of', 'parallelism_config', 'prediction_loss_only', 'project',
    'ref_model_mixup_alpha', 'ref_model_sync_steps', 'remove_unused_columns',
    'repetition_penalty', 'restore_callback_states_from_checkpoint', 'router_aux_loss_coef',
    'sapo_temperature_neg', 'sapo_temperature_pos', 'save_on_each_node', 'save_only_model',
    'save_strategy', 'save_total_limit', 'shuffle_dataset', 'skip_memory_metrics',
    'sync_ref_model', 'tf32', 'top_entropy_quantile', 'torch_compile', 'torch_compile_backend',
    'torch_compile_mode', 'torch_empty_cache_steps', 'trackio_bucket_id', 'trackio_space_id',
    'trackio_static_space_id', 'train_sampling_strategy',
    'transformers_continuous_batching_config', 'trust_remote_code', 'use_adaptive_entropy',
    'use_bnb_nested_quant', 'use_cache', 'use_cpu', 'use_dora', 'use_liger_kernel',
    'use_rslora', 'use_transformers_continuous_batching', 'use_transformers_paged', 'use_vllm',
    'vespo_k_neg', 'vespo_k_pos', 'vespo_lambda_neg', 'vespo_lambda_pos',
    'vllm_enable_sleep_mode', 'vllm_gpu_memory_utilization', 'vllm_group_port',
    'vllm_importance_sampling_clip_max',
    'vllm_importance_sampling_clip_min', 'vllm_max_model_length', 'vllm_mode', 'vllm_model_impl',
    'vllm_server_base_url', 'vllm_server_host', 'vllm_server_port', 'vllm_server_timeout',
    'vllm_structured_outputs_regex', 'vllm_tensor_parallel_size',
)), "GymConfig": frozenset()}


# an agent recipe is an LM recipe: other toolkits' names are answered the same way
for _table in (EQUIVALENT, SENTENCE, VALUE_NOTE, NO_COUNTERPART):
    _table["AgentConfig"] = _table["LMConfig"]


def answer(family: str, key: str, names) -> tuple[str, str | None]:
    """What an unknown recipe ``key`` of config ``family`` (whose keys are ``names``) is told:
    ("key", our key) | ("sentence", how it differs) | ("none", None): a setting with no
    counterpart | ("unknown", None): no name near it."""
    if key in EQUIVALENT.get(family, {}):
        return "key", EQUIVALENT[family][key]
    if key in SENTENCE.get(family, {}):
        return "sentence", SENTENCE[family][key]
    if key in NO_COUNTERPART.get(family, ()):
        return "none", None
    known = [*names, *EQUIVALENT.get(family, {}), *SENTENCE.get(family, {}), *NO_COUNTERPART.get(family, ())]
    near = difflib.get_close_matches(key, known, n=1, cutoff=CUTOFF)
    if not near:
        return "unknown", None
    return ("key", near[0]) if near[0] in names else answer(family, near[0], names)


def unknown_keys_message(family: str, keys: list[str], names: list[str]) -> str:
    """One sentence for every unknown key of a recipe, each with its answer (see ``answer``)."""
    answers = [(key, *answer(family, key, names)) for key in keys]
    tails = {"key": "; did you mean {}?", "sentence": ": {}", "none": " (a TRL setting with no counterpart here)",
             "unknown": ""}
    valid = f"; valid keys: {', '.join(names)}" if any(kind == "unknown" for _, kind, _ in answers) else ""
    if len(answers) == 1:
        key, kind, text = answers[0]
        return f"unknown recipe key {key!r}" + tails[kind].format(text) + valid
    parts = {"key": "did you mean {}?", "sentence": "{}", "none": "a TRL setting with no counterpart here",
             "unknown": "no key near it"}
    items = [f"{key!r} ({parts[kind].format(text)})" for key, kind, text in answers]
    return f"{len(items)} unknown recipe keys: {', '.join(items[:-1])} and {items[-1]}{valid}"


def value_note(family: str, key: str) -> str:
    """A sentence for a wrongly typed value of ``key`` that another toolkit writes that way, or ''."""
    note = VALUE_NOTE.get(family, {}).get(key)
    return f"; {note}" if note else ""
