"""The Responses store flags of ``glmserve serve``: what they accept, what they refuse (an
argparse error naming the flag, before any engine starts), and that they reach the settings."""

from __future__ import annotations

import argparse

import pytest

from glmserve.cli import _add_serve_arguments


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(exit_on_error=False)
    _add_serve_arguments(p.add_argument_group("glmserve"))
    return p.parse_args(list(argv))


def test_defaults_keep_thirty_days_and_a_gibibyte():
    a = parse()
    assert (a.responses_db, a.responses_ttl, a.responses_max_bytes, a.responses_db_timeout) == \
        (None, 30 * 86400.0, 1 << 30, 5.0)


@pytest.mark.parametrize("text, seconds", [("3600", 3600.0), ("90m", 5400.0), ("12h", 43200.0), ("30d", 2592000.0),
                                           ("1.5h", 5400.0), ("0", None)])
def test_ttl_takes_durations(text, seconds):
    assert parse("--responses-ttl", text).responses_ttl == seconds


@pytest.mark.parametrize("text, size", [("1000", 1000), ("512MiB", 512 << 20), ("2G", 2 * 10**9), ("64kib", 64 << 10),
                                        ("0", None)])
def test_max_bytes_takes_sizes(text, size):
    assert parse("--responses-max-bytes", text).responses_max_bytes == size


@pytest.mark.parametrize("flag, value", [("--responses-ttl", "soon"), ("--responses-ttl", "-1d"),
                                         ("--responses-ttl", "inf"), ("--responses-max-bytes", "1TB"),
                                         ("--responses-max-bytes", "-5"), ("--responses-db-timeout", "0")])
def test_bad_values_are_refused(flag, value):
    with pytest.raises(argparse.ArgumentError, match=f"argument {flag}"):
        parse(flag, value)


def test_a_postgres_url_is_taken_as_is():
    url = "postgresql://u:p@db:5432/glmserve"
    assert parse("--responses-db", url).responses_db == url


@pytest.mark.parametrize("argv, keys, share", [
    ((), [], 1 << 30),  # one owner: the whole store
    ((), ["a", "b", "c", "d"], 1 << 28),  # the bound divided among the keys
    (("--responses-max-bytes-per-key", "64MiB"), ["a", "b"], 64 << 20),
    (("--responses-max-bytes-per-key", "0"), ["a", "b"], None),  # no shares
    (("--responses-max-bytes", "0"), ["a", "b"], None),  # no bound, so nothing to divide
])
def test_per_key_share(argv, keys, share):
    from glmserve.api.settings import Settings

    a = parse(*argv)
    settings = Settings(api_keys=keys, responses_max_bytes=a.responses_max_bytes,
                        responses_max_bytes_per_key=a.responses_max_bytes_per_key)
    assert settings.responses_share == share
