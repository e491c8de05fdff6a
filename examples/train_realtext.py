"""Train a small char-level MoE on real local text: a harder evaluation model for pruning quality.

Five domains read from files every Debian/Ubuntu machine has (nothing is downloaded):

- ``python``: the Python standard library source (``/usr/lib/python3*/**/*.py``);
- ``c``: C headers (``/usr/include/**/*.h``);
- ``man``: manual pages in roff (``/usr/share/man/man1/*.gz``);
- ``perl``: Perl modules (``/usr/share/perl/**/*.pm``);
- ``doc``: package documentation prose (``/usr/share/doc/**/README*``, ``copyright``).

Files are split by a hash of their path (80 % train, 10 % profile, 10 % eval), so profiling and
evaluation text never comes from a file seen in training. Samples are windows of ``--window``
characters. The model is a stock ``Qwen3MoeForCausalLM`` (32 experts, top-4, 3 layers, hidden
96, 2.9 MB in bf16), trained for 500 steps with next-character cross-entropy plus the
load-balancing loss: 11 minutes on one thread of a 2-core machine shared with other jobs (load
about 10), a few minutes on an idle one. Eval bits per character of the saved weights: 2.2-2.9.

    python examples/train_realtext.py --out /tmp/premoe-realtext

writes the model (bf16, a few MB: keep it out of git), its tokenizer, and
``corpora/{domain}.profile.jsonl`` / ``corpora/{domain}.eval.jsonl`` (``text`` rows) next to it,
plus ``training.json`` (per-domain eval bits per character of the saved weights).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import random
import string
import time
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list(string.printable[:95]) + ["\n", "\t"]
DOMAINS: dict[str, list[str]] = {
    "python": ["/usr/lib/python3*/**/*.py"],
    "c": ["/usr/include/**/*.h"],
    "man": ["/usr/share/man/man1/*.gz"],
    "perl": ["/usr/share/perl/**/*.pm", "/usr/share/perl5/**/*.pm"],
    "doc": ["/usr/share/doc/**/README*", "/usr/share/doc/**/copyright"],
}
SPLITS = ("train", "profile", "eval")


def build_tokenizer(model_max_length: int = 512):  # noqa: ANN201
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def split_of(path: str) -> str:
    h = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % 10
    return "eval" if h == 0 else "profile" if h == 1 else "train"


def _read(path: Path, limit: int) -> str:
    try:
        raw = path.read_bytes()[: limit * 4]
        if path.suffix == ".gz":
            raw = gzip.decompress(path.read_bytes())[: limit * 4]
        text = raw.decode("utf-8", errors="ignore")
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    keep = set(CHARS)
    return "".join(c for c in text if c in keep)[:limit]


def domain_texts(domain: str, max_files: int, max_chars: int, seed: int) -> dict[str, list[str]]:
    """{split: [file text]} of a domain (files sorted, then a seeded sample of `max_files`)."""
    files: list[Path] = []
    for pattern in DOMAINS[domain]:
        root, _, rest = pattern.partition("/**/") if "/**/" in pattern else (None, "", "")
        if root is not None and rest:
            base = Path("/")
            for part in Path(root).parts[1:]:
                matches = sorted(base.glob(part))
                base = matches[-1] if matches else base / part
            files += sorted(p for p in base.rglob(rest) if p.is_file())
        else:
            parent = Path(pattern).parent
            files += sorted(p for p in parent.glob(Path(pattern).name) if p.is_file())
    rng = random.Random(f"{domain}/{seed}")
    rng.shuffle(files)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for p in files[:max_files]:
        text = _read(p, max_chars)
        if len(text) >= 200:
            out[split_of(str(p))].append(text)
    return out


def windows(texts: list[str], n: int, width: int, seed: int) -> list[str]:
    """`n` seeded windows of `width` characters from `texts` (longer files give more)."""
    rng = random.Random(seed)
    weights = [len(t) for t in texts]
    out = []
    for _ in range(n):
        t = rng.choices(texts, weights=weights)[0]
        start = rng.randrange(0, max(1, len(t) - width))
        out.append(t[start : start + width])
    return out


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def encode(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id)
    m = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
        m[i, : len(row)] = 1
    return x, m


@torch.no_grad()
def bits_per_char(model, tok, texts: list[str], batch: int = 64) -> float:  # noqa: ANN001
    nll, n = 0.0, 0
    for s in range(0, len(texts), batch):
        x, m = encode(tok, texts[s : s + batch])
        logits = model(input_ids=x, attention_mask=m).logits.float()
        lp = logits[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]
        mask = m[:, 1:].bool()
        nll -= float(lp[mask].sum())
        n += int(mask.sum())
    return nll / max(n, 1) / math.log(2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=30, help="windows per step (all domains)")
    p.add_argument("--window", type=int, default=80, help="characters per sample")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--moe-intermediate", type=int, default=48)
    p.add_argument("--max-files", type=int, default=400, help="files read per domain")
    p.add_argument("--n-profile", type=int, default=256, help="profile windows per domain")
    p.add_argument("--n-eval", type=int, default=128, help="eval windows per domain")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = build_tokenizer()
    domains = list(DOMAINS)
    texts = {d: domain_texts(d, args.max_files, 60_000, args.seed) for d in domains}
    for d in domains:
        sizes = {s: len(v) for s, v in texts[d].items()}
        print(f"{d}: files {sizes}", flush=True)
        for s in SPLITS:
            if not texts[d][s]:
                raise SystemExit(f"domain {d} has no {s} file on this machine")
    corpora = args.out / "corpora"
    eval_text: dict[str, list[str]] = {}
    for i, d in enumerate(domains):
        prof = windows(texts[d]["profile"], args.n_profile, args.window, 1000 + i)
        ev = windows(texts[d]["eval"], args.n_eval, args.window, 2000 + i)
        write_jsonl([{"text": t} for t in prof], corpora / f"{d}.profile.jsonl")
        write_jsonl([{"text": t} for t in ev], corpora / f"{d}.eval.jsonl")
        eval_text[d] = ev

    config = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        moe_intermediate_size=args.moe_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        output_router_logits=False,
        router_aux_loss_coef=0.01,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen3MoeForCausalLM(config)
    model.set_experts_implementation("grouped_mm")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    per = args.batch_size // len(domains)
    rng = random.Random(args.seed)
    train = {d: texts[d]["train"] for d in domains}
    weights = {d: [len(t) for t in train[d]] for d in domains}
    for step in range(args.steps):
        lr = (
            args.lr
            * min(1.0, (step + 1) / 100)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        batch = []
        for d in domains:
            for _ in range(per):
                t = rng.choices(train[d], weights=weights[d])[0]
                s = rng.randrange(0, max(1, len(t) - args.window))
                batch.append(t[s : s + args.window])
        x, m = encode(tok, batch)
        labels = x.masked_fill(m == 0, -100)
        out = model(input_ids=x, attention_mask=m, labels=labels, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {out.loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(args.out)
    fp32 = model.float()
    bpc = {d: bits_per_char(fp32, tok, eval_text[d]) for d in domains}
    meta = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "eval_bpc": bpc,
        "wall_s": time.time() - t0,
    }
    (args.out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2), flush=True)


if __name__ == "__main__":
    main()
