"""The fault-injection benchmark's short form (bench/faults.py): a search killed with SIGKILL
three times (each aimed at a phase, at most 30 s after start) and resumed, its export killed
once, a runs folder on a full filesystem, and damaged cache files. Untuned kernels and given
weights keep it to a few minutes; the full form (20 kills, tuned kernels, a baseline to
train) is in docs/bench-faults.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "faults.py"


def test_kills_a_full_disk_and_damaged_files_lose_nothing(trained_resnet: Path, tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    done = subprocess.run([sys.executable, str(BENCH), "--kills", "3", "--export-kills", "1", "--untuned",
                           "--weights", str(trained_resnet), "--trials", "2", "--window", "30", "--seed", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert out.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    kills = result["kills"]
    assert len(kills["kills"]) == 3 and all(kill["exit"] == -9 for kill in kills["kills"]), kills["kills"]
    assert kills["lost"] == [] and kills["problems"] == []
    assert kills["final_exit"] == 0 and kills["finished"] == 2, kills["final_tail"]
    assert result["export"]["final_exit"] == 0 and result["export"]["export_json"], result["export"]["tail"]
    assert all(not kill["empty_files"] for kill in result["export"]["kills"])

    full = result["full_disk"]
    if os.geteuid() == 0:  # mounting the small filesystem needs root, which CI has
        assert full["run"], full
        assert full["exit"] == 2 and full["one_line"] and not full["half_written"], full
        assert "No space left on device" in full["error"] or "disk is full" in full["error"], full
        assert "/full/" in full["error"], full  # it names the file or study it could not write

    outcomes = {entry["file"]: entry for entry in result["truncated"]}
    left_out = {what: outcomes[what].get("reason") for what in ("tuning database", "cached baseline")}
    assert left_out == {"tuning database": "untuned kernels", "cached baseline": "weights given"}
    assert outcomes["latency table"]["outcome"] == "rebuilt", outcomes["latency table"]
    assert outcomes["study"]["outcome"] == "refused, naming the file", outcomes["study"]
    assert done.returncode == 0, done.stdout[-2000:]
