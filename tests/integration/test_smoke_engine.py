from tests.workflows import basic


def test_linear_run_completes(client, inline_worker, db):
    # Given a 5-state workflow and a worker
    run_id = client.start(basic.linear, {"n": 7})
    # When the run is left to finish
    run = client.wait_for(run_id, timeout=30)
    # Then it completed with one step row per state, consecutive
    assert run.status == "completed", run
    assert run.output == {"n": 7, "trail": ["s1", "s2", "s3", "s4", "s5"]}
    assert [s.seq for s in run.steps] == [1, 2, 3, 4, 5]
    assert [s.state for s in run.steps] == ["s1", "s2", "s3", "s4", "s5"]
