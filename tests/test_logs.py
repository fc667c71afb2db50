from __future__ import annotations

from tabby.logs import REDACTED, access_line, redact_body, redact_headers


def test_redact_headers() -> None:
    headers = [
        ("Authorization", "Bearer k"),
        ("x-api-key", "k"),
        ("X-Admin-Key", "k"),
        ("Cookie", "c"),
        ("Content-Type", "application/json"),
    ]
    assert redact_headers(headers) == {
        "Authorization": REDACTED,
        "x-api-key": REDACTED,
        "X-Admin-Key": REDACTED,
        "Cookie": REDACTED,
        "Content-Type": "application/json",
    }


def test_redact_body_at_any_depth() -> None:
    body = {
        "model": "m",
        "token": "t",
        "extra": {"hf_token": "h", "list": [{"API_KEY": "a"}, 1]},
        "admin_key": "x",
    }
    assert redact_body(body) == {
        "model": "m",
        "token": REDACTED,
        "extra": {"hf_token": REDACTED, "list": [{"API_KEY": REDACTED}, 1]},
        "admin_key": REDACTED,
    }
    assert body["token"] == "t"  # the original is untouched


def test_access_line() -> None:
    assert access_line("GET", "/health", 200, 1.234, "abc") == "GET /health 200 1.2ms id=abc"
