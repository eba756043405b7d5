"""The soak command (lavis_evlgen/soak.py): resident memory per train/eval cycle, bounded growth."""
import pytest

from lavis_evlgen import soak


def test_growth_is_measured_after_the_warmup():
    assert soak.growth_mb([100.0, 180.0, 181.0, 185.0], warmup=2) == 5.0  # after cycle 2 -> after cycle 4
    assert soak.growth_mb([100.0, 180.0], warmup=0) == 80.0
    assert soak.growth_mb([100.0], warmup=2) == 0.0
    with pytest.raises(SystemExit):
        soak.parse_args(["--cycles", "2", "--warmup", "2"])


def test_a_leaking_cycle_fails_the_soak(monkeypatch, capsys):
    kept = []
    monkeypatch.setattr(soak, "run_cycle", lambda *args: kept.append(bytearray(48 * 2**20)))  # 48 MiB kept per cycle
    assert soak.main(["--cycles", "4", "--warmup", "1", "--max-growth-mb", "64"]) == 1
    assert "soak FAIL: +14" in capsys.readouterr().out  # 3 cycles x 48 MiB after the warm-up
    kept.clear()
    monkeypatch.setattr(soak, "run_cycle", lambda *args: None)
    assert soak.main(["--cycles", "3", "--warmup", "1", "--max-growth-mb", "64"]) == 0


@pytest.mark.slow
def test_tiny_train_eval_cycles_stay_within_the_bound(capsys):
    assert soak.main(["--cycles", "4", "--warmup", "2", "--max-growth-mb", "64"]) == 0, capsys.readouterr().out
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("soak cycle")]
    assert len(lines) == 4
