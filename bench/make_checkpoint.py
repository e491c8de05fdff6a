"""Build a big random Qwen3-MoE-shaped checkpoint on disk, quickly (shared benchmark helper).

The checkpoint is in the hub's per-expert layout (`mlp.experts.{e}.{gate,up,down}_proj.weight`),
bf16, sharded like `save_pretrained` (`model-0000i-of-0000N.safetensors` + index), with a
config.json and generation_config.json. Names and shapes come from the transformers model class
built on the meta device, so the folder loads with `AutoModelForCausalLM.from_pretrained`.

Filling GBs with `normal_()` is slow on a CPU, so values come from a pool of random numbers
(generated once, on `--device`) that every tensor takes a different window of: random-looking
data at memory-copy speed. Peak memory is about one shard plus the pool.

    python bench/make_checkpoint.py --gb 4 --out /tmp/qwen3-4gb           # ~4 GB, 1 GB shards
    python bench/make_checkpoint.py --gb 8 --shard 2GB --out /data/q8 --device cuda
    python bench/make_checkpoint.py --smoke --out /tmp/q-smoke
    python bench/make_checkpoint.py --gb 4 --quant fp8 --out /tmp/q4-fp8   # DeepSeek fp8 layout

`--layers` overrides the layer count that `--gb` implies; the other shape options set the rest
(defaults: hidden 1024, moe_intermediate 512, 64 experts, top-8, 16 heads x 64, 4 KV heads, vocab
32000).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import _common as bc
import torch

POOL_ELEMENTS = 1 << 25  # 32 Mi values (64 MiB in bf16)

# this script's own default shape (kv heads = heads / 4) and its --smoke shape
SHAPE_DEFAULTS: dict[str, Any] = dict(
    layers=None, hidden=1024, moe_intermediate=512, experts=64, top_k=8, vocab=32000, heads=16,
    head_dim=64,
)  # fmt: skip
SMOKE: dict[str, Any] = dict(
    hidden=128, moe_intermediate=64, experts=16, top_k=4, vocab=512, heads=4, head_dim=32,
    kv_heads=None,
)  # fmt: skip


def tensor_specs(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the per-expert on-disk layout, in layer order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    specs: list[tuple[str, tuple[int, ...]]] = []
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H] -> per expert [I, H] x 2
            base = name.removesuffix("gate_up_proj")
            e, two_i, h = t.shape
            for i in range(e):
                specs.append((f"{base}{i}.gate_proj.weight", (two_i // 2, h)))
                specs.append((f"{base}{i}.up_proj.weight", (two_i // 2, h)))
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I] -> per expert [H, I]
            base = name.removesuffix("down_proj")
            for i in range(t.shape[0]):
                specs.append((f"{base}{i}.down_proj.weight", tuple(t.shape[1:])))
        else:
            specs.append((name, tuple(t.shape)))

    def layer_of(item: tuple[str, tuple[int, ...]]) -> tuple[int, str]:
        parts = item[0].split(".")
        layer = int(parts[2]) if parts[:2] == ["model", "layers"] else -1
        return (layer if layer >= 0 else (10**9 if "lm_head" in item[0] else -1), item[0])

    # embeddings first, then layer by layer (names sorted inside a layer), lm_head/norm last
    order = {name: n for n, (name, _) in enumerate(specs)}
    return sorted(specs, key=lambda s: (layer_of(s)[0], order[s[0]]))


FP8_BLOCK = 128


def is_fp8_linear(name: str, shape: tuple[int, ...]) -> bool:
    """Linear weights an fp8-block checkpoint stores in e4m3 (DeepSeek-V3 / Qwen3-FP8: all but
    embeddings, head, norms and routers)."""
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")
    return len(shape) == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def quantized_specs(
    specs: list[tuple[str, tuple[int, ...]]], quant: str | None
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every stored tensor: bf16, or fp8 weight + fp32 block scales."""
    out = []
    for name, shape in specs:
        if quant == "fp8" and is_fp8_linear(name, shape):
            out.append((name, shape, torch.float8_e4m3fn))
            grid = tuple(-(-d // FP8_BLOCK) for d in shape)
            out.append((name.removesuffix("weight") + "weight_scale_inv", grid, torch.float32))
        else:
            out.append((name, shape, torch.bfloat16))
    return out


def model_bytes(config: Any, quant: str | None = None) -> int:
    return sum(
        math.prod(shape) * dt.itemsize
        for _, shape, dt in quantized_specs(tensor_specs(config), quant)
    )


def layers_for(gb: float, args: argparse.Namespace) -> int:
    """Layer count whose checkpoint (of the other shape options in `args`) is closest to `gb` x
    1e9 bytes."""
    quant = getattr(args, "quant", None)
    one = model_bytes(bc.qwen3_config(args, layers=1), quant)
    two = model_bytes(bc.qwen3_config(args, layers=2), quant)
    per_layer, rest = two - one, 2 * one - two
    return max(1, round((gb * 1e9 - rest) / per_layer))


def write_checkpoint(
    config: Any,
    folder: str | Path,
    *,
    shard_bytes: int = 10**9,
    device: str = "cpu",
    seed: int = 0,
    quant: str | None = None,
) -> dict[str, Any]:
    """Write the random checkpoint (bf16, or `quant="fp8"`: the DeepSeek-V3 fp8 block layout,
    e4m3 weights + fp32 `weight_scale_inv` per 128x128 block); returns a summary."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(seed)
    pool = torch.empty(POOL_ELEMENTS, dtype=torch.float32, device=device)
    pool.normal_(0.0, 0.02, generator=g)
    pool = pool.to("cpu", torch.bfloat16)  # [P]
    specs = quantized_specs(tensor_specs(config), quant)
    pools = {
        torch.bfloat16: pool,
        torch.float8_e4m3fn: (pool.float() * 400).to(torch.float8_e4m3fn),
    }
    pools[torch.float32] = pool.float().abs() * 0.01 + 1e-4  # block scales, positive
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name, shape, dt in specs:
        n = math.prod(shape) * dt.itemsize
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape, dt))
        size += n
    weight_map: dict[str, str] = {}
    offset = 0
    total = 0
    for index, group in enumerate(groups, 1):
        shard = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape, dt in group:
            n = math.prod(shape)
            out = torch.empty(n, dtype=dt)
            src = pools[dt]
            done = 0
            while done < n:  # a window of the pool, wrapping around
                start_at = offset % POOL_ELEMENTS
                take = min(n - done, POOL_ELEMENTS - start_at)
                out[done : done + take].copy_(src[start_at : start_at + take])
                done += take
                offset += take
            offset += 7919  # the next tensor starts elsewhere in the pool
            tensors[name] = out.view(shape)
            weight_map[name] = shard
            total += n * dt.itemsize
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    if quant == "fp8":
        config.quantization_config = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
    config.save_pretrained(folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "max_new_tokens": 32}, indent=2)
    )
    return {
        "path": str(folder),
        "bytes": total,
        "shards": len(groups),
        "largest_shard": max(p.stat().st_size for p in folder.glob("model-*.safetensors")),
        "layers": config.num_hidden_layers,
        "experts": config.num_experts,
        "format": quant or "bf16",
        "seconds": time.perf_counter() - start,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="Output folder (created).")
    p.add_argument("--gb", type=float, default=4.0, help="Target size in GB (1e9 bytes).")
    bc.add_model_args(p, kv_ratio=4, **SHAPE_DEFAULTS)  # --layers: default None, from --gb
    p.add_argument("--shard", default="1GB", help="Shard size limit, e.g. 1GB, 500MB.")
    p.add_argument("--device", default="cpu", help="Where the random pool is generated.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", choices=["fp8"], default=None, help="fp8: DeepSeek fp8 block layout.")
    p.add_argument("--smoke", action="store_true", help="Tiny model (a few MB), for a CPU check.")
    args = p.parse_args(argv)
    if args.smoke:  # the smoke shape replaces the shape options (not --layers)
        vars(args).update(SMOKE)
    return args


def config_for(args: argparse.Namespace) -> Any:
    """The config of `args`: ``--layers``, else 4 layers for ``--smoke``, else as many as make
    the checkpoint ``--gb`` large."""
    layers = args.layers or (4 if args.smoke else layers_for(args.gb, args))
    return bc.qwen3_config(args, layers=layers)


def main(argv: list[str] | None = None) -> int:
    from premoe.policy import parse_bytes

    args = parse_args(argv)
    config = config_for(args)
    shard = parse_bytes("1MB") if args.smoke else parse_bytes(args.shard)
    info = write_checkpoint(
        config, args.out, shard_bytes=shard, device=args.device, seed=args.seed, quant=args.quant
    )
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
