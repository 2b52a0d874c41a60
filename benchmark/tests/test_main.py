import json

from textgen.benchmark.main import main


def _argv(url: str, *extra: str) -> list[str]:
    return ["serving", "--url", url, "--max-new-tokens", "4", "--concurrency", "1", "4", *extra]


def test_json_output(fake_server, capsys):
    with fake_server() as url:
        assert main(_argv(url, "--json", "--api", "openai")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["api"] == "openai"
    assert [level["num_ok"] for level in report["levels"]] == [4, 8]
    assert [level["num_output_tokens"] for level in report["levels"]] == [16, 32]
    assert set(report["throughput_vs_concurrency_1"]) == {"4"}


def test_table_output_ends_with_the_throughput_ratio(fake_server, capsys):
    with fake_server() as url:
        assert main(_argv(url)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("concurrency")
    assert len(lines) == 4
    assert lines[3].startswith("throughput 4 vs 1: ") and lines[3].endswith("x")


def test_exit_status_1_when_every_request_failed(fake_server, capsys):
    with fake_server() as url:
        pass
    assert main(_argv(url, "--timeout", "2")) == 1
    assert "ConnectError" in capsys.readouterr().out


def test_request_rate_sweep_runs_one_open_loop_level_per_rate(fake_server, capsys, tmp_path):
    plot = tmp_path / "load.png"
    argv = ["serving", "--max-new-tokens", "4", "--num-requests", "5", "--json"]
    with fake_server() as url:
        argv += ["--url", url, "--request-rate", "20", "50", "--plot", str(plot)]
        assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [level["request_rate"] for level in report["levels"]] == [20, 50]
    assert [level["num_ok"] for level in report["levels"]] == [5, 5]
    assert report["throughput_vs_concurrency_1"] == {}
    assert plot.read_bytes().startswith(b"\x89PNG")
