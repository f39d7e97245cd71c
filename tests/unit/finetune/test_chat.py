"""``dsft chat`` (``finetune.chat``) and its shared generation code (``finetune.generation``) on the tiny Llama:
batch mode, interactive mode under a pty, PEFT adapter folders and ``--adapter``, and bad input.

The demo-trained model (answers that match the demo's accuracy) is tested in ``tests/recipes/test_demo.py``."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune import chat, generation

REPO = Path(__file__).resolve().parents[3]
QUESTIONS = ["Add: 3 6 + 1 9", "hello", "What is 12 plus 30?", "Reverse the word banana"]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _one_by_one(loaded, conversations, max_new_tokens):
    """Each conversation alone (no padding at all): what a correct left-padded batch must reproduce."""
    decoding = generation.Decoding(max_new_tokens=max_new_tokens, batch_size=1)
    return generation.generate_answers(loaded, conversations, decoding)


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return generation.load_for_generation(tiny_llama_dir, device="cpu", dtype="float32")


def test_loads_the_folder_template_and_generation_config_stop_ids(loaded, tiny_llama_dir):
    tok = loaded.tokenizer
    assert loaded.stop_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert str(tiny_llama_dir / "generation_config.json") in loaded.stop_source
    assert "saved with the model" in loaded.template_source and tok.padding_side == "left"


def test_batch_mode_one_line_per_record_in_order(tmp_path, tiny_llama_dir, loaded, capsys):
    """prompt and messages records, ids kept, references scored; left-padded batches give the one-by-one answers."""
    rows = [
        {"prompt": QUESTIONS[0], "id": "a"},
        "",  # blank lines are skipped; the output says each answer's input line
        {"messages": [{"role": "user", "content": QUESTIONS[1]}]},
        {"messages": [{"role": "user", "content": QUESTIONS[2]}, {"role": "assistant", "content": "42"}], "id": 3},
        {"prompt": QUESTIONS[3], "answer": "ananab"},
    ]
    prompts, out = _write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    argv = [str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "12"]
    assert chat.main([*argv, "--batch-size", "3", "--device", "cpu"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["line"] for g in got] == [1, 3, 4, 5]
    assert [g.get("id") for g in got] == ["a", None, 3, None]
    assert [g.get("reference") for g in got] == [None, None, "42", "ananab"]
    expected = _one_by_one(loaded, [[{"role": "user", "content": q}] for q in QUESTIONS], 12)
    assert [g["answer"] for g in got] == expected
    assert all(g["exact_match"] == (g["answer"].strip() == g["reference"]) for g in got[2:])
    err = capsys.readouterr().err
    assert "[chat] chat template: the tokenizer saved with the model" in err and "stops on [2 '<|im_end|>']" in err


def test_greedy_is_the_default_and_sampling_follows_the_seed(tmp_path, tiny_llama_dir):
    prompts, out = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": q} for q in QUESTIONS]), tmp_path / "o.jsonl"

    def answers(*extra: str) -> list[str]:
        assert chat.main([str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out), *extra]) == 0
        return [json.loads(line)["answer"] for line in out.read_text().splitlines()]

    greedy = answers("--max-new-tokens", "10")
    assert answers("--max-new-tokens", "10", "--greedy", "--seed", "5") == greedy
    sampled = answers("--max-new-tokens", "10", "--temperature", "1.5", "--seed", "1")
    assert sampled != greedy  # a near-uniform random model at T=1.5 never reproduces 4 greedy answers
    assert answers("--max-new-tokens", "10", "--temperature", "1.5", "--seed", "1") == sampled


def test_interactive_mode_under_a_pty_streams_and_keeps_the_conversation(tiny_llama_dir, loaded):
    """A real terminal: ask, read the streamed answer, ask again (history kept), /reset, /exit."""
    import pty

    first = [{"role": "user", "content": QUESTIONS[0]}]
    answer1 = _one_by_one(loaded, [first], 8)[0]
    second = [*first, {"role": "assistant", "content": answer1}, {"role": "user", "content": QUESTIONS[1]}]
    answer2 = _one_by_one(loaded, [second], 8)[0]
    after_reset = _one_by_one(loaded, [[{"role": "user", "content": QUESTIONS[1]}]], 8)[0]
    assert answer2 != after_reset, "the test needs the history to change the answer"

    controller, terminal = pty.openpty()
    cmd = [sys.executable, "-m", "finetune.chat", str(tiny_llama_dir), "--max-new-tokens", "8", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdin=terminal, stdout=terminal, stderr=subprocess.PIPE, cwd=REPO, env=_env())
    os.close(terminal)
    buf = b""

    def read_until_prompt(timeout: float = 120) -> str:
        """Terminal output up to the next '>>> ' prompt (the answer streamed before it)."""
        nonlocal buf
        deadline = time.monotonic() + timeout
        while b">>> " not in buf:
            assert time.monotonic() < deadline and proc.poll() is None, f"no prompt; got {buf!r}"
            if select.select([controller], [], [], 0.5)[0]:
                buf += os.read(controller, 4096)
        text, _, buf = buf.partition(b">>> ")
        return text.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def ask(line: str) -> str:
        os.write(controller, line.encode() + b"\n")
        shown = read_until_prompt()
        assert shown.startswith(line), shown  # the terminal echoes the question
        return shown[len(line) :].strip("\n")

    try:
        read_until_prompt()
        assert ask(QUESTIONS[0]) == answer1.strip("\n")
        assert ask(QUESTIONS[1]) == answer2.strip("\n")
        assert ask("/reset") == "(conversation cleared)"
        assert ask(QUESTIONS[1]) == after_reset.strip("\n")
        os.write(controller, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    assert "type a message" in proc.stderr.read().decode()


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_llama_dir):
    """A LoRA adapter folder on the tiny Llama with non-zero weights (PEFT's default init is a no-op B = 0) and a
    generation_config.json that stops on <|endoftext|> too, written the way final/ is (export.save_for_serving)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export import save_for_serving

    out = tmp_path_factory.mktemp("lora_adapter")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    save_for_serving(model, out, stops, peft=True)
    return out, stops


def test_adapter_folder_and_adapter_flag_load_the_same_model(tmp_path, tiny_llama_dir, lora_adapter, loaded):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, stops = lora_adapter
    on_folder = generation.load_for_generation(adapter, device="cpu")
    with_flag = generation.load_for_generation(tiny_llama_dir, adapter=adapter, device="cpu")
    for m in (on_folder, with_flag):
        assert m.adapter_dir == adapter and m.stop_ids == stops  # the adapter folder's generation_config.json
        assert isinstance(m.model, PeftModel)
    assert on_folder.base_dir == str(tiny_llama_dir)  # from adapter_config.json base_model_name_or_path
    assert "saved with the model" not in on_folder.template_source  # the folder has no tokenizer: the base's

    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    decoding = generation.Decoding(max_new_tokens=10)
    answers = generation.generate_answers(on_folder, convs, decoding)
    assert generation.generate_answers(with_flag, convs, decoding) == answers
    assert answers != generation.generate_answers(loaded, convs, decoding), "the adapter changed nothing"
    # and it is PEFT's own adapter model: first answer == PeftModel.from_pretrained + generate by hand
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, adapter).eval()
    tok = on_folder.tokenizer
    ids = tok(generation.render_prompt(tok, convs[0]), return_tensors="pt", add_special_tokens=False)
    out = ref.generate(**ids, max_new_tokens=10, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    new = generation.cut_at_stop(out[0, ids["input_ids"].shape[1] :].tolist(), stops)
    assert tok.decode(new, skip_special_tokens=True) == answers[0]

    # the CLI, both ways
    prompts, out_file = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": q} for q in QUESTIONS]), tmp_path / "o.jsonl"
    for argv in ([str(adapter)], [str(tiny_llama_dir), "--adapter", str(adapter)]):
        rc = chat.main([*argv, "--prompts", str(prompts), "--out", str(out_file), "--max-new-tokens", "10"])
        assert rc == 0 and [json.loads(line)["answer"] for line in out_file.read_text().splitlines()] == answers


def test_run_dir_uses_final_and_serving_json(tmp_path, tiny_llama_dir, tiny_tokenizer):
    """A run dir whose final/ has no template and no generation_config: serving.json supplies both."""
    import shutil

    run = tmp_path / "run"
    final = run / "final"
    shutil.copytree(tiny_llama_dir, final)
    (final / "generation_config.json").unlink()
    cfg = json.loads((final / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (final / "tokenizer_config.json").write_text(json.dumps(cfg))
    if (final / "chat_template.jinja").exists():
        (final / "chat_template.jinja").unlink()
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    stop = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    (run / "serving.json").write_text(json.dumps({"chat_template": template, "stop_token_ids": [stop]}))
    m = generation.load_for_generation(run, device="cpu")
    assert m.model_dir == final and m.run_dir == run
    assert m.stop_ids == [stop] and "serving.json" in m.stop_source
    assert m.tokenizer.chat_template == template and "serving.json" in m.template_source
    assert generation.render_prompt(m.tokenizer, [{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"question": "hi"}', 'a record needs "messages"'),
        ("{not json", "not valid JSON"),
        ('{"messages": [{"role": "user"}]}', 'messages[0] must be an object with string "role" and "content"'),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "a turn for the assistant to answer"),
        ('{"prompt": 3}', '"prompt" must be a string'),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_prompts_line_exits_2_with_file_and_line(tmp_path, tiny_llama_dir, capsys, line, why):
    prompts = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "fine"}, line])
    assert chat.main([str(tiny_llama_dir), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {prompts}:2: ") and why in err[0], err


def test_not_a_model_exits_2_with_the_path(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text("")
    for path, why in [
        (empty, "not a model directory"),
        (tmp_path / "missing", "no such directory"),
        (unfinished, "a run directory without final/"),
    ]:
        assert chat.main([str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}: ") and why in err and "\n" not in err, err


def test_bad_weights_and_bad_options_exit_2(tmp_path, tiny_llama_dir, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights
    assert chat.main([str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {broken}: cannot load the model")
    assert chat.main([str(tiny_llama_dir), "--greedy", "--temperature", "0.7"]) == 2
    assert "pick one" in capsys.readouterr().err
    assert chat.main([str(tiny_llama_dir), "--adapter", str(tiny_llama_dir)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_help_shows_a_runnable_example(capsys):
    with pytest.raises(SystemExit) as e:
        chat.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dsft chat") and "dsft chat demo_out/run --prompts" in out


def test_cut_at_stop():
    assert generation.cut_at_stop([5, 6, 2, 7], [2]) == [5, 6]
    assert generation.cut_at_stop([5, 6], [2, 9]) == [5, 6]
    assert generation.cut_at_stop([9, 2], [2, 9]) == []


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prompt_learning_adapters_batch_like_one_by_one(tmp_path, tiny_llama_dir, kind):
    """PEFT prepends virtual tokens before the left padding, so these adapters are batched by prompt length only
    (left-padded batches measurably changed their greedy answers)."""
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    config = {"prefix": PrefixTuningConfig, "prompt": PromptTuningConfig}[kind]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    get_peft_model(base, config(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).save_pretrained(tmp_path)
    m = generation.load_for_generation(tmp_path, device="cpu")
    assert m.prompt_learning
    convs = [[{"role": "user", "content": q}] for q in ["a", *QUESTIONS, "b"]]  # "a" and "b": one length, batched
    batched = generation.generate_answers(m, convs, generation.Decoding(max_new_tokens=6, batch_size=8))
    assert batched == _one_by_one(m, convs, 6)
