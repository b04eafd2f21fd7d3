import pytest
import torch

from recyclegpt.eval import data
from recyclegpt.eval.errors import EvalError


def test_token_blocks_drop_the_partial_tail_and_respect_max_tokens():
    ids = torch.arange(25)
    assert data.token_blocks(ids, 8).tolist() == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert data.token_blocks(ids, 8, max_tokens=17).shape == (2, 8)
    assert data.token_blocks(ids, 64).shape == (1, 25)  # shorter than a block: one short block


def test_token_blocks_reject_too_little_text():
    with pytest.raises(EvalError, match="at least 3"):
        data.token_blocks(torch.arange(2), 8)


def test_prompts_from_ids_spread_over_the_text():
    prompts = data.prompts_from_ids(torch.arange(100), num_prompts=3, prompt_tokens=10)
    assert [p.tolist()[0][0] for p in prompts] == [0, 45, 90]
    assert all(p.shape == (1, 10) for p in prompts)
    with pytest.raises(EvalError, match="fewer than --prompt-tokens"):
        data.prompts_from_ids(torch.arange(5), 2, 10)


def test_prompts_from_file_one_per_line_skipping_blanks(tmp_path, tiny_model_dir):
    from recyclegpt.core.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    path = tmp_path / "prompts.txt"
    path.write_text("The queen sold a map\n\n   \nA grey cat\n")
    prompts = data.prompts_from_file(str(path), tokenizer, len(tokenizer))
    assert len(prompts) == 2
    assert tokenizer.decode(prompts[1][0]) == "A grey cat"


def test_chat_prompts_from_file_are_user_turns_in_the_chat_template(tmp_path, tiny_model_dir):
    from recyclegpt.core.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    path = tmp_path / "prompts.txt"
    path.write_text("The queen sold a map\n\nA grey cat\n")
    with pytest.raises(EvalError, match="chat template"):
        data.prompts_from_file(str(path), tokenizer, len(tokenizer), chat=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    prompts = data.prompts_from_file(str(path), tokenizer, len(tokenizer), chat=True)
    assert len(prompts) == 2
    expected = tokenizer("<|user|> A grey cat\n<|assistant|> ", add_special_tokens=False)["input_ids"]
    assert prompts[1][0].tolist() == expected


def test_check_fits_names_the_prompt():
    with pytest.raises(EvalError, match="prompt 2 has 10 tokens"):
        data.check_fits([torch.zeros(1, 4), torch.zeros(1, 10)], max_new_tokens=8, context=16)


def test_read_text_errors(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        data.read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EvalError, match="is empty"):
        data.read_text(str(tmp_path / "empty.txt"))
