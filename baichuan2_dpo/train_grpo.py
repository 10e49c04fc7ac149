"""Reinforcement learning with verifiable rewards: GRPO (TRL's GRPOTrainer) on items with gold answers.

    python baichuan2_dpo/prepare_data.py                                          # built-in items
    python baichuan2_dpo/train_grpo.py baichuan2_dpo/configs/grpo_default.yaml    # from model_baichuan's SFT model
    python baichuan2_dpo/train_grpo.py ... --rewards my_rewards:short_and_right format --reward_weights 1 0.5
    python baichuan2_dpo/train_grpo.py ... --finetuning_type lora --beta 0.04

For each prompt the policy samples a group of `num_generations` replies; every reply is scored
by the reward functions (common/rewards.py: `task` = sentiment exact match /
segmentation word F1 against the gold answer, `format` = the reply has the task's form and
stopped; or your own `module:function`), the weighted sum is compared with the group's mean
(GRPO's advantage: better than its siblings or worse), and the policy's log-probabilities move
accordingly, clipped as in PPO, with a KL penalty (`beta`) to the starting model.

Model: a local chat model or an SFT LoRA adapter (merged into its base first), as train.py.
`full` tunes every weight (the reference for the KL term is a frozen copy of the start model;
when the start was an adapter, the merged start is saved to `<output_dir>/start_model` so TRL
loads exactly it); `lora` adds an adapter and the reference is the adapter switched off.
Prompts are rendered with the chat template the model was tuned with (set as the tokenizer's
Jinja template, which TRL applies), replies end at the template's end markers.

Data: `train.jsonl` rows with `prompt` (text or messages) and `answer` (the gold answer handed
to the rewards), e.g. prepare_data.py's built-in items; `test.jsonl` items with `task` are
scored greedily before and after (sentiment accuracy, segmentation F1, items better / worse and
the sign test), as train.py does. metrics.json holds those scores and the logged reward and KL
curves; rewards.png plots them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer

from common import rewards as builtin_rewards
from common.config import parse_args
from common.errors import UserError, cli_main
from common.instructions import quick_cpu_sampling
from common.serving.loading import adapter_base
from common.sft_train import (
    ScoredDataArguments,
    StartModelArguments,
    count_parameters,
    evaluate_tasks,
    load_start_model,
    lora_config,
    read_jsonl,
    refuse_data_parallel,
    scored_test_items,
    start_vs_tuned,
    weights_dtype,
)
from common.templates import (
    ensure_template_tokens,
    get_template,
    resolve_template,
    save_chat_template,
    stop_criteria,
)
from common.tokenizer import display_cleaner

PREPARE = "python baichuan2_dpo/prepare_data.py"


# ----------------------------------------------------------------------------- arguments
@dataclass
class DataArguments(ScoredDataArguments):
    """data_dir: train.jsonl rows with `prompt` and a gold `answer`, test.jsonl scored items
    (common/sft_train.py); every test item is scored by default."""
    eval_samples: int = field(default=0, metadata={"help": "Test items scored before and after (0 = all, -1 = "
                                                   "skip)."})
    train_tasks: list[str] | None = field(default=None, metadata={
        "help": "Train on the rows of these tasks only (e.g. sentiment: replies of a few tokens, so many more "
                "prompts per minute); every test item is still scored. Default: all rows."})


@dataclass
class ModelArguments(StartModelArguments):
    """model_name_or_path, template, finetuning_type, lora_* (common/sft_train.py), and the rewards."""
    finetuning_type: str = field(default="full", metadata={"help": "full (reference = a frozen copy) or lora "
                                                           "(reference = adapter off)."})
    rewards: list[str] = field(default_factory=lambda: ["task", "format"], metadata={
        "help": "Reward functions: task, format (common/rewards.py) or module:function of yours, scoring "
                "(prompt, completion, gold) -> float; weights in --reward_weights."})


@dataclass
class GRPOArguments(GRPOConfig):
    output_dir: str = field(default="outputs/baichuan2_grpo", metadata={"help": "Where the model and metrics go."})
    num_generations: int = 8
    max_completion_length: int = 64
    per_device_train_batch_size: int = 32  # replies per step: 4 prompts x 8 samples
    temperature: float = 1.0
    beta: float = 0.04  # KL to the starting model
    learning_rate: float = 1e-5
    bf16: bool = False  # TRL defaults to True, which a CPU refuses; the GPU configs set it
    # TRL defaults to True; the built-in tiny model pays 16% of a CPU step for it and saves nothing
    gradient_checkpointing: bool = False
    save_strategy: str = "no"
    lr_scheduler_type: str = "constant"
    report_to: str = "none"
    logging_steps: int = 10


# ------------------------------------------------------------------------------ rewards
def load_reward(name: str):
    """A built-in reward (common/rewards.py) or `module:function` from the Python path / the working folder."""
    if name in builtin_rewards.BUILTIN:
        return builtin_rewards.BUILTIN[name]
    module_name, _, function = name.partition(":")
    if not function:
        raise UserError(f"reward {name!r}: give a built-in one ({', '.join(builtin_rewards.BUILTIN)}) or "
                        "module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as err:
        raise UserError(f"reward {name!r} not found: {err}") from err
    parameters = inspect.signature(fn).parameters
    if len([p for p in parameters.values() if p.default is inspect.Parameter.empty]) != 3:
        raise UserError(f"reward {name!r} must take (prompt, completion, gold) [and stopped=...], "
                        f"it takes ({', '.join(parameters)})")
    return fn


def for_trl(fn, tokenizer, stop_ids: list[int]):
    """A (prompt, completion, gold) reward as TRL calls rewards: lists of a batch's prompts
    (messages), completions (messages) and their token ids, and the dataset's columns."""
    clean = display_cleaner(tokenizer)  # a Chinese WordPiece decode puts spaces between characters
    wants_stopped = "stopped" in inspect.signature(fn).parameters

    def reward(prompts, completions, completion_ids, answer, **_):
        scores = []
        for prompt, completion, ids, gold in zip(prompts, completions, completion_ids, answer):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            extra = {"stopped": bool(ids) and ids[-1] in stop_ids} if wants_stopped else {}
            scores.append(float(fn(question, clean(text).strip(), gold, **extra)))
        return scores

    reward.__name__ = fn.__name__  # TRL logs each reward under its function's name
    return reward


# -------------------------------------------------------------------------------- data
def prompt_rows(rows: list[dict], path: Path) -> Dataset:
    """TRL's conversational prompts (message lists ending with the user's turn) and gold answers."""
    prompts, answers = [], []
    for line, row in enumerate(rows, 1):
        if "prompt" not in row or not row.get("answer"):
            raise UserError(f"{path}:{line}: GRPO needs a `prompt` and a gold `answer` per row (the built-in items "
                            f"of {PREPARE} have them; preference pairs without a gold answer do not)")
        prompt = row["prompt"]
        prompts.append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
        answers.append(row["answer"])
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def curves(log_history: list[dict]) -> dict:
    """The logged reward (total and per function), its spread within groups, and the KL, by step."""
    keys = sorted({k for h in log_history for k in h if k == "kl" or k.startswith("reward")})
    return {k: [[h["step"], h[k]] for h in log_history if k in h] for k in keys}


def plot(series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [k for k in series if k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in rewards:
        axes[0].plot(*zip(*series[key]), label=key)
    axes[0].set(xlabel="step", ylabel="mean reward of the sampled replies", title="reward")
    axes[0].legend(fontsize=8)
    if "kl" in series:
        axes[1].plot(*zip(*series["kl"]), color="tab:red")
    axes[1].set(xlabel="step", ylabel="KL(policy || start)", title="KL to the starting model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ speed
def score_only_replies_on_cpu() -> None:
    """TRL 1.16 computes the policy's and the reference's log-probabilities through a chunked LM
    head; on CUDA it scores only the reply tokens, elsewhere every position, the prompt's too (its
    kernels avoid changing tile shapes, which matters on compiled back ends, not for eager CPU
    code). With 3-token sentiment replies after 80-token prompts that is 27x the positions: 4.4 s
    of a 64-reply step instead of 0.7 s on 2 CPU cores. Scoring the reply positions only gives the
    same numbers (tests/test_baichuan2_dpo.py); the kernels themselves are left as they are."""
    import trl.trainer.utils as trl_utils

    triton_path = getattr(trl_utils, "_use_triton", None)
    if triton_path is None or getattr(triton_path, "replies_only", False):
        return  # another TRL version, or done already

    def compact(device):
        return device.type == "cpu" or triton_path(device)

    compact.replies_only = True
    trl_utils._use_triton = compact


# ------------------------------------------------------------------------------- main
@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, args = parse_args([DataArguments, ModelArguments, GRPOArguments], argv,
                                             description=__doc__)
    start = time.time()
    set_seed(args.seed)
    if model_args.finetuning_type not in ("lora", "full"):
        raise UserError(f"--finetuning_type must be lora or full, got {model_args.finetuning_type}")
    reward_fns = [load_reward(name) for name in model_args.rewards]
    if args.reward_weights is not None and len(args.reward_weights) != len(reward_fns):
        raise UserError(f"{len(args.reward_weights)} reward_weights for {len(reward_fns)} rewards")
    refuse_data_parallel(args)
    data_dir = Path(data_args.data_dir)
    train_rows = read_jsonl(data_dir / "train.jsonl", PREPARE)
    if data_args.train_tasks:
        train_rows = [row for row in train_rows if row.get("task") in data_args.train_tasks]
        if not train_rows:
            raise UserError(f"no training row has a task in {data_args.train_tasks}")
    train_rows = train_rows[:data_args.train_samples or None]
    train_dataset = prompt_rows(train_rows, data_dir / "train.jsonl")
    test_items = scored_test_items(data_args, PREPARE)

    model, tokenizer = load_start_model(model_args.model_name_or_path, weights_dtype(model_args.finetuning_type, args))
    template = resolve_template(model_args.template, tokenizer, model_args.model_name_or_path) or get_template("baichuan2")
    if ensure_template_tokens(tokenizer, template):
        raise UserError(f"the model's vocabulary lacks the {template.name} template's markers: start GRPO from a "
                        "model tuned with that template (SFT first)")
    tokenizer.chat_template = template.jinja()  # what TRL renders prompts with: the template SFT trained
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids into generate()
    stop_ids, _ = stop_criteria(tokenizer, template)
    model.generation_config.eos_token_id = stop_ids  # sampling ends where the template's reply ends
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(args.output_dir)
    if model_args.finetuning_type == "full" and args.beta and adapter_base(model_args.model_name_or_path):
        # TRL builds the KL reference from the path in the policy's config, which for a merged SFT
        # adapter is the base without it: put the merged start model on disk and point there
        model.save_pretrained(out / "start_model")
        model.config._name_or_path = str(out / "start_model")
    model.to(args.device)
    score_only_replies_on_cpu()
    start_scores, start_replies = evaluate_tasks(model, tokenizer, template, test_items, data_args,
                                                 "scoring the starting model")
    peft_config = lora_config(model, model_args) if model_args.finetuning_type == "lora" else None
    trainer = GRPOTrainer(model=model, reward_funcs=[for_trl(fn, tokenizer, stop_ids) for fn in reward_fns],
                          args=args, train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config)
    parameters = count_parameters(trainer.model)
    with quick_cpu_sampling():  # a third of a CPU step was torch's multinomial
        result = trainer.train()
    tuned = trainer.model.merge_and_unload() if peft_config is not None else trainer.model
    if trainer.is_world_process_zero():
        tuned.save_pretrained(out)  # one plain model (a LoRA run merged), served as it is
        save_chat_template(out, tokenizer, template)
    else:
        return {}
    tuned_scores, tuned_replies = evaluate_tasks(tuned, tokenizer, template, test_items, data_args,
                                                 "scoring the tuned model")
    series = curves(trainer.state.log_history)
    if series.get("reward"):
        plot(series, out / "rewards.png")
    metrics = {
        "template": template.name, "finetuning_type": model_args.finetuning_type,
        "start_model": str(model_args.model_name_or_path), "rewards": model_args.rewards,
        "reward_weights": args.reward_weights, "beta": args.beta, "num_generations": args.num_generations,
        "parameters": parameters, "train_prompts": len(train_dataset),
        "train": {"steps": trainer.state.global_step, "runtime_s": round(result.metrics["train_runtime"], 1),
                  "first_logged_reward": series["reward"][0][1] if series.get("reward") else None,
                  "last_logged_reward": series["reward"][-1][1] if series.get("reward") else None},
        "curves": series,
        **start_vs_tuned(test_items, (start_scores, start_replies), (tuned_scores, tuned_replies)),
        "runtime_s": round(time.time() - start, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if series.get("reward"):
        print(f"mean reward of the sampled replies: {metrics['train']['first_logged_reward']:.3f} (first logged) -> "
              f"{metrics['train']['last_logged_reward']:.3f} (last)")
    print(f"model, tokenizer, metrics.json and rewards.png in {out}")
    return metrics


if __name__ == "__main__":
    main()
