import inspect
import json

import pytest
import wandb  # a dependency of distmaml, not an optional one: its absence is an error, not a skip

from distmaml.run.log import NullLogger, RunLogger


def metrics(i, loss):
    return {"iteration": i, "meta_loss": loss, "query_loss_before": 2 * loss, "query_loss_after": loss,
            "tasks_per_s": 100.0}


def test_metrics_jsonl_and_resume_truncation(tmp_path):
    logger = RunLogger(tmp_path, {"train": {"lr": 1e-3}}, progress=False)
    logger.start(0, 30)
    for i in (10, 20, 30):
        logger.log(metrics(i, 1.0 / i))
    logger.close()
    # Resuming from a checkpoint at iteration 20 drops what the crashed run logged after it.
    logger = RunLogger(tmp_path, {}, progress=False)
    logger.start(20, 30)
    logger.log(metrics(30, 0.5))
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["iteration"], m["meta_loss"]) for m in lines] == [(10, 0.1), (20, 0.05), (30, 0.5)]


def test_wandb_gets_the_same_metrics_config_and_summary_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = {"inner": {"steps": 5, "lr": 0.01}, "train": {"meta_batch": 25}}
    logger = RunLogger(tmp_path, config, progress=False, wandb=True, wandb_project="distmaml-test",
                       wandb_name="unit")
    run = logger.wandb_run
    assert run is not None and run.settings.mode == "offline"
    assert run.name == "unit" and run.project == "distmaml-test"
    assert run.config["inner"] == {"steps": 5, "lr": 0.01}
    logger.start(0, 20)
    logger.log(metrics(10, 0.25))
    logger.log(metrics(20, 0.125))
    logger.summary({"status": "complete", "eval": {"steps": 3, "loss": 0.3}, "skip": [1, 2]})
    assert run.summary["meta_loss"] == 0.125  # last logged value, as in metrics.jsonl
    assert run.summary["query_loss_before"] == 0.25
    assert run.summary["status"] == "complete" and run.summary["eval/loss"] == 0.3
    run_id = (tmp_path / "wandb_id").read_text()
    logger.close()
    assert wandb.run is None  # finished
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    # A resumed run in the same directory continues the same wandb run id.
    again = RunLogger(tmp_path, config, progress=False, wandb=True, wandb_project="distmaml-test")
    assert again.wandb_run.id == run_id
    again.close()


def test_the_null_logger_of_other_ranks_has_every_logger_method_and_writes_nothing(tmp_path, monkeypatch, capfd,
                                                                                  caplog):
    # Every method the trainer calls on the main rank's RunLogger, NullLogger defines itself, with the same
    # parameters: a rank other than 0 calls the same methods.
    public = {name for name, value in vars(RunLogger).items() if callable(value) and not name.startswith("_")}
    assert public <= set(vars(NullLogger)), public - set(vars(NullLogger))
    for name in public:
        assert inspect.signature(getattr(NullLogger, name)) == inspect.signature(getattr(RunLogger, name)), name
    monkeypatch.chdir(tmp_path)
    logger = NullLogger()
    with caplog.at_level("DEBUG"):
        logger.start(0, 10)
        assert logger.inner_progress(5) is None
        logger.advance(1)
        logger.log(metrics(1, 1.0))
        logger.summary({"status": "complete", "eval": {"loss": 0.5}})
        logger.close()
    assert logger.wandb_run is None
    assert list(tmp_path.iterdir()) == [] and capfd.readouterr() == ("", "") and caplog.records == []


def test_a_torn_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path, caplog):
    """A full disk mid-append leaves half a line; it once blocked every later resume with a traceback."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(metrics(10, 0.5)) + "\n" + json.dumps(metrics(20, 0.4)) + "\n" + '{"iteration": 30, "me')
    logger = RunLogger(tmp_path, {}, progress=False)
    with caplog.at_level("WARNING"):
        logger.start(20, 40)
    logger.log(metrics(30, 0.3))
    logger.close()
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [10, 20, 30]
    assert f"{path}: its last line is torn or not JSON; dropped it" in caplog.text


def test_wandb_online_without_an_api_key_is_one_line(tmp_path, monkeypatch):
    from distmaml.errors import ConfigError

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(ConfigError) as refused:
        RunLogger(tmp_path / "run", {}, progress=False, wandb=True, wandb_mode="online")
    assert str(refused.value) == ("logging.wandb_mode = online: wandb has no API key (set WANDB_API_KEY or run "
                                  "`wandb login`), or use logging.wandb_mode=offline")


def test_an_unreachable_wandb_server_costs_the_timeout_then_logs_offline(tmp_path, monkeypatch, caplog):
    import socket
    import time

    with socket.socket() as sock:  # a port on this machine that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        logger = RunLogger(tmp_path, {}, progress=False, wandb=True, wandb_mode="auto", wandb_timeout=3)
    assert time.monotonic() - started < 20
    assert logger.wandb_run.settings.mode == "offline"
    assert "wandb could not reach its server within logging.wandb_timeout = 3 s" in caplog.text
    logger.log(metrics(10, 0.5))
    logger.close()


def test_a_full_disk_while_resuming_or_appending_is_one_line_and_leaves_metrics_whole(tmp_path, failing_disk):
    """Resuming once left a traceback and a stray metrics.jsonl.tmp; a failed append, half a line."""
    from distmaml.errors import DiskFullError

    logger = RunLogger(tmp_path, {}, progress=False)
    logger.start(0, 30)
    for i in (10, 20, 30):
        logger.log(metrics(i, 1.0 / i))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    failing_disk(after=10)
    with pytest.raises(DiskFullError) as full:
        RunLogger(tmp_path, {}, progress=False).start(20, 30)  # rewrites the file without line 30
    assert str(full.value).startswith(f"{tmp_path / 'metrics.jsonl'}: no space left on device (")
    assert str(full.value).endswith("; nothing was overwritten: the files already there are as they were")
    with pytest.raises(DiskFullError) as full:
        logger.log(metrics(40, 0.025))
    assert str(full.value).endswith("; metrics.jsonl is as it was before this line")
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_result_written_to_a_stream_or_through_a_link_leaves_them_in_place(tmp_path):
    """`--json /dev/stdout` once replaced the link /dev/stdout with a regular file (the atomic rename):
    a stream is written into, and a link to a file keeps pointing at the file, which gets the result."""
    import os
    import threading

    from distmaml.run.log import write_json

    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    write_json(fifo, {"loss": 0.5})
    reader.join(timeout=10)
    assert fifo.is_fifo() and received, "the stream was replaced, and nothing arrived through it"
    assert json.loads(received[0]) == {"loss": 0.5}
    target, link = tmp_path / "results/eval.json", tmp_path / "latest.json"
    target.parent.mkdir()
    target.write_text("{}")
    link.symlink_to(target)
    write_json(link, {"loss": 0.25})
    assert link.is_symlink() and link.resolve() == target and json.loads(target.read_text()) == {"loss": 0.25}


def test_an_output_path_that_is_a_writable_stream_passes_the_check_before_the_work(tmp_path):
    import os

    from distmaml.files import check_file_path

    os.mkfifo(tmp_path / "stream")
    assert check_file_path(tmp_path / "stream", "--json") == tmp_path / "stream"
