"""Load a trained model the way it was trained and generate from it: the one code path behind ``dsft chat``,
``dsft eval`` and the demo's accuracy.

    loaded = load_for_generation("runs/lora")            # a run dir, its final/, a model or an adapter folder
    answers = generate_answers(loaded, [[{"role": "user", "content": "Add: 1 2 + 3 4"}]], Decoding(max_new_tokens=8))

What "the way it was trained" means:

* the chat template: the one stored with the model (the tokenizer in ``final/``, which the engine gives the template
  the data was rendered with), else the run's ``serving.json``, else the tokenizer's own, else dsft's default (what
  the converter would render with for that tokenizer; ``data_tools.templates.resolve_chat_template``);
* the stop tokens: ``generation_config.json`` beside the weights or adapter (the end-of-turn ids the data taught,
  ``finetune.export.save_for_serving``), else ``serving.json``, else the tokenizer's eos.

Generation is batched with left padding (new tokens go on the right), each answer is cut at its first stop token and
decoded without special tokens, then whitespace-stripped by the scorers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.export import SERVING_FILE, read_serving

# 16 prompts per generate() call: fills a small GPU without a 7B model's KV cache for 256 new tokens outgrowing it.
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 256
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class GenerationError(ValueError):
    """Bad input to chat/eval (not a model, a bad prompts line); the message starts with the path (and line)."""


@dataclass
class LoadedModel:
    """A model ready for ``generate`` with the template and stop tokens it was trained with.

    Attributes:
        model: the model in eval mode (a ``PeftModel`` for adapters), on ``device``.
        tokenizer: its tokenizer, left-padded, with a pad token and the chat template in use.
        stop_ids: token ids generation stops on.
        template_source: where the chat template came from, in words (printed on stderr by the CLIs).
        stop_source: where the stop ids came from, in words.
        model_dir: the folder the weights (or the adapter) came from.
        run_dir: the run's ``output_dir`` when known (its ``config.json`` / ``serving.json``), else None.
        adapter_dir: the adapter folder applied, else None.
        base_dir: the base model an adapter was applied to, else None.
    """

    model: Any
    tokenizer: Any
    stop_ids: list[int]
    template_source: str
    stop_source: str
    model_dir: Path
    run_dir: Path | None = None
    adapter_dir: Path | None = None
    base_dir: str | None = None

    @property
    def device(self):
        return self.model.device

    @property
    def prompt_learning(self) -> bool:
        """A prefix / prompt-tuning adapter: virtual tokens the model prepends itself (no left padding in a batch)."""
        config = getattr(self.model, "active_peft_config", None)
        return bool(getattr(config, "is_prompt_learning", False))

    def describe(self) -> str:
        """Two lines for stderr: what was loaded, and which template / stop tokens are used."""
        what = f"adapter {self.adapter_dir} on base {self.base_dir}" if self.adapter_dir else f"model {self.model_dir}"
        stops = ", ".join(f"{i} {self.tokenizer.convert_ids_to_tokens(i)!r}" for i in self.stop_ids)
        return (
            f"loaded {what} ({self.device}, {next(self.model.parameters()).dtype})\n"
            f"chat template: {self.template_source}; stops on [{stops}] ({self.stop_source})"
        )


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded. Greedy (``temperature == 0``) by default: reproducible, and what eval scores.

    Attributes:
        max_new_tokens: new tokens per answer at most.
        temperature: 0 = greedy; > 0 samples with this temperature.
        top_p: nucleus sampling mass (sampling only).
        batch_size: prompts per ``generate`` call (batch mode / eval).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict[str, Any]:
        """``generate()`` arguments; sampling arguments only when sampling (transformers warns otherwise)."""
        if self.greedy:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


@dataclass
class PromptRecord:
    """One line of a prompts file: the conversation to answer and, when the line has one, the reference answer.

    Attributes:
        line: 1-based line number in the file.
        messages: the turns given to the model (ending with a user turn).
        reference: the expected answer (a trailing assistant turn, ``answer`` or ``completion``), else None.
        id: the record's ``id`` field, when it has one.
    """

    line: int
    messages: list[dict[str, str]]
    reference: str | None = None
    id: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- locating


def resolve_model_path(path: str | Path) -> tuple[Path, Path | None]:
    """``(model_or_adapter_dir, run_dir or None)`` for a run dir, a ``final/``-like dir, a model or an adapter folder.

    Raises:
        GenerationError: ``path`` is not a directory, or holds neither a model, an adapter nor a ``final/``.
    """
    p = Path(path)
    if not p.is_dir():
        raise GenerationError(f"{p}: no such directory (expected a run's output_dir, its final/, a model or adapter)")
    if (p / "final").is_dir():
        return p / "final", p
    if (p / "adapter_config.json").is_file() or ((p / "config.json").is_file() and _is_hf_config(p / "config.json")):
        # final/ inside a run: the run's serving.json is the fallback for the template and stop ids
        run = p.parent if (p.parent / SERVING_FILE).is_file() else None
        return p, run
    if (p / SERVING_FILE).is_file() or (p / "metrics.jsonl").is_file():
        raise GenerationError(
            f"{p}: a run directory without final/ (training has not finished?); export a checkpoint with "
            "`dsft export zero --checkpoint RUN/checkpoints --out DIR` and pass DIR"
        )
    raise GenerationError(
        f"{p}: not a model directory (no config.json or adapter_config.json) and not a run directory (no final/); "
        "pass a run's output_dir, its final/, a save_pretrained model or a PEFT adapter folder"
    )


def _is_hf_config(path: Path) -> bool:
    """A transformers ``config.json`` (has ``model_type``), not a run's ``config.json`` (the dsft config tree)."""
    try:
        return "model_type" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``.

    Raises:
        GenerationError: ``cuda`` asked for on a machine without one.
    """
    import torch

    if device not in DEVICE_CHOICES:
        raise GenerationError(f"--device {device}: expected one of {', '.join(DEVICE_CHOICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    """``auto`` -> float32 on CPU (bf16 matmuls are slower there), bf16 on GPUs that have it, else fp16."""
    import torch

    if dtype not in DTYPE_CHOICES:
        raise GenerationError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_CHOICES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --------------------------------------------------------------------------------------------------- loading


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file()


def _load_weights(name_or_path: str | Path, dtype, device: str, where: str):
    """``from_pretrained`` with safetensors only (as training loads: a pickled .bin is refused, never unpickled).
    On a GPU the weights are placed there as they load, never held whole in host memory first."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": {"": device}} if device != "cpu" else {}
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True, **placement)
    except (OSError, ValueError, KeyError) as e:
        raise GenerationError(f"{where}: cannot load the model: {e}") from e


def load_for_generation(
    path: str | Path,
    adapter: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """Load a model for generation with its trained chat template and stop tokens.

    Args:
        path: a run's ``output_dir`` (its ``final/`` is loaded), a ``final/``-like full model dir, a PEFT adapter
            folder (its base is ``base_model_name_or_path`` from ``adapter_config.json``) or a merged model.
        adapter: a PEFT adapter folder (or a run dir of a PEFT run) applied onto the model at ``path``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``.

    Raises:
        GenerationError: a path that is not a model / adapter, or weights that do not load.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model_dir, run_dir = resolve_model_path(path)
    adapter_dir = None
    if adapter is not None:
        adapter_dir, adapter_run = resolve_model_path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise GenerationError(f"{adapter}: --adapter needs a PEFT adapter folder (no adapter_config.json there)")
        if (model_dir / "adapter_config.json").is_file():
            raise GenerationError(f"{path}: is an adapter folder itself; pass a full model with --adapter")
        base_dir = str(model_dir)
        run_dir = adapter_run or run_dir
    elif (model_dir / "adapter_config.json").is_file():
        adapter_dir = model_dir
        base_dir = _adapter_base(adapter_dir)
    else:
        base_dir = None

    if adapter_dir is not None:
        from peft import PeftModel

        base = _load_weights(base_dir, torch_dtype, dev, f"{adapter_dir}/adapter_config.json base_model_name_or_path")
        try:
            model = PeftModel.from_pretrained(base, adapter_dir)
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: adapter shapes that do not fit the base
            raise GenerationError(f"{adapter_dir}: cannot apply the adapter to {base_dir}: {e}") from e
        weights_dir = adapter_dir
    else:
        model = _load_weights(model_dir, torch_dtype, dev, str(model_dir))
        weights_dir = model_dir
    model.to(dev).eval()  # the adapter's weights too

    serving = read_serving(run_dir) if run_dir else None
    tok_dir = weights_dir if _has_tokenizer(weights_dir) else Path(base_dir) if base_dir else weights_dir
    tokenizer, template_source = _load_tokenizer(tok_dir, weights_dir, run_dir, serving)
    stop_ids, stop_source = _stop_ids(weights_dir, tokenizer, run_dir, serving)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = stop_ids[0]  # pads are masked out; any id works, and a stop id is always there
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        stop_ids=stop_ids,
        template_source=template_source,
        stop_source=stop_source,
        model_dir=model_dir,
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        base_dir=base_dir,
    )


def _adapter_base(adapter_dir: Path) -> str:
    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise GenerationError(f"{adapter_dir}/adapter_config.json: cannot read it: {e}") from e
    if not base:
        raise GenerationError(
            f"{adapter_dir}/adapter_config.json: no base_model_name_or_path; pass the base model as MODEL_DIR and "
            f"the adapter with --adapter {adapter_dir}"
        )
    return base


def _load_tokenizer(tok_dir: Path, weights_dir: Path, run_dir: Path | None, serving: dict | None):
    """The tokenizer, left-padded, with the chat template the run was trained with, and where it came from."""
    from transformers import AutoTokenizer

    from data_tools.formats import FormatError
    from data_tools.templates import resolve_chat_template

    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise GenerationError(f"{tok_dir}: cannot load the tokenizer: {e}") from e
    tok.padding_side = "left"  # generate() appends on the right, so pads go left
    own = tok.chat_template if not isinstance(tok.chat_template, dict) else tok.chat_template.get("default")
    trained = (serving or {}).get("chat_template")
    if own and tok_dir == weights_dir:
        source = f"the tokenizer saved with the model ({tok_dir})"
        if trained and trained != own:
            print(
                f"[dsft] WARNING {tok_dir}'s chat template differs from {run_dir}/{SERVING_FILE}'s (the one the data "
                "was rendered with); using the folder's",
                file=sys.stderr,
            )
    elif trained:
        tok.chat_template = trained
        source = f"{run_dir}/{SERVING_FILE} (the template the training data was rendered with)"
    elif own:
        source = f"the tokenizer's own ({tok_dir}); no template was stored with the run"
    else:
        try:
            template = resolve_chat_template(tok)
        except FormatError as e:
            raise GenerationError(f"{tok_dir}: {e}") from e
        tok.chat_template = template.text
        source = f"dsft's default (ChatML layout; {tok_dir} has no chat template and none was stored with the run)"
    return tok, source


def _stop_ids(weights_dir: Path, tokenizer, run_dir: Path | None, serving: dict | None) -> tuple[list[int], str]:
    from transformers import GenerationConfig

    if (weights_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(weights_dir).eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if ids:
            return ids, f"{weights_dir}/generation_config.json"
    if serving and serving.get("stop_token_ids"):
        return list(serving["stop_token_ids"]), f"{run_dir}/{SERVING_FILE}"
    if tokenizer.eos_token_id is None:
        raise GenerationError(
            f"{weights_dir}: no stop token: no generation_config.json eos_token_id, no {SERVING_FILE} and the "
            "tokenizer has no eos token"
        )
    return [tokenizer.eos_token_id], "the tokenizer's eos"


# --------------------------------------------------------------------------------------------------- generating


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The conversation rendered with the chat template, ending with the assistant's opening (generation prompt)."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """``ids`` up to (not including) the first stop token. ``generate`` stops there, but a stop id that is not a
    special token would survive ``skip_special_tokens``, and rows that ended early are padded after it."""
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return list(ids[:i])
    return list(ids)


def generate_ids(loaded: LoadedModel, conversations: Sequence[Sequence[dict]], decoding: Decoding, streamer=None):
    """New token ids (cut at the first stop token) for each conversation, in one left-padded ``generate`` call."""
    import torch

    tok = loaded.tokenizer
    prompts = [render_prompt(tok, m) for m in conversations]
    # the template writes bos itself where the tokenizer has one (data_tools.templates), as the converter rendered it
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
    with torch.no_grad():
        out = loaded.model.generate(
            **batch,
            **decoding.generate_kwargs(),
            eos_token_id=loaded.stop_ids,
            pad_token_id=tok.pad_token_id,
            streamer=streamer,
        )
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    return [cut_at_stop(ids, loaded.stop_ids) for ids in new]


def generate_answers(
    loaded: LoadedModel,
    conversations: Sequence[Sequence[dict]],
    decoding: Decoding = Decoding(),
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The model's answer to each conversation, ``decoding.batch_size`` at a time, in order.

    Args:
        loaded: from :func:`load_for_generation`.
        conversations: lists of ``{"role", "content"}`` turns, each ending where the assistant should answer.
        decoding: decoding settings (greedy by default).
        progress: called with ``(done, total)`` after each batch.
    """
    order = list(range(len(conversations)))
    if loaded.prompt_learning:
        # PEFT puts prefix / soft-prompt tokens before the left padding, which shifts the padded prompts' positions
        # (measured: their greedy answers differ from one-by-one ones): batch prompts of equal length only.
        tok = loaded.tokenizer
        lengths = [len(tok(render_prompt(tok, c), add_special_tokens=False)["input_ids"]) for c in conversations]
        order.sort(key=lambda i: lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if not groups or lengths[groups[-1][0]] != lengths[i] or len(groups[-1]) == decoding.batch_size:
                groups.append([])
            groups[-1].append(i)
    else:
        groups = [order[i : i + decoding.batch_size] for i in range(0, len(order), decoding.batch_size)]
    answers: dict[int, str] = {}
    for group in groups:
        for i, ids in zip(group, generate_ids(loaded, [conversations[i] for i in group], decoding), strict=True):
            answers[i] = loaded.tokenizer.decode(ids, skip_special_tokens=True)
        if progress:
            progress(len(answers), len(conversations))
    return [answers[i] for i in range(len(conversations))]


def exact_match(
    loaded: LoadedModel, records: Sequence[PromptRecord], decoding: Decoding = Decoding()
) -> tuple[float, list[dict]]:
    """Answer each record and compare with its reference, both whitespace-stripped.

    Returns:
        ``(accuracy, rows)`` with one ``{"line", "prompt", "expected", "got", "ok"}`` row per record (``prompt``:
        the last user turn).
    """
    missing = [r.line for r in records if r.reference is None]
    if missing:
        raise GenerationError(f"line {missing[0]}: no reference answer to score against")
    answers = generate_answers(loaded, [r.messages for r in records], decoding)
    rows = []
    for r, got in zip(records, answers, strict=True):
        expected, got = r.reference.strip(), got.strip()
        rows.append({"line": r.line, "prompt": r.messages[-1]["content"], "expected": expected, "got": got})
        rows[-1]["ok"] = got == expected
    accuracy = sum(row["ok"] for row in rows) / max(len(rows), 1)
    return accuracy, rows


# --------------------------------------------------------------------------------------------------- prompt files


def parse_prompt_record(obj: Any, line: int, system: str | None = None) -> PromptRecord:
    """One prompts-file record: ``messages`` (a trailing assistant turn is the reference) or ``prompt`` (one user
    turn; ``answer`` or ``completion`` is the reference). ``system`` is prepended unless a system turn is there.

    Raises:
        GenerationError: ``LINE: what is wrong`` (the caller prefixes the file name).
    """
    if not isinstance(obj, dict):
        raise GenerationError(f"{line}: expected a JSON object, got {type(obj).__name__}")
    reference = None
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise GenerationError(f'{line}: "messages" must be a non-empty list of {{"role", "content"}} objects')
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise GenerationError(f'{line}: messages[{i}] must be an object with string "role" and "content"')
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if msgs[-1]["role"] == "assistant":
            reference = msgs.pop()["content"]
        if not msgs or msgs[-1]["role"] == "assistant":
            raise GenerationError(f"{line}: messages must contain a turn for the assistant to answer (a user turn)")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise GenerationError(f'{line}: "prompt" must be a string (one user turn)')
        msgs = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise GenerationError(
            f'{line}: a record needs "messages" (a list of {{"role", "content"}}) or "prompt" (a string); '
            f"it has {sorted(obj) or 'no keys'}"
        )
    for key in ("answer", "completion"):
        if key in obj:
            if not isinstance(obj[key], str):
                raise GenerationError(f'{line}: "{key}" must be a string (the reference answer)')
            reference = obj[key]
            break
    if system is not None and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return PromptRecord(line=line, messages=msgs, reference=reference, id=obj.get("id"))


def read_prompts(path: str | Path, system: str | None = None, need_reference: bool = False) -> list[PromptRecord]:
    """Records of a prompts ``.jsonl`` (blank lines skipped; see :func:`parse_prompt_record`).

    Raises:
        GenerationError: ``path:LINE: ...`` for the first bad line, or the file cannot be read.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationError(f"{path}: cannot read it: {e}") from e
    records = []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenerationError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
        try:
            record = parse_prompt_record(obj, n, system)
        except GenerationError as e:
            raise GenerationError(f"{path}:{e}") from e
        if need_reference and record.reference is None:
            raise GenerationError(
                f'{path}:{n}: no reference answer to score against: end "messages" with the assistant turn, or give '
                '"answer" (or "completion")'
            )
        records.append(record)
    if not records:
        raise GenerationError(f"{path}: no records (the file is empty)")
    return records
