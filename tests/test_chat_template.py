"""Chat templates (stages.chat_template) and `tokenize_hf --chat` with assistant-only loss masks."""
from __future__ import annotations

import json

import numpy as np
import pytest

jinja2 = pytest.importorskip("jinja2", reason="needs the hf extra (jinja2)")
tokenizers = pytest.importorskip("tokenizers", reason="needs the hf extra (tokenizers)")

from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

from forgetting.formats import chat_template, hf_tokenizer  # noqa: E402

from forgetting.stages import tokenize_hf  # noqa: E402

# SmolLM2-Instruct's template (as in its tokenizer_config.json / GGUF).
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A Llama-3-style template using the globals transformers provides: bos_token, raise_exception,
# strftime_now, tojson, loop controls; and block tags whose whitespace trim_blocks/lstrip_blocks remove.
LLAMA_STYLE = """{{ bos_token }}
{% if tools %}
    {{- "Tools: " + tools | tojson + "\\n" }}
{% endif %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' and not loop.first %}{% continue %}{% endif %}
<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
{% if date %}Today: {{ strftime_now('%Y') }}{% endif %}"""
CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "¿Y 3+3? 🤔"}, {"role": "assistant", "content": "Seis."}]


def _plain_jinja(template: str, **kwargs) -> str:
    """jinja2 configured as transformers documents it, written here without the module under test."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "2026")
    return env.from_string(template).render(**kwargs)


def test_smollm2_template_renders_the_expected_text():
    text = chat_template.render(SMOLLM2, CONVERSATION[:1], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA_STYLE], ids=["smollm2", "llama-style"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_rendering_equals_jinja2s(template, generation_prompt):
    kwargs = dict(add_generation_prompt=generation_prompt, tools=[{"name": "calc", "arguments": {"x": "é"}}])
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    text = chat_template.render(template, CONVERSATION, special_tokens=special, **kwargs)
    assert text == _plain_jinja(template, messages=CONVERSATION, **special, **kwargs)
    if template is LLAMA_STYLE:
        # the newline after an expression stays; the one after a block tag goes (trim_blocks)
        assert text.startswith('<|begin_of_text|>\nTools: [{"name": "calc", "arguments": {"x": "é"}}]\n\n<|start')
        assert "\n    " not in text  # lstrip_blocks removed the indentation of block tags
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" if generation_prompt
                             else "Seis.<|eot_id|>\n")


def test_raise_exception_strftime_and_generation_blocks():
    with pytest.raises(chat_template.ChatTemplateError, match="Unknown role: tool"):
        chat_template.render(LLAMA_STYLE, [{"role": "tool", "content": "x"}])
    assert chat_template.render(LLAMA_STYLE, [], date=True).endswith(f"Today: {__import__('datetime').date.today().year}")
    marked = "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    assert chat_template.render(marked, CONVERSATION[:2]) == "[What is 2+2?][It is 4.]"


def test_template_sources_in_transformers_order(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOLLM2}))
    assert chat_template.load_chat_template(tmp_path) == SMOLLM2
    (tmp_path / "chat_template.jinja").write_text(LLAMA_STYLE)
    assert chat_template.load_chat_template(tmp_path) == LLAMA_STYLE  # the .jinja file wins
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": SMOLLM2}, {"name": "tool_use", "template": LLAMA_STYLE}]}))
    assert chat_template.load_chat_template(named) == SMOLLM2
    assert chat_template.load_chat_template(named, "tool_use") == LLAMA_STYLE
    with pytest.raises(chat_template.ChatTemplateError, match="no chat template in"):
        chat_template.load_chat_template(tmp_path / "..")


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json (full byte alphabet) with ChatML special tokens, and the template."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator([m["content"] for m in CONVERSATION] * 10 + ["system user assistant helpful"] * 10,
                            trainer)
    d = tmp_path_factory.mktemp("chat_tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                         "chat_template": SMOLLM2}))
    return d


def test_assistant_mask_covers_exactly_the_assistant_turns(chat_tokenizer_dir):
    tok = hf_tokenizer.load_tokenizer(chat_tokenizer_dir)
    ids, mask = chat_template.tokenize_conversation(tok, SMOLLM2, CONVERSATION)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == chat_template.render(SMOLLM2, CONVERSATION)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5  # special-token text became special ids
    # the masked runs, decoded, are the assistant contents with their end-of-turn marker
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    assert runs == ["It is 4.<|im_end|>\n", "Seis.<|im_end|>\n"]


def test_tokenize_hf_chat_writes_tokens_and_mask(tmp_path, chat_tokenizer_dir):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATION}) + "\n\n" + json.dumps({"messages": CONVERSATION[:2]}) + "\n")
    out = tmp_path / "chat.bin"
    meta = tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(chat_tokenizer_dir),
                                                   out=str(out), chat=True))
    tokens = np.fromfile(out, meta["dtype"])
    mask = np.fromfile(tmp_path / meta["loss_mask"], np.uint8)
    tok = hf_tokenizer.load_tokenizer(chat_tokenizer_dir)
    first, first_mask = chat_template.tokenize_conversation(tok, SMOLLM2, CONVERSATION)
    second, second_mask = chat_template.tokenize_conversation(tok, SMOLLM2, CONVERSATION[:2])
    # the rendering starts with <|im_start|> = BOS, so nothing is prepended
    assert tokens.tolist() == first + second and mask.tolist() == first_mask + second_mask
    assert meta["loss_mask"] == "chat.mask.bin" and meta["assistant_tokens"] == int(mask.sum()) > 0
    assert meta["kind"] == "chat" and meta["num_documents"] == 2


@pytest.mark.parametrize("line, message", [
    ({"text": "no messages"}, "has no non-empty list field 'messages'"),
    ({"messages": [{"role": "user"}]}, "message 0 needs 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
])
def test_tokenize_hf_chat_rejects_bad_conversations(tmp_path, chat_tokenizer_dir, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(line) + "\n")
    cfg = tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(chat_tokenizer_dir), out=str(tmp_path / "o.bin"),
                             chat=True)
    with pytest.raises(ValueError, match=message):
        tokenize_hf.tokenize(cfg)
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.mask.bin").exists()
    with pytest.raises(ValueError, match="--chat true with --pack true"):
        tokenize_hf.Config(sources=(str(src),), hf_tokenizer="x", chat=True, pack=True, seq_len=8).validate()


def test_sequence_dataset_serves_the_assistant_mask_with_the_rows(tmp_path, chat_tokenizer_dir):
    from forgetting.core import data as data_lib

    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": CONVERSATION[: 2 + 2 * (i % 2)]}) + "\n" for i in range(12)))
    out = tmp_path / "chat.bin"
    tokenize_hf.tokenize(tokenize_hf.Config(sources=(str(src),), hf_tokenizer=str(chat_tokenizer_dir), out=str(out),
                                            chat=True))
    all_tokens = np.fromfile(out, np.uint16)
    all_mask = np.fromfile(tmp_path / "chat.mask.bin", np.uint8)
    T = 16
    ds = data_lib.SequenceDataset(data_lib.TokenFile(out), T, num_tokens_valid=2 * T, split_seed=0)
    assert ds.has_assistant_mask
    n = len(all_tokens) // T
    by_row = {tuple(all_tokens[i * T + 1:(i + 1) * T]): all_mask[i * T:(i + 1) * T] for i in range(n)}
    tokens, mask = ds.train_batch(3, 4, seed=7), ds.train_loss_mask(3, 4, seed=7)
    for row, m in zip(tokens, mask):  # each row's mask is the file's mask of that very row
        np.testing.assert_array_equal(m, by_row[tuple(row[1:])])
    for rows, masks in ds.valid_batches(4, with_mask=True):
        for row, m in zip(rows, masks):
            np.testing.assert_array_equal(m, by_row[tuple(row[1:])])
    (tmp_path / "chat.mask.bin").write_bytes(b"\x01" * 5)
    with pytest.raises(ValueError, match="tokenize again"):
        data_lib.SequenceDataset(data_lib.TokenFile(out), T, num_tokens_valid=2 * T, split_seed=0)
