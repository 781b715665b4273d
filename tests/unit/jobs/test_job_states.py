"""JobStatus and its sets: every status is in exactly one phase, and rows read back as plain strings
compare equal to the members (the database stores the values)."""
from budwood.jobs.states import ACTIVE, HELD, QUIET, TERMINAL, UNFINISHED, WAITING, JobStatus


def test_every_status_is_waiting_held_by_a_worker_paused_or_ended():
    phases = [WAITING, HELD - WAITING, {JobStatus.PAUSED}, TERMINAL]
    for status in JobStatus:
        assert sum(status in phase for phase in phases) == 1, status
    assert set(JobStatus) == set(UNFINISHED | TERMINAL) and not UNFINISHED & TERMINAL


def test_a_paused_job_frees_its_tenants_quota_but_keeps_its_files_and_ends_a_live_stream():
    assert JobStatus.PAUSED not in ACTIVE and JobStatus.PAUSED in UNFINISHED and JobStatus.PAUSED in QUIET
    assert [s for s in JobStatus if s.terminal] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]


def test_values_are_openais_plus_budwoods_pause_and_compare_as_plain_strings():
    assert [s.value for s in JobStatus] == ["validating_files", "queued", "running", "pausing", "paused",
                                            "succeeded", "failed", "cancelled"]
    assert "running" in HELD and "cancelled" in TERMINAL and JobStatus("queued") is JobStatus.QUEUED
    assert f"{JobStatus.RUNNING}" == "running"
