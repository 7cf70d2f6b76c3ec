"""Run directories: samples appended as items finish, resume after a crash or a kill, identity checks,
shard merging (attnsteer.evals.results). No model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from attnsteer.evals.results import RunDir, RunDirError, load_results, read_jsonl, sample_key

IDENTITY = {"model": "m", "prompt": "p {question}", "decoding": {"max_new_tokens": 16}}


def _open(path, identity=IDENTITY, **kw) -> RunDir:
    return RunDir(path, "pope", identity, **kw).open({"config": {"x": 1}})


def test_append_and_read_back(tmp_path):
    run = _open(tmp_path / "run")
    for i in range(3):
        run.append({"key": sample_key(f"item{i}", "none", 0), "output": f"out{i}"})
    run.close()
    again = _open(tmp_path / "run")
    done = again.finished()
    assert sorted(done) == [f"item{i}|none|0" for i in range(3)]
    assert done["item1|none|0"]["output"] == "out1"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "running"


def test_half_written_last_line_is_dropped_and_repaired(tmp_path):
    run = _open(tmp_path / "run")
    run.append({"key": "a|none|0", "output": "x"})
    run.close()
    with open(tmp_path / "run" / "samples.jsonl", "a") as f:
        f.write('{"key": "b|none|0", "outp')  # a crash in the middle of a write
    again = _open(tmp_path / "run")
    assert list(again.finished()) == ["a|none|0"]
    again.append({"key": "b|none|0", "output": "y"})
    again.close()
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a|none|0", "b|none|0"]


def test_identity_mismatch_names_each_difference(tmp_path):
    _open(tmp_path / "run").close()
    other = {**IDENTITY, "decoding": {"max_new_tokens": 64}, "prompt": "q"}
    with pytest.raises(RunDirError) as err:
        _open(tmp_path / "run", other)
    msg = str(err.value)
    assert "decoding.max_new_tokens: 16 in the existing run, 64 now" in msg
    assert "prompt:" in msg and "--output_path" in msg


def test_data_files_must_agree_but_new_ones_may_be_added(tmp_path):
    _open(tmp_path / "run", data={"coco/random": "aaa"}).close()
    _open(tmp_path / "run", data={"coco/random": "aaa", "coco/popular": "bbb"}).close()  # another split: fine
    with pytest.raises(RunDirError, match="coco/random: 'aaa' in the existing run, 'ccc' now"):
        _open(tmp_path / "run", data={"coco/random": "ccc"})


def test_other_task_and_orphan_samples_are_errors(tmp_path):
    _open(tmp_path / "run").close()
    with pytest.raises(RunDirError, match="holds a 'pope' run"):
        RunDir(tmp_path / "run", "chair", IDENTITY).check()
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "samples.jsonl").write_text('{"key": "a"}\n')
    with pytest.raises(RunDirError, match="no results.json"):
        RunDir(tmp_path / "orphan", "pope", IDENTITY).check()


def test_shards_are_read_on_resume_and_merged(tmp_path):
    main = _open(tmp_path / "run")
    other = RunDir(tmp_path / "run", "pope", IDENTITY, rank=1, world_size=2, is_main=False)
    other.check()
    main.append({"key": "a|none|0"})
    other.append({"key": "b|none|0"})
    other.close()
    main.close()
    assert (tmp_path / "run" / "samples.rank1.jsonl").is_file()
    assert set(_open(tmp_path / "run").finished()) == {"a|none|0", "b|none|0"}  # crash before the merge
    main = _open(tmp_path / "run")
    assert main.merge_shards() == 1
    assert not (tmp_path / "run" / "samples.rank1.jsonl").exists()
    assert [r["key"] for r in read_jsonl(tmp_path / "run" / "samples.jsonl")] == ["a|none|0", "b|none|0"]


def test_write_results_keeps_sessions(tmp_path):
    run = _open(tmp_path / "run")
    run.write_results({"metrics": {"baseline": {"summary": {"f1": 0.5}}}, "session": {"started": "t0"}})
    run = _open(tmp_path / "run")
    rec = run.write_results({"metrics": {}, "session": {"started": "t1"}})
    assert [s["started"] for s in rec["sessions"]] == ["t0", "t1"]
    loaded = load_results(tmp_path / "run")
    assert loaded["status"] == "complete" and loaded["identity"]["model"] == "m"
    for key in ("versions", "git", "machine", "written"):
        assert key in loaded
    assert loaded["versions"]["torch"]


_WRITER = textwrap.dedent("""
    import sys, time
    from attnsteer.evals.results import RunDir, sample_key
    run = RunDir(sys.argv[1], "pope", {"model": "m"}).open()
    done = run.finished()
    for i in range(100):
        key = sample_key(f"item{i}", "none", 0)
        if key in done:
            continue
        print("compute", i, flush=True)
        run.append({"key": key, "i": i})
        print("saved", i, flush=True)
        if i >= 4:
            time.sleep(5)   # killed in here
""")


def test_killed_process_loses_nothing_finished_and_resume_skips_it(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 60
    while len(seen) < 5 and time.time() < deadline:  # kill right after the 5th item is saved
        words = proc.stdout.readline().split()
        if words and words[0] == "saved":
            seen.append(words[-1])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen == ["0", "1", "2", "3", "4"]
    done = RunDir(run_dir, "pope", {"model": "m"}).open().finished()
    assert sorted(done) == sorted(sample_key(f"item{i}", "none", 0) for i in range(5))
    # the rerun computes only what is left
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline().split()
    proc.kill()
    proc.wait()
    assert first == ["compute", "5"]


def test_a_stopped_session_is_recorded_with_how_to_resume(tmp_path, capsys):
    run = _open(tmp_path / "run")
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt), run.guard(lines.append):
        run.append({"key": "a|none|0", "output": "x"})
        raise KeyboardInterrupt
    assert capsys.readouterr().err == ""  # the library prints nothing: the line goes to the caller's log
    err = "\n".join(lines)
    hint = f"rerun the same command (with --output_path {tmp_path / 'run'}) to resume it"
    assert f"the run in {tmp_path / 'run'} was interrupted; 1 finished sample(s) are kept: {hint}" in err
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "interrupted" and record["resume"] == hint
    assert record["stopped"]["reason"] == "KeyboardInterrupt" and record["sessions"][-1]["status"] == "interrupted"
    again = _open(tmp_path / "run")  # the rerun: running again, the finished sample kept
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "running" and "resume" not in record and list(again.finished()) == ["a|none|0"]
    with pytest.raises(RuntimeError), again.guard(lines.append):
        raise RuntimeError("disk full")
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and record["stopped"]["reason"] == "RuntimeError: disk full"
    assert "stopped on an error" in lines[-1]


def test_a_usage_error_before_the_first_sample_leaves_no_run_behind(tmp_path, capsys):
    from attnsteer.errors import UsageError

    run = _open(tmp_path / "run")
    with pytest.raises(UsageError), run.guard():
        raise UsageError("--recipe 'x' cannot steer --model 'm'")
    assert not (tmp_path / "run").exists() and capsys.readouterr().err == ""
