"""Train premoe's bundled demo model: a small char-level Qwen3-MoE on the synthetic task suite.

This script is the exact recipe of the weights in ``premoe/demo/model``. It builds a stock
``Qwen3MoeForCausalLM`` from a ``Qwen3MoeConfig`` (no custom code), trains it on the train split
of `premoe.demo.tasks` (loss on the answer and the end-of-sequence token, plus the router's
load-balancing loss), then saves it in bfloat16 with its tokenizer and generation config and
writes a model card with the greedy exact-match accuracy of the saved weights on the eval split
and the command that made them.

    python examples/train_demo.py --out premoe/demo/model            # CPU, the bundled weights
    python examples/train_demo.py --device cuda --out /tmp/demo      # same recipe on a GPU

Training is seeded and deterministic for a given device and thread count; a GPU (or another
CPU) gives different, equally good weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

from premoe.demo import tasks as demo_tasks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("premoe/demo/model"), help="output folder")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=160, help="sequences per step (all tasks)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=32)
    p.add_argument(
        "--dense-first", type=int, default=0, help="first N layers use a dense MLP instead of MoE"
    )
    p.add_argument(
        "--experts-implementation",
        default="grouped_mm",
        help="transformers expert kernel used for training (not saved): grouped_mm or eager",
    )
    p.add_argument("--eval-every", type=int, default=1000, help="0: only at the end")
    p.add_argument("--n-eval", type=int, default=500, help="eval prompts per task at the end")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace, tokenizer) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,  # dense MLP size; unused, every layer is MoE
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(args.dense_first)),
        moe_intermediate_size=args.moe_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        # Asked for in every training forward; False in the saved config, since transformers'
        # generate() with a cache cannot compute the load-balancing loss.
        output_router_logits=False,
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_batch(rows: list[dict[str, str]], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded ``<bos> prompt answer <eos>``; labels only on answer and ``<eos>``."""
    seqs, labels = [], []
    for row in rows:
        prompt = tokenizer.convert_tokens_to_ids(list(row["prompt"]))
        answer = tokenizer.convert_tokens_to_ids(list(row["answer"])) + [tokenizer.eos_token_id]
        seqs.append([tokenizer.bos_token_id, *prompt, *answer])
        labels.append([-100] * (1 + len(prompt)) + answer)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def evaluate(model, tokenizer, eval_sets: dict[str, list[dict[str, str]]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    acc = {t: demo_tasks.accuracy(model, tokenizer, rows) for t, rows in eval_sets.items()}
    model.train(was_training)
    return acc


def model_card(
    args: argparse.Namespace,
    config: Qwen3MoeConfig,
    n_params: int,
    acc: dict[str, float],
    n_eval: int,
    wall_s: float,
    final_loss: float,
    command: str,
) -> str:
    cells = {t: demo_tasks.TASKS[t].description.replace("|", "\\|") for t in acc}
    rows = "\n".join(f"| `{t}` | {cells[t]} | {acc[t]:.1%} |" for t in acc)
    return f"""---
library_name: transformers
license: apache-2.0
pipeline_tag: text-generation
tags: [premoe, mixture-of-experts, qwen3_moe, synthetic, char-level]
---

# premoe demo model

A tiny character-level Mixture-of-Experts language model, bundled with premoe so that its
whole pipeline (profile, plan, route, export, serve, eval) runs on a laptop CPU with no download.
It is a stock `Qwen3MoeForCausalLM` (no custom code) trained from scratch on five synthetic tasks
whose prompts use different character sets, so that its experts specialise by task.

- Architecture: `qwen3_moe`, {config.num_hidden_layers} layers, hidden {config.hidden_size},
  {config.num_attention_heads} attention heads ({config.num_key_value_heads} key/value heads),
  **{config.num_experts} experts per layer, top-{config.num_experts_per_tok} routing**
  (softmax then top-k, `norm_topk_prob=True`), expert size {config.moe_intermediate_size},
  vocabulary {config.vocab_size} (one token per character, `<pad> <bos> <eos> <unk>`).
- Parameters: {n_params:,} ({n_params / 1e6:.2f} M); weights stored in bfloat16.
- Tokenizer: `tokenizers` WordLevel over single characters wrapped in `PreTrainedTokenizerFast`;
  `<bos>` is prepended automatically; left padding for batched generation.

## Tasks and accuracy

Greedy exact match of these bfloat16 weights on {n_eval} held-out eval prompts per task
(`premoe.demo.tasks.generate(task, {n_eval}, seed=0, split="eval")`):

| task | what it asks | accuracy |
|---|---|---|
{rows}

Prompts are split by a hash of the prompt (80 % train, 10 % profile, 10 % eval), so the eval
prompts never occur in training or profiling data.

## How it was made

```
{command}
```

{args.steps} steps of AdamW (lr {args.lr}, {args.warmup} warm-up steps then cosine decay to 10 %,
weight decay {args.weight_decay}, gradient clipping 1.0), {args.batch_size} sequences per step
drawn equally from the five tasks' train split, seed {args.seed}, on `{args.device}`
({args.threads} CPU threads). Loss: cross-entropy on the answer and `<eos>` tokens plus
{args.aux_coef} x the router load-balancing loss (`output_router_logits=True`). Final training
loss {final_loss:.4f}; wall time {wall_s / 60:.1f} min (torch {torch.__version__}).

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from premoe.demo import MODEL_DIR

tok = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
ids = tok(["12+345=", "kqzb>"], return_tensors="pt", padding=True)
out = model.generate(**ids, max_new_tokens=9)
print(tok.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python " + shlex.join(["examples/train_demo.py", *(argv or sys.argv[1:])])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    tokenizer = demo_tasks.build_tokenizer()
    config = make_config(args, tokenizer)
    model = Qwen3MoeForCausalLM(config)
    model.set_experts_implementation(args.experts_implementation)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters; config: {config.to_json_string(use_diff=True)}", flush=True)

    names = demo_tasks.task_names()
    streams = {t: iter(demo_tasks.iter_examples(t, args.seed, "train")) for t in names}
    per_task = [args.batch_size // len(names)] * len(names)
    for i in range(args.batch_size - sum(per_task)):
        per_task[i] += 1
    quick_eval = {t: demo_tasks.generate(t, 100, args.seed, "eval") for t in names}

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    t0 = time.time()
    ema = None
    for step in range(args.steps):
        rows = [
            r for t, n in zip(names, per_task, strict=True) for r in itertools.islice(streams[t], n)
        ]
        batch = {k: v.to(device) for k, v in encode_batch(rows, tokenizer).items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(**batch, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = out.loss.item()
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if step % 50 == 0 or step == args.steps - 1:
            aux = out.aux_loss.item() if out.aux_loss is not None else float("nan")
            print(
                f"step {step:5d}  loss {loss:.4f}  ema {ema:.4f}  aux {aux:.3f}  "
                f"lr {lr_at(step):.2e}  {time.time() - t0:6.0f}s",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            acc = evaluate(model, tokenizer, quick_eval)
            print("  eval " + "  ".join(f"{t} {a:.2f}" for t, a in acc.items()), flush=True)
    wall_s = time.time() - t0

    model.eval()
    model = model.to(torch.bfloat16)
    eval_sets = {t: demo_tasks.generate(t, args.n_eval, 0, "eval") for t in names}
    acc = evaluate(model, tokenizer, eval_sets)
    print("final bf16 eval " + "  ".join(f"{t} {a:.3f}" for t, a in acc.items()), flush=True)

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    ).save_pretrained(out_dir)
    card = model_card(args, model.config, n_params, acc, args.n_eval, wall_s, ema or 0.0, command)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    (out_dir / "training_metrics.json").write_text(
        json.dumps({"eval_accuracy": acc, "n_eval": args.n_eval, "wall_s": wall_s}, indent=2)
    )
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    print(f"saved to {out_dir} ({size / 1e6:.2f} MB) in {wall_s / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
