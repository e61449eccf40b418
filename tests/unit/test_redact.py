"""core/common/redact.py: secrets masked in command lines and log text, everything else untouched."""

from __future__ import annotations

import pytest

from core.common.redact import redact_argv, redact_text, secret_option


@pytest.mark.parametrize("option", ["--hf-token", "--token", "--api-key", "--api_key", "--auth-key", "--apikey",
                                    "--client-secret", "--secret", "--db-password", "--passwd", "--use-auth-token"])
def test_secret_options(option: str) -> None:
    assert secret_option(option)


@pytest.mark.parametrize("option", ["--max-tokens", "--tokenizer", "--max-model-len", "--ssl-keyfile", "--port",
                                    "--return-tokens-as-token-ids", "--key-value", "-k", "token", "--tokens"])
def test_options_left_alone(option: str) -> None:
    assert not secret_option(option)


def test_redact_argv_masks_values_in_both_forms() -> None:
    argv = ["python", "server.py", "--hf-token", "hf_abc", "--api-key=sk-1", "--max-tokens", "16",
            "--tokenizer", "tok/x", "--client_secret", "-starts-with-a-dash", "--port", "8001"]
    assert redact_argv(argv) == ["python", "server.py", "--hf-token", "***", "--api-key=***", "--max-tokens", "16",
                                 "--tokenizer", "tok/x", "--client_secret", "***", "--port", "8001"]
    assert argv[3] == "hf_abc"  # a copy: the command that runs is unchanged


def test_redact_argv_masks_url_passwords_and_secret_assignments() -> None:
    argv = ["--endpoint", "https://user:p%40ss@hub.example:8443/path", "git+https://x:y@github.com/o/r",
            "https://hub.example/no-credentials", "https://user@host/only-a-user", "HF_TOKEN=hf_abc",
            "OMP_NUM_THREADS=4"]
    assert redact_argv(argv) == ["--endpoint", "https://user:***@hub.example:8443/path",
                                 "git+https://x:***@github.com/o/r", "https://hub.example/no-credentials",
                                 "https://user@host/only-a-user", "HF_TOKEN=***", "OMP_NUM_THREADS=4"]


def test_a_trailing_secret_option_and_an_empty_argv() -> None:
    assert redact_argv(["--token"]) == ["--token"]
    assert redact_argv([]) == []


def test_redact_text_keeps_the_spacing() -> None:
    line = "=== 2026-01-01 12:00:00 /venv/bin/python s.py --port 8001  --hf-token hf_abc\t--x=https://a:b@h ==="
    assert redact_text(line) == ("=== 2026-01-01 12:00:00 /venv/bin/python s.py --port 8001  --hf-token ***"
                                 "\t--x=https://a:***@h ===")
    assert redact_text("Authorization: Bearer sk-123 and bearer xyz") == "Authorization: Bearer *** and bearer ***"
    assert redact_text("") == ""
    assert redact_text("nothing secret here") == "nothing secret here"
