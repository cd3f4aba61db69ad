"""The HTTP bounds' flags of ``glmserve serve`` (``--max-header-bytes``, ``--write-timeout``,
``--read-timeout``): their documented defaults, what they refuse (an argparse error naming the
flag, before any engine starts), and that they reach the protocol uvicorn runs."""

from __future__ import annotations

import argparse

import pytest

from glmserve.api.http_protocol import Limits, server_config
from glmserve.cli import _add_serve_arguments, http_config, serve_settings


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(exit_on_error=False)
    _add_serve_arguments(p.add_argument_group("glmserve"))
    p.add_argument("--log-level", default="info")
    return p.parse_args(list(argv))


def test_defaults_are_the_documented_ones():
    a = parse()
    assert (a.max_header_bytes, a.write_timeout, a.read_timeout) == (64 * 1024, 60.0, 30.0)
    assert Limits() == Limits(head_timeout=30.0, max_header_bytes=64 * 1024, write_timeout=60.0)


def test_sizes_and_durations_are_taken():
    a = parse("--max-header-bytes", "16KiB", "--write-timeout", "2m", "--read-timeout", "5")
    assert (a.max_header_bytes, a.write_timeout, a.read_timeout) == (16 * 1024, 120.0, 5.0)


@pytest.mark.parametrize("flag, value", [("--max-header-bytes", "0"), ("--max-header-bytes", "lots"),
                                         ("--max-header-bytes", "-1"), ("--write-timeout", "0"),
                                         ("--write-timeout", "soon")])
def test_bad_values_are_refused(flag, value):
    with pytest.raises(argparse.ArgumentError, match=f"argument {flag}"):
        parse(flag, value)


def test_the_flags_reach_the_protocol(tmp_path):
    a = parse("--max-header-bytes", "8KiB", "--write-timeout", "7", "--read-timeout", "3",
              "--responses-db", str(tmp_path / "r.sqlite3"))
    settings = serve_settings(a, [], ["m"])
    config = http_config(object(), settings, a, http="h11")
    assert config.http.limits == Limits(head_timeout=3.0, max_header_bytes=8 * 1024, write_timeout=7.0)
    assert config.h11_max_incomplete_event_size > 8 * 1024  # h11's own bound never answers first (with a 400)
    with pytest.raises(ValueError, match="zttp"):
        server_config(object(), settings, http="zttp")
