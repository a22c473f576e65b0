"""What llmpress compresses of real mixture-of-experts architectures, and what one block needs in
memory while it is calibrated, from their configs alone (the model is built on the meta device:
no weights, no download).

    python -m compress.eval.moe_shapes --out eval/results/moe

For each architecture: parameters per part (attention, routed experts, shared experts, dense
MLPs, routers, embeddings and head, norms) and, for each recipe, the parameters its targets select
(the same target matching as a compression run, on the per-expert form). Then the calibration
memory of the largest block: its weights in bfloat16 on the device, the float64 input Grams the
hooks accumulate (layers reading one input share one Gram: q/k/v, gate/up, and with
`calibration.moe: all` every expert's up projection), and the block's input and output
activations for the calibration set. Prints tables; writes results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from compress.experts import expert_linear_names, linearize_experts, router_names
from compress.pipelines.base import statistics_groups
from compress.recipe import load_recipe
from compress.targets import match_linears

# Public config.json values of each model (hidden sizes, experts, vocabulary).
ARCHITECTURES = {
    "Qwen3-30B-A3B": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
            vocab_size=151936, tie_word_embeddings=False,
        ),
    ),
    "Mixtral-8x7B": (
        "MixtralConfig",
        dict(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        ),
    ),
    "gpt-oss-20b": (
        "GptOssConfig",
        dict(
            hidden_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
            intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
        ),
    ),
    "DeepSeek-V3": (
        "DeepseekV3Config",
        dict(
            hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3, intermediate_size=18432,
            moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
            num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280,
        ),
    ),
}  # fmt: skip

RECIPES = ["recipes/moe-w4-g16.yaml", "recipes/sparsegpt-50.yaml", "recipes/whitened-svd-20.yaml"]
NO_SHARE = ("o_proj", "down_proj", "out_proj", "dense")  # layers whose input no other layer reads


def meta_model(name: str):
    """The architecture with per-expert Linears, on the meta device."""
    import transformers

    config_class, kwargs = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    linearize_experts(model)
    return model


def part_of(name: str, experts: set[str], routers: set[str]) -> str:
    if name in experts:
        return "routed experts"
    if name in routers or name.endswith((".gate.weight", ".router.weight", ".gate.e_score_correction_bias")):
        return "routers"
    if "shared_expert" in name:
        return "shared experts"
    if "attn" in name:
        return "attention"
    if "mlp" in name:
        return "dense MLP"
    if "embed" in name or "lm_head" in name:
        return "embeddings + head"
    return "norms, other"


def parameters_by_part(model) -> dict[str, int]:
    experts = set(expert_linear_names(model))
    routers = router_names(model)
    parts: dict[str, int] = {}
    for full, param in model.named_parameters():
        module = full.rsplit(".", 1)[0]
        part = part_of(module if module in experts or module in routers else full, experts, routers)
        parts[part] = parts.get(part, 0) + param.numel()
    return parts


def compressed_by_recipe(model, recipe_path: str) -> dict[str, int]:
    """Parameters of the Linears the recipe's stages select, by part."""
    recipe = load_recipe(recipe_path)
    experts = set(expert_linear_names(model))
    routers = router_names(model)
    selected = {}
    for stage in recipe.stages:
        selected.update(match_linears(model, stage.targets, stage.ignore))
    parts: dict[str, int] = {}
    for name, linear in selected.items():
        part = part_of(name, experts, routers)
        parts[part] = parts.get(part, 0) + sum(p.numel() for p in linear.parameters())
    return parts


def block_calibration_memory(model, tokens: int, moe_all: bool, limit_gib: float) -> dict[str, float]:
    """GiB one block needs while calibrated: weights (bf16), Grams (fp64), activations (fp32 in+out),
    and how many passes `calibration.max_statistics_gib` cuts its statistics into."""
    blocks = model.model.layers
    experts = set(expert_linear_names(model))
    best = None
    for index, block in enumerate(blocks):
        linears = match_linears(block, ["Linear"], [], prefix=f"model.layers.{index}")
        inputs: dict[tuple, int] = {}  # one Gram per distinct input
        for name, linear in linears.items():
            parent, _, leaf = name.rpartition(".")
            if name in experts:
                stack, projection, expert = name.rsplit(".", 2)
                shared = moe_all and projection in ("gate_up_proj", "up_proj")
                key = (stack, projection) if shared else (name,)
            elif any(leaf.startswith(s) for s in NO_SHARE):
                key = (name,)
            else:
                key = (parent, linear.in_features)
            inputs[key] = linear.in_features
        grams = sum(n * n * 8 for n in inputs.values())
        weights = sum(p.numel() * 2 for p in block.parameters())
        total = grams + weights
        if best is None or total > best[0]:
            def shared(name: str, _all=moe_all) -> str:  # what BlockPipeline.shared_input says
                stack, projection, _ = name.rsplit(".", 2)
                return f"{stack}.{projection}" if _all and name in experts and projection != "down_proj" else name

            passes = len(statistics_groups(linears, {"gram"}, limit_gib * 2**30, shared))
            best = (total, index, weights, grams, len(inputs), passes)
    _, index, weights, grams, count, passes = best
    hidden = model.config.hidden_size
    activations = 2 * tokens * hidden * 4
    gib = 2**30
    return {
        "block": index,
        "weights_gib": weights / gib,
        "grams_gib": grams / gib,
        "grams": count,
        "activations_gib": activations / gib,
        "passes_at_limit": passes,
        "grams_held_gib": min(grams / gib, limit_gib),
        "total_gib": (weights + grams + activations) / gib,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="eval/results/moe")
    parser.add_argument("--tokens", type=int, default=32 * 512, help="calibration tokens (default 32 x 512)")
    parser.add_argument("--models", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--max-statistics-gib", type=float, default=32.0, help="calibration.max_statistics_gib")
    args = parser.parse_args(argv)
    results = {}
    for name in args.models:
        model = meta_model(name)
        parts = parameters_by_part(model)
        total = sum(parts.values())
        recipes = {Path(r).stem: compressed_by_recipe(model, r) for r in RECIPES}
        memory = {
            mode: block_calibration_memory(model, args.tokens, mode == "all", args.max_statistics_gib)
            for mode in ("routed", "all")
        }
        results[name] = {"parameters": parts, "total": total, "recipes": recipes, "block_memory": memory}
        print(f"\n{name}: {total / 1e9:.2f} B parameters")
        header = f"{'part':<20} {'params (M)':>12} {'share':>7}" + "".join(f" {r:>22}" for r in recipes)
        print(header)
        for part, count in sorted(parts.items(), key=lambda item: -item[1]):
            cells = "".join(f" {recipes[r].get(part, 0) / 1e6:>20,.0f} M" for r in recipes)
            print(f"{part:<20} {count / 1e6:>12,.1f} {100 * count / total:>6.1f}%{cells}")
        shares = "".join(f" {100 * sum(recipes[r].values()) / total:>21.1f}%" for r in recipes)
        print(f"{'compressed share':<41}{shares}")
        for mode, m in memory.items():
            print(
                f"calibration ({mode:>6}), block {m['block']}: weights {m['weights_gib']:.2f} GiB + {m['grams']} Grams "
                f"{m['grams_gib']:.2f} GiB (fp64) + activations {m['activations_gib']:.2f} GiB = {m['total_gib']:.2f} GiB; "
                f"{m['passes_at_limit']} pass(es) at max_statistics_gib={args.max_statistics_gib:g}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"tokens": args.tokens, "max_statistics_gib": args.max_statistics_gib, "models": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
