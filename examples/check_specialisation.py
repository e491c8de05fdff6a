"""Check that the demo model's experts specialise by task.

For each task: measure per-layer expert usage (share of routed selections) on the task's profile
split, keep only the top-K experts of each layer, and measure greedy exact-match accuracy on the
eval split with (a) the task's own top-K, (b) random K experts per layer, (c) the top-K of all
tasks pooled. Dropped experts are removed by forcing their router logits to -inf, so the model
routes its top-k among the kept experts only.

    python examples/check_specialisation.py [--model premoe/demo/model] [--keep 8 16]
"""

from __future__ import annotations

import argparse
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from premoe.demo import MODEL_DIR
from premoe.demo import tasks as demo_tasks


def gates(model) -> list[torch.nn.Module]:
    """Router of every MoE layer (dense layers have none)."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def usage(model, tokenizer, rows: list[dict[str, str]]) -> torch.Tensor:
    """[layers, experts] share of routed selections on the rows' ``text`` (padding excluded)."""
    n_layers, n_exp = len(gates(model)), model.config.num_experts
    counts = torch.zeros(n_layers, n_exp)
    mask_box: dict[str, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, out):
            _, _, idx = out
            keep = mask_box["m"].reshape(-1).bool()
            sel = idx[keep].reshape(-1)
            counts[i] += torch.bincount(sel.cpu(), minlength=n_exp).float()

        return fn

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(gates(model))]
    try:
        for start in range(0, len(rows), 256):
            batch = tokenizer(
                [r["text"] for r in rows[start : start + 256]], return_tensors="pt", padding=True
            )
            mask_box["m"] = batch["attention_mask"]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return counts / counts.sum(dim=1, keepdim=True)


@contextmanager
def keep_only(model, keep: list[list[int]]):
    """Route only among ``keep[layer]`` experts: dropped experts' router logits set to -inf."""
    handles = []
    for gate, kept in zip(gates(model), keep, strict=True):
        mask = torch.full((model.config.num_experts,), float("-inf"))
        mask[kept] = 0.0

        def fn(module, args, out, mask=mask):
            logits = out[0] + mask.to(out[0].device, out[0].dtype)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            top_v, top_i = torch.topk(probs, module.top_k, dim=-1)
            if module.norm_topk_prob:
                top_v = top_v / top_v.sum(dim=-1, keepdim=True)
            return logits, top_v.to(out[0].dtype), top_i

        handles.append(gate.register_forward_hook(fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def top_k_sets(share: torch.Tensor, k: int) -> list[list[int]]:
    return [sorted(row.topk(k).indices.tolist()) for row in share]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--keep", type=int, nargs="+", help="default: a quarter and a half")
    p.add_argument("--n-profile", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--random-draws", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    names = demo_tasks.task_names()
    n_layers, n_exp = len(gates(model)), model.config.num_experts
    if not args.keep:
        args.keep = [n_exp // 4, n_exp // 2]
    profile = {t: demo_tasks.generate(t, args.n_profile, 0, "profile") for t in names}
    evals = {t: demo_tasks.generate(t, args.n_eval, 0, "eval") for t in names}
    shares = {t: usage(model, tokenizer, profile[t]) for t in names}
    pooled = torch.stack([shares[t] for t in names]).mean(0)

    for t in names:
        top = shares[t].sort(dim=1, descending=True).values
        cover = {k: f"{top[:, :k].sum(1).mean():.2f}" for k in args.keep}
        print(f"{t:8s} mean share covered by own top-K per layer: {cover}")

    header = f"{'task':8s} {'full':>6s}" + "".join(
        f" {'own' + str(k):>7s} {'rand' + str(k):>7s} {'pool' + str(k):>7s}" for k in args.keep
    )
    print(header)
    totals: dict[str, list[float]] = {}
    fulls: list[float] = []
    md = [
        "| task | all experts |"
        + "".join(f" own top-{k} | random {k} | pooled top-{k} |" for k in args.keep),
        "|---|---|" + "---|---|---|" * len(args.keep),
    ]
    for t in names:
        full = demo_tasks.accuracy(model, tokenizer, evals[t])
        fulls.append(full)
        line = f"{t:8s} {full:6.3f}"
        md_line = f"| `{t}` | {full:.1%} |"
        for k in args.keep:
            with keep_only(model, top_k_sets(shares[t], k)):
                own = demo_tasks.accuracy(model, tokenizer, evals[t])
            rnd = []
            for d in range(args.random_draws):
                rng = random.Random(f"{t}/{k}/{d}")
                with keep_only(
                    model, [sorted(rng.sample(range(n_exp), k)) for _ in range(n_layers)]
                ):
                    rnd.append(demo_tasks.accuracy(model, tokenizer, evals[t]))
            with keep_only(model, top_k_sets(pooled, k)):
                pool = demo_tasks.accuracy(model, tokenizer, evals[t])
            r = sum(rnd) / len(rnd)
            for key, v in ((f"own{k}", own), (f"rand{k}", r), (f"pool{k}", pool)):
                totals.setdefault(key, []).append(v)
            line += f" {own:7.3f} {r:7.3f} {pool:7.3f}"
            md_line += f" {own:.1%} | {r:.1%} | {pool:.1%} |"
        print(line, flush=True)
        md.append(md_line)
    print(
        f"{'mean':8s} {'':6s}"
        + "".join(
            f" {sum(totals[f'own{k}']) / len(names):7.3f}"
            f" {sum(totals[f'rand{k}']) / len(names):7.3f}"
            f" {sum(totals[f'pool{k}']) / len(names):7.3f}"
            for k in args.keep
        )
    )
    if args.markdown:
        md.append(
            f"| mean | {sum(fulls) / len(fulls):.1%} |"
            + "".join(
                f" {sum(totals[f'{kind}{k}']) / len(names):.1%} |"
                for k in args.keep
                for kind in ("own", "rand", "pool")
            )
        )
        print("\n" + "\n".join(md))
    print(f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
