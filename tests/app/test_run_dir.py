"""tfmp.app.run_dir: moving a run's files aside never overwrites one moved before."""

import os

from tfmp.app import run_dir


def test_move_aside_never_overwrites_what_an_earlier_restart_moved(tmp_path):
    moved = []
    for content in (b"first", b"second", b"third"):  # within one second: the same stamp
        (tmp_path / "tune.json").write_bytes(content)
        moved.append(run_dir.move_aside(str(tmp_path / "tune.json")))
    assert len(set(moved)) == 3 and not (tmp_path / "tune.json").exists()
    assert [open(p, "rb").read() for p in moved] == [b"first", b"second", b"third"]
    assert all(os.path.basename(p).startswith("tune.json.") for p in moved)
    assert run_dir.move_aside(str(tmp_path / "tune.json")) is None  # nothing there


def test_restart_moves_the_backup_and_tune_json_and_nothing_else(tmp_path):
    for name in ("backup/latest.weights.h5", "tune.json", "summary.json", "model.keras"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    moved = run_dir.restart(str(tmp_path))
    assert [os.path.basename(old) for old, _ in moved] == ["backup", "tune.json"]
    assert sorted(p for p in os.listdir(tmp_path) if "." not in p or p.endswith((".json", ".keras"))
                  ) == ["model.keras", "summary.json"]
    assert (tmp_path / os.path.basename(moved[0][1]) / "latest.weights.h5").read_text() \
        == "backup/latest.weights.h5"
