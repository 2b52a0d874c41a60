"""CI-sized runs of the serving benchmark and the load scenarios against the real launcher."""

from __future__ import annotations

import json

import pytest
from load_scenarios import main as load_main

from textgen.benchmark.main import main as bench_main

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("api", ["tgi", "openai"])
def test_serving_benchmark_measures_every_request(launcher, capsys, api):
    argv = ["serving", "--url", launcher.url, "--api", api, "--concurrency", "2"]
    argv += ["--num-requests", "4", "--max-new-tokens", "4", "--prompt-tokens", "8", "--json"]
    assert bench_main(argv) == 0
    level = json.loads(capsys.readouterr().out)["levels"][0]
    assert (level["num_ok"], level["num_failed"]) == (4, 0)
    assert level["num_output_tokens"] == 16  # ignore_eos: exactly max_new_tokens each
    assert level["itl_ms"]["p50"] > 0


def test_load_scenarios_leave_the_server_healthy(launcher, capsys):
    argv = ["--url", launcher.url, "--sustained-clients", "2", "--sustained-seconds", "3"]
    argv += ["--sustained-max-requests", "4", "--burst-requests", "4"]
    argv += ["--disconnect-requests", "4", "--max-new-tokens", "4", "--prompt-tokens", "8"]
    assert load_main([*argv, "--json"]) == 0
    reports = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(reports) == {"sustained", "burst", "disconnect_storm"}
    assert all(r["healthy_after"] and r["failures"] == 0 for r in reports.values())
    assert reports["burst"]["requests"] == 4


def test_load_scenarios_refuse_a_remote_server():
    with pytest.raises(SystemExit):
        load_main(["--url", "http://example.com:8080"])
