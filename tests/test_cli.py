"""The `hetero` command: bad input exits non-zero with one line naming the problem."""

import json

import pytest

from hetero.cli import main
from hetero.demo import save_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("llama"), "llama", layers=2, hidden=64, heads=4, kv_heads=2,
                             vocab=256, context=512)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_unknown_config_key(model_dir, tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('windw_tokens = 64\n')
    rc = main(["generate", "--model", str(model_dir), "--config", str(cfg), "--prompt", "hi", "--quiet"])
    assert rc == 2
    assert "windw_tokens" in _error_line(capsys)


def test_wrong_type_and_negative_size(model_dir, tmp_path, capsys):
    for text, key in [('block_size = "big"\n', "block_size"), ('cpu_kv_bytes = "-3GiB"\n', "cpu_kv_bytes")]:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        rc = main(["plan", "--model", str(model_dir), "--config", str(cfg), "--context", "1000"])
        assert rc == 2
        assert key in _error_line(capsys)


def test_budget_larger_than_the_machine(model_dir, tmp_path, capsys):
    cfg = tmp_path / "huge.yaml"
    cfg.write_text("cpu_kv_bytes: 1000TiB\n")
    rc = main(["plan", "--model", str(model_dir), "--config", str(cfg), "--context", "1000"])
    assert rc == 2
    assert "cpu_kv_bytes" in _error_line(capsys)


def test_model_path_that_is_not_a_model(tmp_path, capsys):
    rc = main(["plan", "--model", str(tmp_path), "--context", "1000"])
    assert rc == 2
    line = _error_line(capsys)
    assert "model" in line and "config.json" in line


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    rc = main(["plan", "--model", str(tmp_path), "--context", "1000"])
    assert rc == 2
    line = _error_line(capsys)
    assert "gpt2" in line and "llama" in line


def test_prompt_longer_than_the_context(model_dir, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    prompt = " ".join(f"w{i % 256}" for i in range(600))
    rc = main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "4", "--quiet"])
    assert rc == 2
    assert "512" in _error_line(capsys)


def test_generate_prints_text_and_summary(model_dir, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    cfg = tmp_path / "ok.toml"
    cfg.write_text('block_size = 16\nsink_tokens = 16\nwindow_tokens = 32\ngpu_kv_bytes = "1MiB"\ncpu_kv_bytes = "64MiB"\n')
    stats = tmp_path / "stats.json"
    prompt = " ".join(f"w{i % 256}" for i in range(300))
    rc = main(["generate", "--model", str(model_dir), "--config", str(cfg), "--prompt", prompt,
               "--max-new-tokens", "5", "--quiet", "--json", str(stats)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "prefill" in err and "decode" in err
    assert json.loads(stats.read_text())["prompt_tokens"] == 300


def test_demo_passes(capsys):
    rc = main(["demo", "--quiet", "--prompt-tokens", "700", "--new-tokens", "8", "--device", "cpu"])
    assert rc == 0
    assert "match" in capsys.readouterr().out
