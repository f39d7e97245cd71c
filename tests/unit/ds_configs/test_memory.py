"""Memory model: model-state bytes equal DeepSpeed's own estimators; PEFT, activation and shape counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import model_to_params as ds_model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from ds_configs.memory import (
    MethodSpec,
    activation_bytes,
    estimate,
    model_state_bytes,
    shape_from_hf_config,
    shape_from_numbers,
    tile_tokens,
    tiles_loss,
    trainable_params,
)

# (total params, largest layer): GPT-2 small, TinyLlama-1.1B, Llama-2-7B, Llama-2-13B, Llama-2-70B (exact counts).
SIZES = [
    (124_439_808, 38_597_376),
    (1_100_048_384, 65_536_000),
    (6_738_415_616, 131_072_000),
    (13_015_864_320, 163_840_000),
    (68_976_648_192, 262_144_000),
]
# (GPUs per node, nodes), including a non-power-of-two node count where float rounding could differ.
LAYOUTS = [(1, 1), (2, 1), (8, 1), (4, 2), (8, 3), (8, 16)]


@pytest.mark.parametrize(("total", "largest"), SIZES)
@pytest.mark.parametrize(("gpus", "nodes"), LAYOUTS)
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_zero2_equals_deepspeed(total, largest, gpus, nodes, cpu_offload):
    expected_cpu, expected_gpu = estimate_zero2_model_states_mem_needs(
        total_params=total, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=cpu_offload
    )
    ours = model_state_bytes(
        trainable=total,
        largest_layer_params=largest,
        zero_stage=2,
        offload_optimizer="cpu" if cpu_offload else "none",
        gpus_per_node=gpus,
        nodes=nodes,
    )
    assert (ours.cpu, ours.gpu) == (expected_cpu, expected_gpu)


@pytest.mark.parametrize(("total", "largest"), SIZES)
@pytest.mark.parametrize(("gpus", "nodes"), LAYOUTS)
@pytest.mark.parametrize(
    ("cpu_offload", "offload_params", "zero_init"),
    [(o, p, z) for o, p, z in itertools.product([False, True], repeat=3) if o or not p],
)
def test_zero3_equals_deepspeed(total, largest, gpus, nodes, cpu_offload, offload_params, zero_init):
    expected_cpu, expected_gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=total,
        largest_layer_params=largest,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
        cpu_offload=cpu_offload,
        cpu_offload_params=offload_params,
        zero_init=zero_init,
    )
    ours = model_state_bytes(
        trainable=total,
        largest_layer_params=largest,
        zero_stage=3,
        offload_optimizer="cpu" if cpu_offload else "none",
        offload_params="cpu" if offload_params else "none",
        gpus_per_node=gpus,
        nodes=nodes,
        zero_init=zero_init,
    )
    assert (ours.cpu, ours.gpu) == (expected_cpu, expected_gpu)


def test_stage_order_and_extensions():
    p, big = 1_000_000_000, 100_000_000
    gpu = {
        s: model_state_bytes(trainable=p, largest_layer_params=big, zero_stage=s, gpus_per_node=8).gpu for s in range(4)
    }
    assert gpu[0] == 20 * p  # every byte replicated
    assert gpu[1] == 4 * p + 16 * p // 8
    assert gpu[0] > gpu[1] > gpu[2] > gpu[3]


def test_peft_frozen_base_has_no_optimizer_state():
    trainable, frozen = 40_000_000, 6_700_000_000
    peft = model_state_bytes(trainable=trainable, frozen=frozen, largest_layer_params=1, zero_stage=0)
    assert peft.gpu == 20 * trainable + 2 * frozen
    quant = model_state_bytes(
        trainable=trainable, frozen=frozen, frozen_bytes_per_param=0.5, largest_layer_params=1, zero_stage=0
    )
    assert quant.gpu == 20 * trainable + frozen // 2


def test_invalid_combinations_raise():
    with pytest.raises(ValueError, match="needs zero_stage 3"):
        model_state_bytes(trainable=1, largest_layer_params=1, zero_stage=2, offload_params="cpu")
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        model_state_bytes(trainable=1, largest_layer_params=1, zero_stage=0, offload_optimizer="cpu")


def test_nvme_moves_states_off_cpu():
    kwargs = dict(trainable=10**9, largest_layer_params=10**8, zero_stage=3, gpus_per_node=8)
    cpu = model_state_bytes(offload_optimizer="cpu", offload_params="cpu", **kwargs)
    nvme = model_state_bytes(offload_optimizer="nvme", offload_params="nvme", **kwargs)
    assert nvme.gpu == cpu.gpu
    assert nvme.nvme == 18 * 10**9 and nvme.cpu < cpu.cpu


LLAMA7B = shape_from_numbers(layers=32, hidden=4096, vocab=32000, intermediate=11008, heads=32)


def test_llama7b_shape_count_is_exact():
    assert LLAMA7B.total_params == 6_738_415_616  # meta-llama/Llama-2-7b-hf
    assert LLAMA7B.largest_layer_params == 32000 * 4096


def test_lora_trainable_count_for_llama7b():
    # PEFT all-linear r=16 on Llama-2-7B: 39,976,960 trainable parameters.
    assert trainable_params(LLAMA7B, MethodSpec("lora", lora_r=16)) == 39_976_960
    assert trainable_params(LLAMA7B, MethodSpec("lora", lora_r=8, lora_targets=("q_proj", "v_proj"))) == 4_194_304
    assert trainable_params(LLAMA7B, MethodSpec("prompt_tuning", virtual_tokens=20)) == 20 * 4096
    assert trainable_params(LLAMA7B, MethodSpec("ptuning_v2", virtual_tokens=20)) == 20 * 32 * 2 * 4096
    with pytest.raises(ValueError, match="none of them is a linear"):
        trainable_params(LLAMA7B, MethodSpec("lora", lora_targets=("c_attn",)))


def test_activation_formula_and_checkpointing():
    s, b, h, inter, L = 2048, 1, 4096, 11008, 32
    acts = activation_bytes(LLAMA7B, seq_len=s, micro_batch=b, gradient_checkpointing=False)
    final = s * b * 8 * h  # final norm (fp32 input + normalised) and lm_head input
    assert acts["layers"] == s * b * (20 * h + 4 * h + 8 * inter) * L + final
    assert acts["logits"] == 10 * s * b * 32000
    ckpt = activation_bytes(LLAMA7B, seq_len=s, micro_batch=b, gradient_checkpointing=True)
    assert ckpt["layers"] == 2 * s * b * h * L + s * b * (20 * h + 4 * h + 8 * inter) + final
    double = activation_bytes(LLAMA7B, seq_len=s, micro_batch=2 * b, gradient_checkpointing=False)
    assert double["layers"] == 2 * acts["layers"]


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward during one forward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)  # no labels: the logits' loss-time peak is modelled separately
    return sum(saved.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_what_autograd_saves(arch, precision, checkpointing, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from ds_configs.memory import layer_activation_bytes

    if arch == "llama":
        config = LlamaConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False,
        )  # fmt: skip
    else:
        # dropout off: masks are not in the formula (fine-tuning recipes run without dropout)
        config = GPT2Config(
            vocab_size=1000, n_embd=256, n_inner=688, n_layer=4, n_head=4, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    config.save_pretrained(tmp_path)
    shape = shape_from_hf_config(tmp_path)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    s, b = 256, 2
    measured = _saved_bytes(model, torch.randint(0, 1000, (b, s)))
    predicted = activation_bytes(
        shape, seq_len=s, micro_batch=b, gradient_checkpointing=checkpointing, precision=precision
    )
    expected = predicted["layers"]
    if checkpointing:  # the one recomputed layer lives only during backward, after this forward
        expected -= layer_activation_bytes(shape, seq_len=s, micro_batch=b, precision=precision)
    print(f"{arch} {precision} ckpt={checkpointing}: saved {measured} B, formula {expected} B")
    assert measured == pytest.approx(expected, rel=0.03), (measured, expected)


def test_qlora_is_smaller_than_lora():
    kw = dict(zero_stage=0, seq_len=1024, micro_batch=1)
    lora = estimate(LLAMA7B, MethodSpec("lora"), **kw)
    qlora = estimate(LLAMA7B, MethodSpec("qlora"), **kw)
    assert qlora.parts_gpu["model_states"] < 0.4 * lora.parts_gpu["model_states"]
    assert lora.gpu_with_margin > lora.gpu  # the margin is added, not hidden


def test_shape_from_numbers_derives_and_says_so():
    shape = shape_from_numbers(params=13_015_864_320, layers=40, hidden=5120)
    assert shape.intermediate_size == 13824  # Llama-2-13B
    assert any("derived intermediate" in n for n in shape.notes)
    guessed = shape_from_numbers(params=7e9)
    assert guessed.total_params == 7_000_000_000 and any("guessed" in n for n in guessed.notes)
    with pytest.raises(ValueError, match="too small"):
        shape_from_numbers(params=1000, layers=2, hidden=64)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_shape_from_hf_config_matches_the_real_model(fixture, request):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    shape = shape_from_hf_config(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (shape.total_params, shape.largest_layer_params) == ds_model_to_params(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable_params(shape, MethodSpec("lora", lora_r=4)) == trainable


def test_qlora_zero3_gpu_peak_is_at_least_the_whole_quantised_base():
    """No zero.Init under bitsandbytes: every rank holds the whole 4-bit base (rest in bf16) before
    deepspeed.initialize partitions it, however many GPUs share it afterwards."""
    from ds_configs.memory import QUANT_BYTES

    quant = LLAMA7B.quantizable_params
    floor = quant * QUANT_BYTES[4] + (LLAMA7B.total_params - quant) * 2
    est = estimate(LLAMA7B, MethodSpec("qlora"), zero_stage=3, seq_len=1024, micro_batch=1, gpus_per_node=8)
    assert est.parts_gpu["model_states"] >= int(floor)


def test_a_dense_block_mask_is_counted_when_the_kernel_needs_one():
    """The loader's bool (B,1,T,T) mask plus SDPA's additive bf16 copy: measured against the tensors themselves."""
    import torch

    from data_tools.loading.packing import block_causal_mask
    from ds_configs.memory import dense_mask_bytes

    b, t = 2, 256
    mask = torch.as_tensor(block_causal_mask(np.tile(np.arange(t), (b, 1))))
    additive = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
    assert dense_mask_bytes(seq_len=t, micro_batch=b) == mask.nbytes + additive.nbytes
    kw = dict(zero_stage=2, seq_len=4096, micro_batch=2)
    plain, masked = (
        estimate(LLAMA7B, MethodSpec("full"), **kw),
        estimate(LLAMA7B, MethodSpec("full"), dense_mask=True, **kw),
    )
    assert masked.parts_gpu["activations"] - plain.parts_gpu["activations"] == 2 * 4096 * 4096 * 3


def test_the_tiled_loss_replaces_the_logits_term_where_train_tiled_loss_tiles():
    """Qwen2.5-7B's shape at 16k tokens: plain logits are bsV x 10 bytes (25 GB); tiled, one tile of
    256 MiB / 4V tokens plus the fp32 accumulator of a trained head. auto tiles only above 1 GiB of fp32 logits."""
    qwen = shape_from_numbers(layers=28, hidden=3584, vocab=152_064, intermediate=18_944, heads=28, kv_heads=4)
    kw = dict(zero_stage=3, seq_len=16_384, micro_batch=1, gpus_per_node=8)
    plain = estimate(qwen, MethodSpec("full"), tiled_loss="never", **kw)
    assert plain.parts_gpu["logits"] == 10 * 16_384 * 152_064
    full = estimate(qwen, MethodSpec("full"), **kw)  # auto
    lora = estimate(qwen, MethodSpec("lora"), tiled_loss="always", **kw)
    tile = tile_tokens(152_064)
    assert tile == 441 and full.parts_gpu["logits"] == tile * 152_064 * 6 + 4 * 152_064 * 3584
    assert lora.parts_gpu["logits"] == tile * 152_064 * 6  # the head is frozen: no gradient accumulator
    assert full.gpu < plain.gpu - 20 * 2**30
    # auto below the threshold is the plain loss: 1 GiB of fp32 logits is 1765 tokens at 152k
    short = dict(kw, seq_len=1024)
    assert estimate(qwen, MethodSpec("full"), **short).parts_gpu["logits"] == 10 * 1024 * 152_064
    assert tiles_loss("auto", tokens_per_micro_batch=1766, vocab_size=152_064)
    assert not tiles_loss("auto", tokens_per_micro_batch=1765, vocab_size=152_064)
    with pytest.raises(ValueError, match="train.tiled_loss='sometimes'"):
        tiles_loss("sometimes", tokens_per_micro_batch=1, vocab_size=1)
