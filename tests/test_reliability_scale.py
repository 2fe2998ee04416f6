"""Issue 17, items 1 and 3 in the suite: a sample of ``bench/reliability/run.py`` (fuzz and soak).

``python -m bench.reliability.run fuzz --long`` (10 000 adapter files, 2 000 uploads) and
``python -m bench.reliability.run soak --long`` (5 minutes) give the full figures of docs/reliability.md;
these run the same code on fewer inputs and for 30 s, so the suite stays within its budget.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .reliability_helpers import PYTHON, ROOT, child_env, record_stats


def bench(models_home, *args: str, timeout: int) -> dict:
    result = subprocess.run(
        [PYTHON, "-m", "bench.reliability.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(SPECTRAL_DIFFUSION_HOME=str(models_home)),
    )
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert result.returncode == 0, (report, result.stderr[-3000:])
    return report


@pytest.mark.timeout(300)
def test_fuzzed_adapter_files_and_uploads_give_only_documented_errors(models_home):
    report = bench(models_home, "fuzz", "--files", "900", "--uploads", "300", timeout=280)
    assert report["unexpected"] == 0 and report["cap_enforced"]
    files = report["adapter_files"]
    assert files["files"] == 900 and len(files["by_kind"]) == 9
    for target in ("read_adapter", "read_bundle", "load_adapter", "import_file"):
        outcomes = files["outcomes"][target]
        assert sum(outcomes.values()) == 900 and not any(o.startswith("UNEXPECTED") for o in outcomes)
    assert set(files["outcomes"]["read_adapter"]) == {"accepted", "AdapterFormatError"}
    assert "BaseModelMismatchError" in files["outcomes"]["load_adapter"]  # the foreign files were tried
    assert sum(sum(v.values()) for v in report["uploads"]["outcomes"].values()) == 300
    assert report["rss_peak_mb"] - report["rss_start_mb"] < 300
    record_stats(
        "fuzz-scale-sample",
        **{k: report[k] for k in ("unexpected", "rss_start_mb", "rss_peak_mb")},
        files=900,
        uploads=300,
    )


@pytest.mark.timeout(400)
def test_soak_with_eight_clients_while_a_training_runs(models_home):
    report = bench(models_home, "soak", "--seconds", "30", "--clients", "8", timeout=380)
    assert report["failures"] == 0, report["failure_samples"]
    assert report["by_call"]["train_concept"] == {"refused as documented": 1}
    assert report["training_ran_throughout"] and report["server_alive"] and report["library_valid"]
    for call in ("generate", "list_concepts", "export_concept", "import_concept", "delete_concept"):
        assert report["by_call"][call].get("ok", 0) >= 8, report["by_call"]
    record_stats(
        "soak-sample", **{k: report[k] for k in ("calls", "failures", "rss_start_mb", "rss_end_mb", "rss_peak_mb")}
    )
