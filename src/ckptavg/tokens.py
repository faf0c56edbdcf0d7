"""Hub tokens: where one comes from, what makes it usable, and keeping it out of everything we print.

A token arrives as ``--token``, a ``--token-file`` or the ``HF_TOKEN`` environment variable (in that
order of precedence). Surrounding whitespace (a file's CRLF line end, a pasted space) is stripped; a
token that still holds a space, a control character or a non-ASCII character cannot be an HTTP header,
and is refused with a :class:`~ckptavg.errors.TokenError` that says what is wrong and where the token
came from, never what it is. :class:`Redactor` replaces a token, in every spelling a message or a
traceback could give it, with ``***``; the CLI runs each command under one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
import unicodedata
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ckptavg.errors import TokenError

__all__ = ["Redactor", "clean_token", "public_url", "read_token_file", "resolve_token", "url_secrets"]

MASK = "***"
ENV = "HF_TOKEN"
_MAX_FILE = 1 << 16  # a token is ~40 bytes; a bigger file is the wrong file


def resolve_token(
    token: str | None = None,
    *,
    token_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The token to send: ``token`` (--token), else the contents of ``token_file``, else ``$HF_TOKEN``.

    Returns None when none is given (an empty --token or HF_TOKEN counts as none, as CI scripts pass
    ``--token "$HF_TOKEN"`` with the variable unset); then huggingface_hub may still use its stored login.
    """
    if token is not None and token_file is not None:
        raise TokenError("give --token or --token-file, not both")
    if token is not None:
        return clean_token(token, "--token")
    if token_file is not None:
        return read_token_file(token_file)
    return clean_token((os.environ if environ is None else environ).get(ENV), ENV)


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token a file holds (huggingface_hub's ``~/.cache/huggingface/token`` is one such file)."""
    p = Path(path).expanduser()
    where = f"--token-file {p}"
    try:
        with p.open("rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise TokenError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise TokenError(f"{where}: is a folder, not a file") from None
    except OSError as e:
        raise TokenError(f"{where}: cannot read it ({e.strerror or e.__class__.__name__})") from None
    if len(data) > _MAX_FILE:
        raise TokenError(f"{where}: more than {_MAX_FILE} bytes, too large to hold a token")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark from a Windows editor is not part of the token
    except UnicodeDecodeError:
        raise TokenError(f"{where}: not UTF-8 text; a token is printable ASCII") from None
    token = clean_token(text, where)
    if token is None:
        raise TokenError(f"{where}: the file holds no token")
    return token


def clean_token(token: str | None, origin: str) -> str | None:
    """``token`` without surrounding whitespace, or None if that leaves nothing; refused (TokenError,
    naming ``origin``) if it holds a space, a control or a non-ASCII character."""
    if token is None:
        return None
    token = token.strip()
    for i, ch in enumerate(token, start=1):
        if "!" <= ch <= "~":
            continue
        if ch == " ":
            what = "a space"
        elif ch.isascii():
            what = f"a control character (U+{ord(ch):04X})"
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            # Invisible (a byte-order mark, a non-breaking or zero-width space): never part of a secret,
            # and the likely culprit of a copy and paste, so it is named.
            what = f"an invisible non-ASCII character (U+{ord(ch):04X})"
        else:
            what = "a non-ASCII character"  # visible: may be part of a secret, so not named
        raise TokenError(
            f"the token from {origin} has {what} at position {i} of {len(token)}; a token is printable "
            "ASCII without spaces: copy it again (it was not sent)"
        )
    return token or None


def public_url(url: str | None) -> str | None:
    """``url`` without the credentials a ``user:password@`` part carries (a mirror's HF_ENDPOINT may hold
    them): what provenance records and messages show. The whole user part goes, since some servers take
    a token as the user name."""
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def url_secrets(url: str | None) -> list[str]:
    """The secrets in ``url``'s ``user:password@`` part, as given and percent-decoded (the password; the user
    name only where it stands alone, as a token given as the user name does): what a Redactor must hide
    in text that quotes the URL (a client's traceback, a log record)."""
    if not url:
        return []
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    if not userinfo:
        return []
    user, colon, password = userinfo.partition(":")
    found = [userinfo, password] if colon else [user]  # a user name beside a password is no secret
    return [s for s in {*found, *(unquote(f) for f in found)} if s]


def _spellings(secret: str) -> set[str]:
    """How ``secret`` can appear in text: as is, stripped, and escaped as repr(), ascii() and bytes show it."""
    out = set()
    for s in {secret, secret.strip()}:
        out |= {s, repr(s)[1:-1], ascii(s)[1:-1]}
        with contextlib.suppress(UnicodeEncodeError):
            out.add(repr(s.encode("utf-8", "surrogateescape"))[2:-1])
    return {s for s in out if s.strip()}


class Redactor:
    """Replaces known secrets with ``***`` in text, and (while :meth:`active`) in log records and
    warnings, whoever emits them: huggingface_hub logs from download threads, on handlers of its own."""

    def __init__(self, *secrets: str | None) -> None:
        self._spellings: list[str] = []
        for s in secrets:
            self.add(s)

    def add(self, secret: str | None) -> None:
        if secret:
            self._spellings = sorted(set(self._spellings) | _spellings(secret), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for s in self._spellings:  # longest first: a raw "tok\r\n" goes whole, not leaving "\r\n" behind
            text = text.replace(s, MASK)
        return text

    @contextlib.contextmanager
    def active(self) -> Iterator[Redactor]:
        """Redact every log record made, warning shown and thread's uncaught exception printed inside the
        block; the hooks are put back after it."""
        make_record = logging.getLogRecordFactory()
        show_warning = warnings.showwarning

        def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            r = make_record(*args, **kwargs)
            if self._spellings:
                try:
                    text = r.getMessage()
                except Exception:  # a malformed call: logging reports it when emitting; it must not raise here
                    text = f"{r.msg} {r.args!r}"
                r.msg, r.args = self.redact(text), ()
                if r.exc_info:
                    r.exc_text = self.redact(logging.Formatter().formatException(r.exc_info))
                if r.stack_info:
                    r.stack_info = self.redact(r.stack_info)
            return r

        def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
            show_warning(self.redact(str(message)), *args, **kwargs)

        def thread_died(args: threading.ExceptHookArgs) -> None:  # as threading's own hook prints it
            if args.exc_type is SystemExit:
                return
            name = args.thread.name if args.thread is not None else threading.get_ident()
            text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
            if sys.stderr is not None:
                sys.stderr.write(self.redact(f"Exception in thread {name}:\n{text}"))
                sys.stderr.flush()

        logging.setLogRecordFactory(record)
        warnings.showwarning = show
        thread_hook, threading.excepthook = threading.excepthook, thread_died
        try:
            yield self
        finally:
            logging.setLogRecordFactory(make_record)
            warnings.showwarning = show_warning
            threading.excepthook = thread_hook
