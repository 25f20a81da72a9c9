"""The agent's TLS flags: a listen address beyond loopback is served with mutual TLS or, only
when asked with --plaintext, in the clear; the three TLS files come together; unreadable or
non-PEM material stops the agent with the file's name before it serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from substrate.__main__ import main


def test_a_public_listen_address_needs_tls_or_plaintext_said(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--listen", "0.0.0.0:0", "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "is not loopback: serve mutual TLS" in capsys.readouterr().err


def test_the_tls_files_come_together(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--data-dir", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem")])
    assert "--tls-cert, --tls-key and --tls-ca together" in capsys.readouterr().err


def test_material_that_is_not_pem_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SQUALL_AGENT_TOKEN", "t")
    (tmp_path / "c.pem").write_text("not a certificate")
    for name in ("k.pem", "ca.pem"):
        (tmp_path / name).write_text("")
    code = main(
        [
            "--data-dir",
            str(tmp_path / "data"),
            *("--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")),
            *("--tls-ca", str(tmp_path / "ca.pem")),
        ]
    )
    assert code == 2
    assert f"certificate {tmp_path / 'c.pem'} is not PEM" in capsys.readouterr().err
