"""The soak tool, short: 8 streams for 30 s on the tiny float64 models, as real processes."""

from __future__ import annotations

import socket

import pytest

from specdec.tools import soak

TINY_PROMPTS = ["w1 w2 w3", "w5 w9 w2 w7 w30", "w11", "w4 w4 w8 w16 w23 w15 w6", "w31 w2 w19 w12"]


def can_bind(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> int:
    """A base port such that it and the next count - 1 are free (start_all takes port, +1, +2)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65536 and all(can_bind(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def test_a_short_soak_sees_every_kind_and_nothing_unexpected(model_dirs, tmp_path):
    prompts = [flag for prompt in TINY_PROMPTS for flag in ("--prompt", prompt)]
    args = soak.build_parser().parse_args(
        ["--streams", "8", "--seconds", "30", "--port", str(free_ports(3)), "--max-seq-len", "128",
         "--target-model", str(model_dirs["target"]), "--target-dtype", "float64",
         "--draft-model", str(model_dirs["layer_skip"]), "--draft-dtype", "float64",
         "--log", str(tmp_path / "services.log"), "--no-rss-check", *prompts]
    )  # fmt: skip
    report = soak.run_soak(args)
    summary = report.text()
    for kind in soak.KINDS:
        assert report.completed(kind) > 0, summary
    assert report.unexpected == 0, summary
    assert report.greedy_checked > 0 and report.greedy_mismatched == 0, summary
    assert report.drafted > 0 and report.accepted > 0, summary  # the draft was used, not silently dropped
    assert report.sessions_at_end == {"draft": 0, "target": 0}, summary
    assert all(len(report.rss[service]) > 0 for service in soak.SERVICES), summary
    assert report.failures() == [], summary  # the RSS condition is off: 30 s is mostly warm-up


def test_rss_figures_tell_a_leak_from_a_working_set_filling_up():
    from specdec.tools.soak import rss_growth, rss_slopes

    leak = [(t, (1000 + t) * 2**20) for t in range(301)]  # 1 MiB a second, all along
    filling = [(t, (1000 + min(t, 60)) * 2**20) for t in range(301)]  # 60 MiB in the first minute, then flat
    assert rss_slopes(leak, 300) == pytest.approx([60.0] * 5)
    assert rss_slopes(filling, 300) == pytest.approx([60.0, 0, 0, 0, 0])
    assert rss_growth(leak, 300) == pytest.approx((1000 + 285) / (1000 + 60) - 1)  # last tenth's mean / warm-up
    assert rss_growth(filling, 300) == 0.0
