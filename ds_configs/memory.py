"""Memory model: bytes per GPU and per node (CPU, NVMe) for a fine-tuning run under each ZeRO stage and offload.

Four parts, each from a stated formula:

1. **Model states** (weights, gradients, optimizer) — :func:`model_state_bytes`. For full fine-tuning in mixed
   precision it reproduces DeepSpeed's own ``estimate_zero2_model_states_mem_needs`` (stage_1_and_2.py) and
   ``estimate_zero3_model_states_mem_needs`` (stage3.py) byte for byte (tested against them). Per trainable
   parameter DeepSpeed counts 2 bytes of 16-bit weights plus 16 bytes of optimizer-side state (4 fp32 master,
   4 fp32 gradient, 8 Adam moments) plus, in stage 2, 2 bytes of 16-bit gradient partition: ``2P + 18P/N`` on
   each GPU; stage 3 partitions the weights too and adds 4 bytes × the largest layer for the gathered layer:
   ``4·largest + 18P/N``. Extensions (stated here because DeepSpeed has no estimator for them): stage 0 holds all
   20 bytes/param on every GPU; stage 1 replicates weights and 16-bit gradients (4 bytes) and partitions the
   16 optimizer bytes; PEFT methods keep the frozen base in 16-bit (or 4/8-bit for QLoRA, bitsandbytes NF4 with
   double quantisation ≈ 0.52 byte/param, int8 ≈ 1.02) with no gradient or optimizer state, and only the
   trainable set carries the 18/20 bytes; fp32 training stores 4-byte weights and gradients.
2. **Activations** per micro batch — :func:`activation_bytes`. Per decoder layer, the tensors autograd saves with
   SDPA/flash attention (no s×s score matrix is kept): for a gated MLP in 16-bit, two RMSNorms (HF computes them in
   fp32: fp32 input 4sbh + normalised 2sbh + output 2sbh each), Q (2sbh), K and V (2·2sb·h_kv), the attention
   output (2sbh) and gate, up, act(gate) and their product (4·2sbI): ``sb(20h + 4h_kv + 8I)`` bytes. This is
   Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1:
   ``sbh(34 + 5as/h)``) re-derived for HF's Llama modules: SwiGLU MLP, fp32 norms, no dropout, and no s² term
   because fused attention never stores the scores; a test checks it against what autograd really saves. With
   gradient checkpointing (HF, one checkpoint per decoder layer) only each layer's input is kept (2sbh·L,
   Korthikanti's "full recomputation") plus one layer recomputed during backward. The logits add ``bsV × 10``
   bytes at the loss: 16-bit logits (2), their fp32 upcast (4), and the fp32 log-softmax saved for backward (4).
   With the tiled loss (``finetune/tiled_loss.py``; :func:`tiles_loss` says when ``train.tiled_loss=auto`` tiles)
   only one tile of ``t = max(128, 256 MiB / 4V)`` tokens exists: ``tV(4 + e)`` (fp32 logits made into their
   gradient in place, plus its 16-bit copy), and an fp32 accumulator for the head's gradient ``4Vh`` when the head
   trains.
3. **Buffers**: ZeRO communication buckets (stage 1/2 with ``overlap_comm``: DeepSpeed's docs give 4.5 × the
   reduce and allgather buckets, in 16-bit; stage 3: reduce + prefetch buckets, double-buffered), and for QLoRA one
   dequantised linear layer.
4. **Safety margin**, stated, not hidden: ``MARGIN_FRACTION`` of the estimate for allocator fragmentation plus
   ``MARGIN_FIXED_BYTES`` for the CUDA context and NCCL/cuBLAS workspaces, which ``torch.cuda.max_memory_allocated``
   does not see. A configuration "fits" when estimate × (1 + fraction) + fixed ≤ GPU memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ds_configs import rules
from ds_configs.build import STAGE3_PREFETCH_BUCKET, STAGE3_REDUCE_BUCKET, STAGE12_BUCKET, comm_bucket

GiB = 1024**3
# Fragmentation: PyTorch's caching allocator typically reserves 5-15% above max_memory_allocated on training loops.
MARGIN_FRACTION = 0.10
# CUDA context (~0.5 GiB on H100 with torch 2.x) + NCCL/cuBLAS workspaces: 1 GiB, not visible to max_memory_allocated.
MARGIN_FIXED_BYTES = 1 * GiB
# DeepSpeed's estimators multiply CPU memory by 1.5 ("additional_buffer_factor"); we keep their default.
CPU_BUFFER_FACTOR = 1.5
# bitsandbytes NF4: 4 bits + one fp32 absmax per 64-weight block, double-quantised to 8 bits + fp32 per 256 blocks:
# 0.5 + 1/64 + 4/(64·256) ≈ 0.516 byte/param. LLM.int8: 1 byte + one fp32 scale per row (≈ 4/h, ≈ 0.001-0.02).
QUANT_BYTES = {4: 0.5 + 1 / 64 + 4 / (64 * 256), 8: 1.02}
# DeepSpeed NVMe swap buffers (see build.render_ds_config): optimizer 4 × sub_group_size fp32; params 5 × 1e8 16-bit.
NVME_OPT_BUFFERS = 4
NVME_SUB_GROUP = 1_000_000_000
NVME_PARAM_BUFFER_BYTES = 5 * 100_000_000 * 2
LINEAR_TYPES = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a decoder-only model.

    Attributes:
        total_params: all parameters, shared (tied) ones counted once.
        largest_layer_params: parameters of the largest single module (DeepSpeed's ``largest_layer_params``,
            counted like its ``model_to_params``: each module's own parameters, not recursive).
        num_layers: decoder layers.
        hidden_size: model width h.
        vocab_size: V, for the logits.
        intermediate_size: MLP width I.
        kv_dim: width of K and V (num_kv_heads × head_dim; h without GQA).
        layer_linears: ``(name, in_features, out_features)`` of each linear in one decoder layer (LoRA targets).
        quantizable_params: parameters of the decoder layers' linear weights (what bitsandbytes quantises;
            embeddings, lm_head and norms stay 16-bit).
        gated_mlp: True for SwiGLU-style MLPs (Llama, Qwen, Mistral), False for GPT-2 style.
        source: where the shape came from, for the report.
        notes: assumptions made to fill in missing numbers.
    """

    total_params: int
    largest_layer_params: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    kv_dim: int
    layer_linears: tuple[tuple[str, int, int], ...]
    quantizable_params: int
    gated_mlp: bool = True
    source: str = "explicit"
    notes: tuple[str, ...] = ()


def _llama_linears(h: int, kv_dim: int, inter: int) -> tuple[tuple[str, int, int], ...]:
    return (
        ("q_proj", h, h),
        ("k_proj", h, kv_dim),
        ("v_proj", h, kv_dim),
        ("o_proj", h, h),
        ("gate_proj", h, inter),
        ("up_proj", h, inter),
        ("down_proj", inter, h),
    )


def shape_from_numbers(
    *,
    params: int | None = None,
    layers: int | None = None,
    hidden: int | None = None,
    vocab: int = 32000,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    tie_embeddings: bool = False,
) -> ModelShape:
    """A Llama-style shape from explicit numbers; missing ones are derived and the assumption recorded in ``notes``.

    Only ``params`` → hidden and layers from Llama's aspect ratio (layers = hidden / 128, as in Llama-1/2 7B and
    13B) solving ``12·L·h² ≈ params``. ``params`` + layers + hidden → the MLP width that makes the count match.
    All given → the Llama count ``2Vh + L(2h² + 2h·kv + 3hI + 2h) + h`` (untied embeddings).

    Raises:
        ValueError: nothing to go on, or numbers that cannot describe a model (e.g. params too small for the
            embeddings).
    """
    notes: list[str] = []
    if hidden is None or layers is None:
        if params is None:
            raise ValueError("give --params, or --layers and --hidden (and --intermediate), or --model")
        if hidden is None and layers is None:
            hidden = max(128, round((params * 128 / 12) ** (1 / 3) / 128) * 128)
            layers = max(1, hidden // 128)
        elif hidden is None:
            hidden = max(64, round(math.sqrt(params / (12 * layers)) / 64) * 64)
        else:
            layers = max(1, round(params / (12 * hidden * hidden)))
        notes.append(f"guessed layers={layers}, hidden={hidden} from {params:,} params (Llama aspect); pass them")
    heads = heads or max(1, hidden // 128)
    kv_heads = kv_heads or heads
    kv_dim = hidden // heads * kv_heads
    embed = vocab * hidden * (1 if tie_embeddings else 2)
    if intermediate is None:
        if params is None:
            intermediate = int(8 * hidden / 3 / 256 + 0.999) * 256
            notes.append(f"guessed intermediate={intermediate} (8h/3 rounded up to 256, Llama)")
        else:
            rest = params - embed - hidden - layers * (2 * hidden * hidden + 2 * hidden * kv_dim + 2 * hidden)
            if rest <= 0:
                raise ValueError(
                    f"--params {params:,} is too small for vocab {vocab} × hidden {hidden} embeddings and "
                    f"{layers} attention layers; check --params/--hidden/--layers/--vocab"
                )
            intermediate = max(1, round(rest / (3 * hidden * layers)))
            notes.append(f"derived intermediate={intermediate} so the parameter count matches {params:,}")
    linears = _llama_linears(hidden, kv_dim, intermediate)
    per_layer_linear = sum(i * o for _, i, o in linears)
    computed = embed + hidden + layers * (per_layer_linear + 2 * hidden)
    total = params if params is not None else computed
    if params is not None and abs(computed - params) > 0.02 * params:
        notes.append(f"Llama count from the shape is {computed:,}, not {params:,}; using {params:,} for model states")
    return ModelShape(
        total_params=int(total),
        largest_layer_params=max(vocab * hidden, hidden * intermediate),
        num_layers=layers,
        hidden_size=hidden,
        vocab_size=vocab,
        intermediate_size=intermediate,
        kv_dim=kv_dim,
        layer_linears=linears,
        quantizable_params=layers * per_layer_linear,
        gated_mlp=True,
        source="explicit",
        notes=tuple(notes),
    )


def shape_from_hf_config(model: str | Path, trust_remote_code: bool = False) -> ModelShape:
    """Exact counts from a HF config: a local path or hub id, built on the meta device (nothing allocated).

    ``AutoConfig.from_pretrained`` reads the config; ``accelerate.init_empty_weights`` +
    ``AutoModelForCausalLM.from_config`` builds the module tree with meta tensors, so the counts are the real
    model's (tied embeddings once, biases, norms) at the cost of a fraction of a second.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # On the meta device from_config leaves lm_head untied (transformers 5.23); tie as from_pretrained would.
    net.tie_weights()
    # parameters() yields a shared (tied) parameter once; DeepSpeed dedupes by data_ptr, which is 0 on meta.
    total = sum(p.numel() for p in net.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    layers_list = next(
        (m for m in net.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == config.num_hidden_layers),
        None,
    )
    if layers_list is None:
        raise ValueError(f"{model}: cannot find the {config.num_hidden_layers} decoder layers in the model")
    linears: list[tuple[str, int, int]] = []
    for name, mod in layers_list[0].named_modules():
        if type(mod).__name__ in LINEAR_TYPES:
            w = mod.weight
            # transformers' Conv1D (GPT-2) stores the weight as (in, out); nn.Linear as (out, in).
            i, o = (w.shape[0], w.shape[1]) if type(mod).__name__ == "Conv1D" else (w.shape[1], w.shape[0])
            linears.append((name.rsplit(".", 1)[-1], int(i), int(o)))
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    names = {n for n, _, _ in linears}
    return ModelShape(
        total_params=int(total),
        largest_layer_params=int(largest),
        num_layers=config.num_hidden_layers,
        hidden_size=hidden,
        vocab_size=config.vocab_size,
        intermediate_size=int(inter),
        kv_dim=int(head_dim * kv_heads),
        layer_linears=tuple(linears),
        quantizable_params=config.num_hidden_layers * sum(i * o for _, i, o in linears),
        gated_mlp=bool(names & {"gate_proj", "w1", "gate_up_proj"}),
        source=str(model),
    )


@dataclass(frozen=True)
class MethodSpec:
    """The fine-tuning method and its size knobs.

    Attributes:
        name: a method of ``finetune.methods`` (``full``, ``lora``, ``qlora``, ``prefix``, ``prompt``, or one
            registered later), or an alias (``ptuning_v2``, ``prompt_tuning``); stored as the canonical name.
        lora_r: LoRA rank.
        lora_targets: linear-layer names to adapt; None = every linear in the decoder layers ("all-linear").
        quant_bits: bits of a quantized base (QLoRA: 4 or 8).
        virtual_tokens: prefix / prompt length for P-Tuning v2 and prompt tuning.

    ``finetune.methods.memory_spec(cfg)`` builds one from a training config.
    """

    name: str = "full"
    lora_r: int = 16
    lora_targets: tuple[str, ...] | None = None
    quant_bits: int = 4
    virtual_tokens: int = 32

    def __post_init__(self) -> None:
        from finetune.methods import get_method  # the registry imports no torch and no training code

        try:
            method = get_method(self.name)
        except ValueError as e:
            raise ValueError(f"--method {self.name!r}: {e}") from None
        object.__setattr__(self, "name", method.name)  # one spelling from here on: ptuning_v2 -> prefix
        if method.memory.quantized and (why := rules.quant_bits_refusal(self.quant_bits)):
            raise ValueError(f"--quant-bits {self.quant_bits}: {why}")

    @property
    def method(self):
        """The registry's ``finetune.methods.Method``: what the memory model counts for it (``.memory``)."""
        from finetune.methods import get_method

        return get_method(self.name)

    @property
    def base_quant_bits(self) -> int | None:
        """Bits of the frozen base when the method quantizes it, else None."""
        return self.quant_bits if self.method.memory.quantized else None


def methods() -> tuple[str, ...]:
    """Every name ``--method`` accepts: the registry's canonical names and aliases."""
    from finetune.methods import all_names

    return all_names()


def trainable_params(shape: ModelShape, method: MethodSpec) -> int:
    """Trainable parameter count, from the method's ``memory.trainable_params`` (``finetune/methods/<m>.py``): all
    for full; ``r·(in+out)`` per adapted linear per layer for LoRA/QLoRA; ``virtual_tokens × layers × 2 × kv_dim``
    for P-Tuning v2; ``virtual_tokens × hidden`` for prompt tuning.
    """
    return method.method.memory.trainable_params(shape, method)


@dataclass(frozen=True)
class ModelStates:
    """Model-state bytes: per GPU, per node in CPU memory, per node on NVMe."""

    gpu: int
    cpu: int
    nvme: int = 0


def model_state_bytes(
    *,
    trainable: int,
    largest_layer_params: int,
    zero_stage: int,
    frozen: int = 0,
    frozen_bytes_per_param: float = 2.0,
    offload_optimizer: str = "none",
    offload_params: str = "none",
    gpus_per_node: int = 1,
    nodes: int = 1,
    precision: str = "bf16",
    additional_buffer_factor: float = CPU_BUFFER_FACTOR,
    zero_init: bool = True,
    load_bytes_per_param: int = 4,
) -> ModelStates:
    """Weights + gradients + Adam states per GPU and per node (CPU, NVMe); see the module docstring.

    With ``frozen=0``, mixed precision and ``load_bytes_per_param=4`` this equals DeepSpeed's
    ``estimate_zero2_model_states_mem_needs`` (stage 2; ``cpu_offload`` ≡ ``offload_optimizer="cpu"``) and
    ``estimate_zero3_model_states_mem_needs`` (stage 3; ``cpu_offload_params`` ≡ ``offload_params="cpu"``).
    NVMe is modelled as the CPU case with the offloaded bytes moved to ``nvme`` and DeepSpeed's swap buffers
    (``NVME_*``) kept in CPU memory.

    Args:
        trainable: parameters with gradients and optimizer state.
        largest_layer_params: DeepSpeed's largest-layer count (stage 3 gathers one layer at a time).
        zero_stage: 0-3.
        frozen: parameters without gradients (PEFT base weights).
        frozen_bytes_per_param: 2 (16-bit), 4 (fp32) or ``QUANT_BYTES[bits]``.
        offload_optimizer: ``none``, ``cpu`` or ``nvme``.
        offload_params: ``none``, ``cpu`` or ``nvme`` (stage 3 only).
        gpus_per_node: GPUs (ranks) per node.
        nodes: nodes.
        precision: ``bf16``/``fp16`` (mixed: 2-byte weights and grads + 16 bytes of fp32 state) or ``fp32``
            (4-byte weights and grads, the same 16 bytes of fp32 partitions).
        additional_buffer_factor: DeepSpeed's CPU multiplier.
        zero_init: stage 3 with ``deepspeed.zero.Init`` (HF does this under ZeRO-3), so no rank holds the whole model.
        load_bytes_per_param: bytes per parameter when each rank loads the checkpoint (DeepSpeed assumes fp32: 4).

    Returns:
        :class:`ModelStates` in bytes.
    """
    n_gpus = gpus_per_node * nodes
    w = 4 if precision == "fp32" else 2  # weights as trained
    g = w  # gradients in the training dtype
    opt = 16  # fp32 master 4 + fp32 gradient partition 4 + Adam m and v 8
    total = trainable + frozen
    base = frozen * frozen_bytes_per_param
    f = additional_buffer_factor
    load = total * load_bytes_per_param * gpus_per_node * f  # each rank loads the model before DeepSpeed shards it
    nvme = 0
    opt_off = offload_optimizer != "none"
    par_off = offload_params != "none"

    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: expected 0-3")
    if message := rules.first_error(rules.check(zero_stage, offload_optimizer, offload_params), rules.ARGUMENT_KEYS):
        raise ValueError(message)
    if zero_stage in (0, 1, 2):
        if zero_stage == 0:
            gpu = (w + g + opt) * trainable + base
            cpu = load
        elif opt_off:
            # DeepSpeed stage 2 offload: only 16-bit weights stay on the GPU; grads are reduced into a CPU buffer.
            # For full fine-tuning DeepSpeed's P·max(4N, 16) already exceeds the load peak P·4·gpn; for PEFT the
            # load peak of the frozen base can be the larger one, so take the max (full: unchanged, still exact).
            gpu = w * trainable + base
            cpu = max(trainable * max(4 * n_gpus, 16), total * load_bytes_per_param * gpus_per_node) * f
        elif zero_stage == 1:
            gpu = (w + g) * trainable + base + int(opt * trainable / n_gpus)
            cpu = load
        else:
            gpu = w * trainable + base + int((g + opt) * trainable / n_gpus)
            cpu = load
        return ModelStates(gpu=int(gpu), cpu=int(cpu))

    gathered = 4 * largest_layer_params  # DeepSpeed: largest_layer_memory = 4 × largest_layer_params
    weights = w * trainable + base  # 16-bit weights (trainable + frozen base), partitioned over all GPUs
    states = opt * trainable  # fp32 partitions; stage 3 keeps no separate 16-bit gradient partition in the estimate
    gpus_factor = 1 / nodes  # same expression order as DeepSpeed, so the float results are bit-identical
    partitioned_on_gpu = 0.0  # bytes summed over all GPUs, divided once (DeepSpeed: int(18 * P / N))
    on_cpu = 0.0  # bytes over the whole job, before the per-node factor
    cpu_buffers = 0.0  # NVMe swap buffers, per node
    if opt_off:
        if offload_optimizer == "nvme":
            nvme += states * gpus_factor
            cpu_buffers += NVME_OPT_BUFFERS * min(NVME_SUB_GROUP, math.ceil(trainable / n_gpus)) * 4 * gpus_per_node
        else:
            on_cpu += states
    else:
        partitioned_on_gpu += states
    if par_off:
        if offload_params == "nvme":
            nvme += weights * gpus_factor
            cpu_buffers += NVME_PARAM_BUFFER_BYTES * gpus_per_node
        else:
            on_cpu += weights
    else:
        partitioned_on_gpu += weights
    gpu = gathered + int(partitioned_on_gpu / n_gpus)
    if not opt_off and not par_off:
        # zero.Init: each rank materialises one layer at a time while loading.
        cpu = largest_layer_params * 4 * gpus_per_node * f if zero_init else load
    elif zero_init:
        cpu = on_cpu * gpus_factor * f + cpu_buffers
    else:
        cpu = max(total * load_bytes_per_param * gpus_per_node, on_cpu * gpus_factor) * f + cpu_buffers
    return ModelStates(gpu=int(gpu), cpu=int(cpu), nvme=int(nvme))


def layer_activation_bytes(shape: ModelShape, *, seq_len: int, micro_batch: int, precision: str = "bf16") -> int:
    """Bytes autograd saves for one decoder layer's backward (SDPA attention, no dropout), e = element size.

    Gated MLP (Llama/Qwen/Mistral, HF RMSNorm computing in fp32): two norms × (fp32 input 4h + normalised e·h +
    output e·h), Q e·h, K and V 2·e·kv, attention output e·h, gate, up, act(gate) and their product 4·e·I:
    ``sb(8h + 6e·h + 2e·kv + 4e·I)`` — ``sb(20h + 4kv + 8I)`` in 16-bit. GPT-2 (LayerNorms in the training dtype:
    input + output each, the fused QKV output 3e·h plus contiguous Q and V copies 2e·h, attention output e·h; its
    ``gelu_new`` is four element-wise ops, so fc output + 3 GELU intermediates + c_proj input 5e·I):
    ``sb(10e·h + 5e·I)``. Both checked against the tensors autograd actually saves
    (``torch.autograd.graph.saved_tensors_hooks``) in tests/unit/ds_configs/test_memory.py.
    """
    s, b, h = seq_len, micro_batch, shape.hidden_size
    e = 4 if precision == "fp32" else 2
    if shape.gated_mlp:
        return s * b * (8 * h + 6 * e * h + 2 * e * shape.kv_dim + 4 * e * shape.intermediate_size)
    return s * b * (10 * e * h + 5 * e * shape.intermediate_size)


def activation_bytes(
    shape: ModelShape,
    *,
    seq_len: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    precision: str = "bf16",
) -> dict[str, int]:
    """Activation memory per GPU for one micro batch (see the module docstring for the formula and its source).

    Without checkpointing every layer's saved tensors (:func:`layer_activation_bytes`) live until backward; with HF
    gradient checkpointing (one checkpoint per layer) only each layer's input (e·sbh) is kept, plus one layer's
    tensors while it is recomputed in backward. The final norm and the lm_head input add ``sb(4h + 2e·h)``
    (GPT-2: ``sb·2e·h``).
    Logits: the peak around the loss is 16-bit logits + their fp32 upcast + the fp32 log-softmax saved for
    backward (2 + 4 + 4 bytes per logit; fp32 training: 4 + 4 + 4).

    Returns:
        ``{"layers": …, "logits": …}`` in bytes.
    """
    s, b, h, L = seq_len, micro_batch, shape.hidden_size, shape.num_layers
    e = 4 if precision == "fp32" else 2
    per_layer = layer_activation_bytes(shape, seq_len=s, micro_batch=b, precision=precision)
    # final norm (fp32 input for RMSNorm; LayerNorm keeps the training dtype) and the lm_head input
    final = s * b * (4 * h + 2 * e * h) if shape.gated_mlp else s * b * 2 * e * h
    if gradient_checkpointing:
        layers = e * s * b * h * L + per_layer + final
    else:
        layers = per_layer * L + final
    logits = (12 if precision == "fp32" else 10) * s * b * shape.vocab_size
    return {"layers": int(layers), "logits": int(logits)}


TILE_BYTES = 1 << 28  # fp32 logits of one tile of the tiled loss (finetune/tiled_loss.py)
TILED_AUTO_MIN_BYTES = 1 << 30  # train.tiled_loss=auto tiles above this many bytes of fp32 logits per micro batch
TILED_LOSS_MODES = ("auto", "always", "never")


def tiles_loss(mode: str, *, tokens_per_micro_batch: int, vocab_size: int) -> bool:
    """Whether ``train.tiled_loss=mode`` tiles (for a model the tiled loss supports): ``auto`` when the micro batch's
    fp32 logits would exceed :data:`TILED_AUTO_MIN_BYTES`."""
    if mode not in TILED_LOSS_MODES:
        raise ValueError(f"train.tiled_loss={mode!r}: expected one of {TILED_LOSS_MODES}")
    if mode == "auto":
        return 4 * vocab_size * tokens_per_micro_batch > TILED_AUTO_MIN_BYTES
    return mode == "always"


def tile_tokens(vocab_size: int) -> int:
    """Tokens per tile of the tiled loss: one tile's fp32 logits take about :data:`TILE_BYTES`."""
    return max(128, TILE_BYTES // (4 * max(1, vocab_size)))


def tiled_logits_bytes(shape: ModelShape, *, precision: str, head_trains: bool) -> int:
    """Peak bytes of the tiled loss around the head (see the module docstring)."""
    e = 4 if precision == "fp32" else 2
    v = shape.vocab_size
    return tile_tokens(v) * v * (4 + e) + (4 * v * shape.hidden_size if head_trains else 0)


def dense_mask_bytes(*, seq_len: int, micro_batch: int, precision: str = "bf16") -> int:
    """A dense block-diagonal mask for one micro batch: the loader's bool (B, 1, T, T) and the additive float mask
    of the training dtype SDPA turns it into (kept for backward): ``B·T²·(1 + e)`` bytes (e = 2, fp32: 4).
    At T = 8192 that is 201 MB per row in bf16: why GPUs take the position-id kernels when one fits."""
    e = 4 if precision == "fp32" else 2
    return micro_batch * seq_len * seq_len * (1 + e)


def buffer_bytes(shape: ModelShape, *, zero_stage: int, trainable: int, method: MethodSpec) -> int:
    """Communication buckets and QLoRA dequantisation scratch, per GPU (bucket sizes as build.render_ds_config)."""
    h = shape.hidden_size
    out = 0
    if zero_stage in (1, 2):
        bucket = min(comm_bucket(h, STAGE12_BUCKET), trainable)
        out += int(4.5 * 2 * bucket * 2)  # DeepSpeed docs: overlap_comm holds 4.5 × (reduce + allgather) buckets
    elif zero_stage == 3:
        reduce_b = min(comm_bucket(h, STAGE3_REDUCE_BUCKET), trainable)
        prefetch = int(0.9 * h * h) if h else STAGE3_PREFETCH_BUCKET
        out += 2 * (reduce_b + prefetch) * 2
    if method.base_quant_bits is not None:
        out += 2 * max(i * o for _, i, o in shape.layer_linears)  # one linear dequantised to 16-bit at a time
    return out


@dataclass
class Estimate:
    """A full per-GPU / per-node estimate with its parts (bytes), for one configuration."""

    parts_gpu: dict[str, int]
    cpu: int
    nvme: int
    trainable: int
    margin_fraction: float = MARGIN_FRACTION
    margin_fixed: int = MARGIN_FIXED_BYTES
    notes: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> int:
        """Estimated peak allocated GPU bytes (comparable to ``torch.cuda.max_memory_allocated``)."""
        return sum(self.parts_gpu.values())

    @property
    def gpu_with_margin(self) -> int:
        """GPU bytes the device must have: estimate × (1 + fraction) + fixed."""
        return int(self.gpu * (1 + self.margin_fraction) + self.margin_fixed)


def _qlora_base_bytes(shape: ModelShape, bits: int, rest_bytes: int) -> float:
    """Bytes of a QLoRA base: quantised decoder linears plus the rest (embeddings, lm_head, norms) at ``rest_bytes``."""
    quant = shape.quantizable_params
    return quant * QUANT_BYTES[bits] + (shape.total_params - quant) * rest_bytes


def estimate(
    shape: ModelShape,
    method: MethodSpec,
    *,
    zero_stage: int,
    offload_optimizer: str = "none",
    offload_params: str = "none",
    gpus_per_node: int = 1,
    nodes: int = 1,
    seq_len: int,
    micro_batch: int,
    gradient_checkpointing: bool = True,
    precision: str = "bf16",
    dense_mask: bool = False,
    tiled_loss: str = "auto",
) -> Estimate:
    """Estimate GPU (per GPU), CPU (per node) and NVMe (per node) bytes for one configuration.

    ``dense_mask``: packed rows reach the kernel as a dense (B, 1, T, T) block mask (SDPA: CPU, or a GPU fallback when
    no varlen kernel fits the model and precision, see ``finetune.attention``): counted in ``activations``.
    ``tiled_loss``: ``train.tiled_loss``; when it tiles (:func:`tiles_loss`) ``logits`` is one tile's, not ``bsV``'s.

    Raises:
        ValueError: an impossible combination (parameter offload below stage 3, NVMe below stage 3 …).
    """
    terms = method.method.memory
    bits = method.base_quant_bits
    violations = rules.check(zero_stage, offload_optimizer, offload_params, quant_bits=bits, quantized_by=method.name)
    if message := rules.first_error(violations, rules.ARGUMENT_KEYS):
        raise ValueError(message)
    trainable = trainable_params(shape, method)
    # Added parameters (adapters, prompts) leave the whole base frozen; a method that trains base weights (full, a
    # head-only method) freezes the rest.
    frozen = shape.total_params - trainable if terms.trains_base else shape.total_params
    if bits is not None:
        # Quantised: the decoder linears; embeddings, lm_head and norms stay 16-bit.
        fb = _qlora_base_bytes(shape, bits, rest_bytes=2) / shape.total_params
    else:
        fb = 4.0 if precision == "fp32" else 2.0
    states = model_state_bytes(
        trainable=trainable,
        frozen=frozen,
        frozen_bytes_per_param=fb,
        largest_layer_params=shape.largest_layer_params,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        precision=precision,
        load_bytes_per_param=terms.load_bytes_per_param,
    )
    if bits is not None and zero_stage == 3:
        # bitsandbytes does not load under zero.Init: each rank places the whole quantised base on its GPU (the
        # rest in the training dtype: finetune/methods/qlora.py does not upcast it) before deepspeed.initialize
        # partitions it.
        load_peak = _qlora_base_bytes(shape, bits, rest_bytes=4 if precision == "fp32" else 2)
        states = ModelStates(gpu=max(states.gpu, int(load_peak)), cpu=states.cpu, nvme=states.nvme)
    seq = seq_len + terms.extra_tokens(method)
    acts = activation_bytes(
        shape, seq_len=seq, micro_batch=micro_batch, gradient_checkpointing=gradient_checkpointing, precision=precision
    )
    mask = dense_mask_bytes(seq_len=seq, micro_batch=micro_batch, precision=precision) if dense_mask else 0
    logits = acts["logits"]
    if tiles_loss(tiled_loss, tokens_per_micro_batch=seq * micro_batch, vocab_size=shape.vocab_size):
        logits = tiled_logits_bytes(shape, precision=precision, head_trains=terms.trains_base)
    parts = {
        "model_states": states.gpu,
        "activations": acts["layers"] + mask,
        "logits": logits,
        "buffers": buffer_bytes(shape, zero_stage=zero_stage, trainable=trainable, method=method),
    }
    return Estimate(parts_gpu=parts, cpu=states.cpu, nvme=states.nvme, trainable=trainable, notes=list(shape.notes))
