"""benchmarks.speed.prepare_scaling refuses an --out it could not write, or another run's file, before the work:
one line naming --out, no volume written, the file left as it was."""
import json

import pytest

from benchmarks.speed import prepare_scaling


def _refused(argv, capsys, monkeypatch) -> str:
    monkeypatch.setattr(prepare_scaling, "measure", lambda *a: pytest.fail("the work started before --out was checked"))
    with pytest.raises(SystemExit) as e:
        prepare_scaling.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "--out" in err
    return err


def test_an_out_in_a_missing_folder_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    err = _refused(["--volumes", "2", "--workdir", str(workdir), "--out", str(tmp_path / "absent" / "s.json")],
                   capsys, monkeypatch)
    assert "does not exist" in err and not workdir.exists()


def test_another_runs_file_is_refused_and_left_as_it_was(tmp_path, capsys, monkeypatch):
    other = tmp_path / "results.json"
    other.write_text('{"claims": []}')
    err = _refused(["--volumes", "2", "--workdir", str(tmp_path / "w"), "--out", str(other)], capsys, monkeypatch)
    assert "not a result of this benchmark" in err and other.read_text() == '{"claims": []}'
    _refused(["--volumes", "2", "--out", str(tmp_path)], capsys, monkeypatch)  # a folder


def test_an_earlier_result_of_this_benchmark_may_be_replaced(tmp_path, monkeypatch):
    earlier = tmp_path / "scaling.json"
    earlier.write_text(json.dumps({k: [] for k in prepare_scaling.RESULT_KEYS}))
    args = prepare_scaling.parser().parse_args(["--volumes", "2", "--out", str(earlier)])
    prepare_scaling.check_args(prepare_scaling.parser(), args)  # no SystemExit
    assert prepare_scaling.out_problem(tmp_path / "new.json") == ""
