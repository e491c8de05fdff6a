"""One declarative entry per supported MoE family (transformers 5.x names, measured).

Names are relative to a decoder layer. See ../shared/reference/transformers_moe.md for where each
fact comes from. `example_config` is a tiny configuration used by the tests to build a random
model of the family (2-3 layers, 8 experts, top-2).
"""

from __future__ import annotations

from premoe.arch.spec import ArchSpec, ExpertTensor, MtpSpec, RouterSpec, RouterTensor

_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _tiny(**kw: object) -> dict[str, object]:
    return {**_TINY, **kw}


def _gated(block: str, gate: str, up: str, down: str) -> tuple[ExpertTensor, ExpertTensor]:
    """The common fused pair: gate_up_proj [E, 2I, H] (= cat(gate, up)) and down_proj [E, H, I]."""
    return (
        ExpertTensor(f"{block}.experts.gate_up_proj", per_expert=(gate, up)),
        ExpertTensor(f"{block}.experts.down_proj", per_expert=(down,)),
    )


_QWEN_EXPERTS = _gated("mlp", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
_MIXTRAL_EXPERTS = _gated("mlp", "w1.weight", "w3.weight", "w2.weight")
_MIXTRAL_GATE = RouterTensor("mlp.gate.weight", per_expert_disk="block_sparse_moe.gate.weight")
_SOFTMAX_RENORM = RouterSpec("mlp.gate", "softmax", renormalize=True)
_SOFTMAX_NORM_KEY = RouterSpec("mlp.gate", "softmax", renormalize="norm_topk_prob")
_QWEN_GATE = (RouterTensor("mlp.gate.weight"),)
_DEEPSEEK_ROUTER = RouterSpec(
    "mlp.gate",
    "sigmoid",
    renormalize="norm_topk_prob",
    grouped=True,
    scaling_key="routed_scaling_factor",
)
_DEEPSEEK_GATE = (
    RouterTensor("mlp.gate.weight"),
    RouterTensor("mlp.gate.e_score_correction_bias", role="correction_bias"),
)
_NEXTN = MtpSpec("num_nextn_predict_layers")  # MTP as decoder layer N (DeepSeek-V3, GLM-4.5)
_MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    head_dim=8,
)

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="mixtral",
        model_types=("mixtral",),
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="all",
        block="mlp",
        router=_SOFTMAX_RENORM,
        experts=_MIXTRAL_EXPERTS,
        router_tensors=(_MIXTRAL_GATE,),
        per_expert_block="block_sparse_moe",
        example_config=_tiny(num_local_experts=8),
    ),
    ArchSpec(
        name="minimax",
        model_types=("minimax",),
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="all",
        block="mlp",
        router=_SOFTMAX_RENORM,
        experts=_MIXTRAL_EXPERTS,
        router_tensors=(_MIXTRAL_GATE,),
        per_expert_block="block_sparse_moe",
        notes="MiniMax-Text-01 / M1: hybrid lightning/full attention, Mixtral-style MoE.",
        example_config=_tiny(
            num_local_experts=8, layer_types=["linear_attention", "full_attention"]
        ),
    ),
    ArchSpec(
        name="minimax_m2",
        model_types=("minimax_m2",),
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="all",
        block="mlp",
        router=RouterSpec("mlp.gate", "sigmoid", renormalize=True),
        experts=_MIXTRAL_EXPERTS,
        router_tensors=(
            _MIXTRAL_GATE,
            RouterTensor(
                "mlp.e_score_correction_bias",
                role="correction_bias",
                per_expert_disk="block_sparse_moe.e_score_correction_bias",
            ),
        ),
        per_expert_block="block_sparse_moe",
        notes="sigmoid + correction bias (selection only); the bias lives on the block.",
        example_config=_tiny(num_local_experts=8),
    ),
    ArchSpec(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        num_experts_key="num_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="decoder_sparse_step",
        block="mlp",
        router=_SOFTMAX_NORM_KEY,
        experts=_QWEN_EXPERTS,
        router_tensors=_QWEN_GATE,
        per_expert_block="mlp",
        shared=("mlp.shared_expert", "mlp.shared_expert_gate"),
        example_config=_tiny(
            num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=32
        ),
    ),
    ArchSpec(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        num_experts_key="num_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="decoder_sparse_step",
        block="mlp",
        router=_SOFTMAX_NORM_KEY,
        experts=_QWEN_EXPERTS,
        router_tensors=_QWEN_GATE,
        per_expert_block="mlp",
        notes="transformers 5.x writes num_experts to config.json as num_local_experts.",
        example_config=_tiny(num_experts=8, moe_intermediate_size=16, norm_topk_prob=True),
    ),
    ArchSpec(
        name="qwen3_next",
        model_types=("qwen3_next",),
        num_experts_key="num_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="decoder_sparse_step",
        block="mlp",
        router=_SOFTMAX_NORM_KEY,
        experts=_QWEN_EXPERTS,
        router_tensors=_QWEN_GATE,
        per_expert_block="mlp",
        shared=("mlp.shared_expert", "mlp.shared_expert_gate"),
        mtp=MtpSpec("mtp_num_hidden_layers", prefix="mtp.layers"),
        example_config=_tiny(
            num_experts=8,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),
    ArchSpec(
        name="olmoe",
        model_types=("olmoe", "flex_olmo"),
        num_experts_key="num_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="all",
        block="mlp",
        router=_SOFTMAX_NORM_KEY,
        experts=_QWEN_EXPERTS,
        router_tensors=_QWEN_GATE,
        per_expert_block="mlp",
        example_config=_tiny(num_experts=8, pad_token_id=0, eos_token_id=1, bos_token_id=2),
    ),
    ArchSpec(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        num_experts_key="n_routed_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="first_k_dense_replace",
        block="mlp",
        router=RouterSpec(
            "mlp.gate",
            "softmax",
            renormalize="norm_topk_prob",
            scaling_key="routed_scaling_factor",
        ),
        experts=_QWEN_EXPERTS,
        router_tensors=_QWEN_GATE,
        per_expert_block="mlp",
        shared=("mlp.shared_experts",),
        notes="topk_method 'greedy' only; 'group_limited_greedy' is refused.",
        example_config=_tiny(
            n_routed_experts=8,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            **{**_MLA, "q_lora_rank": None},
        ),
    ),
    ArchSpec(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        num_experts_key="n_routed_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="first_k_dense_replace",
        block="mlp",
        router=_DEEPSEEK_ROUTER,
        experts=_QWEN_EXPERTS,
        router_tensors=_DEEPSEEK_GATE,
        per_expert_block="mlp",
        shared=("mlp.shared_experts",),
        mtp=_NEXTN,
        notes="sigmoid + correction bias, group-limited (n_group/topk_group); MTP layer N.",
        example_config=_tiny(
            n_routed_experts=8,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            **_MLA,
        ),
    ),
    ArchSpec(
        name="glm4_moe",
        model_types=("glm4_moe",),
        num_experts_key="n_routed_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="first_k_dense_replace",
        block="mlp",
        router=_DEEPSEEK_ROUTER,
        experts=_QWEN_EXPERTS,
        router_tensors=_DEEPSEEK_GATE,
        per_expert_block="mlp",
        shared=("mlp.shared_experts",),
        mtp=_NEXTN,
        example_config=_tiny(
            n_routed_experts=8,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_hidden_layers=3,
        ),
    ),
    ArchSpec(
        name="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        num_experts_key="moe_num_experts",
        top_k_key="moe_k",
        moe_layers="ernie_start_end_interval",
        block="mlp",
        router=RouterSpec("mlp.gate", "softmax", renormalize=True),
        experts=_QWEN_EXPERTS,
        router_tensors=(
            RouterTensor("mlp.gate.weight"),
            RouterTensor(
                "mlp.gate.moe_statics.e_score_correction_bias",
                dim=-1,
                role="correction_bias",
                per_expert_disk="mlp.moe_statics.e_score_correction_bias",
            ),
        ),
        per_expert_block="mlp",
        shared=("mlp.shared_experts",),
        notes="softmax, selection on probability + correction bias [1, E].",
        example_config=_tiny(
            moe_num_experts=8,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            num_hidden_layers=3,
        ),
    ),
    ArchSpec(
        name="hunyuan_v1_moe",
        model_types=("hunyuan_v1_moe",),
        num_experts_key="num_experts",
        top_k_key="moe_topk",
        moe_layers="all",
        block="mlp",
        router=_SOFTMAX_RENORM,
        experts=_QWEN_EXPERTS,
        router_tensors=(RouterTensor("mlp.gate.wg.weight"),),
        per_expert_block="mlp",
        shared=("mlp.shared_mlp",),
        notes="integer moe_topk only (per-layer lists are not supported by the fused experts).",
        example_config=_tiny(
            num_experts=8, moe_topk=2, moe_intermediate_size=16, bos_token_id=1, eos_token_id=2
        ),
    ),
    ArchSpec(
        name="jamba",
        model_types=("jamba",),
        num_experts_key="num_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="expert_layer_period",
        block="feed_forward",
        router=RouterSpec("feed_forward.router", "softmax", renormalize=False),
        experts=_gated("feed_forward", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
        router_tensors=(RouterTensor("feed_forward.router.weight"),),
        per_expert_block="feed_forward",
        example_config=_tiny(
            num_experts=8,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=0,
            use_mamba_kernels=False,
        ),
    ),
    ArchSpec(
        name="phimoe",
        model_types=("phimoe",),
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="all",
        block="mlp",
        router=RouterSpec("mlp.router", "softmax", selection="sparsemixer"),
        experts=_MIXTRAL_EXPERTS,
        router_tensors=(
            RouterTensor("mlp.router.weight", per_expert_disk="block_sparse_moe.gate.weight"),
        ),
        per_expert_block="block_sparse_moe",
        notes="sparsemixer routing (top-2 only).",
        example_config=_tiny(num_local_experts=8),
    ),
    ArchSpec(
        name="gpt_oss",
        model_types=("gpt_oss",),
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="all",
        block="mlp",
        router=RouterSpec("mlp.router", "softmax", selection="logits_topk"),
        experts=(
            ExpertTensor("mlp.experts.gate_up_proj"),
            ExpertTensor("mlp.experts.gate_up_proj_bias"),
            ExpertTensor("mlp.experts.down_proj"),
            ExpertTensor("mlp.experts.down_proj_bias"),
        ),
        router_tensors=(
            RouterTensor("mlp.router.weight"),
            RouterTensor("mlp.router.bias", role="logit_bias"),
        ),
        memory_transposed=True,
        notes="fused on disk; gate/up interleaved and transposed [E, H, 2I]; MXFP4 as published "
        "(*_blocks/*_scales [E, 2I, H/32, 16]).",
        example_config=_tiny(num_local_experts=8, layer_types=None),
    ),
    ArchSpec(
        name="granitemoe",
        model_types=("granitemoe", "granitemoeshared"),
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="all",
        block="block_sparse_moe",
        router=RouterSpec("block_sparse_moe.router", "softmax", selection="logits_topk"),
        experts=(
            ExpertTensor(
                "block_sparse_moe.experts.gate_up_proj", disk="block_sparse_moe.input_linear.weight"
            ),
            ExpertTensor(
                "block_sparse_moe.experts.down_proj", disk="block_sparse_moe.output_linear.weight"
            ),
        ),
        router_tensors=(
            RouterTensor(
                "block_sparse_moe.router.weight", disk="block_sparse_moe.router.layer.weight"
            ),
        ),
        shared=("shared_mlp",),
        notes="fused on disk under input_linear/output_linear (plain renames).",
        example_config=_tiny(num_local_experts=8),
    ),
    ArchSpec(
        name="llama4_text",
        model_types=("llama4_text",),
        num_experts_key="num_local_experts",
        top_k_key="num_experts_per_tok",
        moe_layers="moe_layers",
        block="feed_forward",
        router=RouterSpec("feed_forward.router", "sigmoid", selection="logits_topk"),
        experts=(
            ExpertTensor("feed_forward.experts.gate_up_proj"),
            ExpertTensor("feed_forward.experts.down_proj"),
        ),
        router_tensors=(RouterTensor("feed_forward.router.weight"),),
        shared=("feed_forward.shared_expert",),
        notes="fused on disk [E, H, 2I]; every expert runs on every token (pruning cuts compute).",
        example_config=_tiny(
            num_local_experts=8,
            intermediate_size=16,
            intermediate_size_mlp=32,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
    ),
)
