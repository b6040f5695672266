"""Tests for proxy.base.userlist: PgBouncer-style auth file parsing."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from proxy.base.userlist import Credential, UserlistError, load_userlist, parse_userlist
from proxy.pgwire.scram import make_scram_secret

SECRET = make_scram_secret("pencil", salt=b"saltsalt", iterations=4096)
MD5 = "md5" + hashlib.md5(b"secretbob").hexdigest()


def test_parses_all_kinds_and_skips_comments() -> None:
    text = (
        "; PgBouncer auth file\n"
        "\n"
        '"alice" "plain pass"\n'
        "   # indented comment\n"
        f'"bob" "{MD5}"\r\n'
        f'  "carol"\t"{SECRET.to_text()}"  \n'
        '"da""ve" "say ""hi"""\n'
        "   \n"
    )
    users = parse_userlist(text)
    assert list(users) == ["alice", "bob", "carol", 'da"ve']
    assert users["alice"] == Credential("plain", "plain pass", None)
    assert users["bob"] == Credential("md5", MD5, None)
    assert users["carol"].kind == "scram"
    assert users["carol"].scram == SECRET
    assert users["carol"].value == SECRET.to_text()
    assert users['da"ve'] == Credential("plain", 'say "hi"')


def test_uppercase_md5_is_a_plain_password() -> None:
    users = parse_userlist(f'"bob" "{MD5.upper()}"')
    assert users["bob"].kind == "plain"


def test_empty_input() -> None:
    assert parse_userlist("") == {}
    assert parse_userlist("\n; nothing\n#\n") == {}


def test_repr_hides_passwords() -> None:
    users = parse_userlist('"alice" "hunter2"')
    assert "hunter2" not in repr(users)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice secret", "expected '\"' starting the username"),
        ('"alice" secret', "expected '\"' starting the password"),
        ('"alice"', "expected '\"' starting the password"),
        ('"alice', "unterminated quoted username"),
        ('"alice" "secret', "unterminated quoted password"),
        ('"alice" "say ""hi""', "unterminated quoted password"),
        ('"alice" "secret" extra', "unexpected text after the password"),
        ('"alice" "secret" "", ', "unexpected text after the password"),
        ('"" "secret"', "empty username"),
        ('"alice" ""', "empty password"),
        ('"alice" "SCRAM-SHA-256$4096:bad"', "bad SCRAM secret for user 'alice'"),
    ],
)
def test_malformed_lines_report_source_and_line(line: str, message: str) -> None:
    text = '; header\n"ok" "fine"\n\n' + line + '\n"later" "x"\n'
    with pytest.raises(UserlistError) as info:
        parse_userlist(text, source="users.txt")
    assert str(info.value).startswith("users.txt:4: ")
    assert message in str(info.value)


def test_duplicate_user_is_an_error() -> None:
    with pytest.raises(UserlistError, match=r"^<string>:3: duplicate entry for user 'a'"):
        parse_userlist('"a" "1"\n"b" "2"\n"a" "3"\n')


def test_userlist_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_userlist("nope")


def test_load_userlist(tmp_path: Path) -> None:
    path = tmp_path / "userlist.txt"
    path.write_bytes(b"\xef\xbb\xbf" + f'"alice" "p\u00e4ss"\n"bob" "{MD5}"\n'.encode())
    users = load_userlist(path)
    assert users["alice"] == Credential("plain", "p\u00e4ss")
    assert users["bob"].kind == "md5"
    assert load_userlist(str(path)) == users


def test_load_userlist_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "userlist.txt"
    path.write_text('"alice" "x"\n"bob"\n')
    with pytest.raises(UserlistError, match=f"^{re.escape(str(path))}:2: "):
        load_userlist(path)
    path.write_bytes(b'"alice" "x"\n\n"bob" "\xff"\n')
    with pytest.raises(UserlistError, match=f"^{re.escape(str(path))}:3: not valid UTF-8"):
        load_userlist(path)
    with pytest.raises(OSError):
        load_userlist(tmp_path / "missing.txt")
