"""jobs.manager without a cluster: secrets leave a submitted spec and come back on the cluster; job ids
are checked before they reach a shell or the Jobs API."""
import json
import os
import shlex

import pytest
import yaml

from jobs.manager import SECRETS_ENV, check_job_id, restore_secrets, split_secrets, submit

PRESIGNED = ("https://bucket.s3.us-west-2.amazonaws.com/flights/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAPRESIGNED%2F20260101%2Fus-west-2%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
             "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdefSIGNATURE")
SECRETS = ("AKIAPLANTED", "PLANTEDSECRET", "SESSIONTOKEN", "ACCOUNTKEY", "SASTOKEN", "SIGNATURE", "PLANTEDPASS")


def nested_spec():
    return {
        "inputs": [PRESIGNED, "/data/local.mp4", "s3://bucket/flights/**.mp4"],
        "output": "s3://results/flights",
        "storage_options": {
            "s3": {"key": "AKIAPLANTED", "secret": "PLANTEDSECRET", "token": "SESSIONTOKEN",
                   "endpoint_url": "http://127.0.0.1:9000"},
            "az": {"account_name": "acct", "account_key": "ACCOUNTKEY", "sas_token": "SASTOKEN"},
            "s3://public-bucket/": {"anon": True},
        },
        "output_storage_options": {"s3": {"key": "AKIAPLANTED", "password": "PLANTEDPASS"}},
        "sampling": {"every_n": 5},
    }


def env_of(secrets):
    return {SECRETS_ENV: json.dumps(secrets)}


def test_split_secrets_leaves_no_secret_in_the_spec_and_restore_gives_it_back():
    spec = nested_spec()
    redacted, secrets = split_secrets(spec)
    text = yaml.safe_dump(redacted)
    assert not [s for s in SECRETS if s in text]
    assert redacted["storage_options"]["s3"]["key"] == "***"
    assert redacted["storage_options"]["s3"]["endpoint_url"] == "http://127.0.0.1:9000"  # not a secret
    assert redacted["storage_options"]["s3://public-bucket/"] == {"anon": True}
    assert redacted["inputs"][1:] == spec["inputs"][1:] and redacted["output"] == spec["output"]
    assert redacted["inputs"][0].startswith("https://bucket.s3.us-west-2.amazonaws.com/flights/a.mp4?")
    assert ["inputs", 0] in [p for p, _ in secrets]
    assert restore_secrets(redacted, env_of(secrets)) == spec
    assert spec == nested_spec()  # neither call changes its argument


def test_flat_legacy_options_round_trip():
    spec = {"inputs": ["s3://b/v.mp4"], "output": "/tmp/out",
            "storage_options": {"key": "AKIAPLANTED", "secret": "PLANTEDSECRET", "endpoint_url": "http://e:9000"}}
    redacted, secrets = split_secrets(spec)
    assert redacted["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://e:9000"}
    assert sorted(p[-1] for p, _ in secrets) == ["key", "secret"]
    assert restore_secrets(redacted, env_of(secrets)) == spec


def test_a_spec_without_secrets_has_nothing_to_send():
    spec = {"inputs": ["/data/a.mp4"], "output": "/tmp/out", "storage_options": {"s3": {"anon": True}}}
    assert split_secrets(spec) == (spec, [])
    assert restore_secrets(spec, {}) == spec


def test_unfilled_storage_placeholders_are_dropped_so_credentials_come_from_the_environment():
    spec = nested_spec()
    spec["inputs"] = spec["inputs"][1:]
    redacted, _ = split_secrets(spec)
    restored = restore_secrets(redacted, {})
    assert restored["storage_options"]["s3"] == {"endpoint_url": "http://127.0.0.1:9000"}
    assert restored["storage_options"]["az"] == {"account_name": "acct"}
    assert restored["output_storage_options"] == {"s3": {}}
    assert "***" not in yaml.safe_dump(restored)


def test_an_unfilled_presigned_input_is_refused_naming_it():
    redacted, _ = split_secrets(nested_spec())
    with pytest.raises(ValueError, match=r"inputs\[0\].*" + SECRETS_ENV):
        restore_secrets(redacted, {})


def test_a_secret_never_overwrites_a_real_value():
    spec = {"inputs": ["/a.mp4"], "output": "/out", "storage_options": {"s3": {"key": "***", "profile": "p"}}}
    env = env_of([[["storage_options", "s3", "profile"], "OTHER"], [["storage_options", "s3", "key"], "K"],
                  [["storage_options", "gcs", "token"], "T"]])
    assert restore_secrets(spec, env)["storage_options"] == {"s3": {"key": "K", "profile": "p"}}


def test_malformed_secrets_variable_is_one_line_without_its_content():
    spec = {"inputs": ["/a.mp4"], "output": "/out"}
    with pytest.raises(ValueError) as e:
        restore_secrets(spec, {SECRETS_ENV: '[["storage_options", "s3", "key"], "AKIAPLANTED"'})
    assert SECRETS_ENV in str(e.value) and "AKIAPLANTED" not in str(e.value)
    with pytest.raises(ValueError, match="pairs"):
        restore_secrets(spec, {SECRETS_ENV: '{"key": "AKIAPLANTED"}'})


@pytest.mark.parametrize("job_id", ["fpn-20261124-120000-ab12cd", "raysubmit_AbC123", "a", "x" * 128, "job.v2_1"])
def test_valid_job_ids_pass_and_stay_one_shell_word(job_id):
    assert check_job_id(job_id) == job_id
    assert shlex.split(f"fpn run spec.yaml --job-id {shlex.quote(job_id)}")[-1] == job_id


@pytest.mark.parametrize("job_id", ["", "x" * 129, "-rf", ".hidden", "a b", "a;touch /tmp/pwned", "$(id)", "a`id`",
                                    "a\nb", "a/b", "ü"])
def test_invalid_job_ids_are_refused_naming_them(job_id):
    with pytest.raises(ValueError, match="job id") as e:
        check_job_id(job_id)
    assert repr(job_id) in str(e.value)


def test_submit_refuses_a_bad_job_id_before_contacting_the_cluster(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"inputs": ["/data/a.mp4"], "output": str(tmp_path / "out")}))
    with pytest.raises(ValueError, match="job id 'x; touch pwned'"):
        submit(str(spec), address="http://127.0.0.1:9", job_id="x; touch pwned")


def test_submit_refuses_more_secrets_than_one_environment_variable_holds(tmp_path):
    spec = tmp_path / "job.yaml"
    inputs = [PRESIGNED.replace("a.mp4", f"v{i}.mp4") for i in range(600)]
    spec.write_text(yaml.safe_dump({"inputs": inputs, "output": str(tmp_path / "out")}))
    with pytest.raises(ValueError, match="do not fit"):
        submit(str(spec), address="http://127.0.0.1:9")


def test_secrets_are_sealed_with_the_cluster_token_and_open_only_with_it(tmp_path, monkeypatch):
    """Ray logs a job's environment on every node (runtime_env_agent.log): with token auth the variable is
    ciphertext there, and a process with another token, or none, gets one line instead of the secrets."""
    from jobs.manager import _cluster_token, seal

    def use_token(token):
        for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
        if token:
            monkeypatch.setenv("RAY_AUTH_TOKEN", token)

    spec = nested_spec()
    redacted, secrets = split_secrets(spec)
    use_token("a" * 32)
    assert _cluster_token() == "a" * 32
    sealed = seal(json.dumps(secrets), _cluster_token())
    assert sealed.startswith("fernet:") and not [s for s in SECRETS if s in sealed]
    assert restore_secrets(redacted, {SECRETS_ENV: sealed}) == spec
    use_token("b" * 32)
    with pytest.raises(ValueError, match="sealed with another auth token"):
        restore_secrets(redacted, {SECRETS_ENV: sealed})
    use_token(None)
    assert _cluster_token() is None
    with pytest.raises(ValueError, match="sealed with the cluster's auth token and this process has none"):
        restore_secrets(redacted, {SECRETS_ENV: sealed})
    assert seal("plain", None) == "plain"  # no token auth: unsealed (submit warns)
    token_file = tmp_path / "token"
    token_file.write_text("c" * 32 + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert _cluster_token() == "c" * 32


class FakeJobsAPI:
    """Ray's JobSubmissionClient as it answers from a cluster whose only job is `taken`, an fpn job that finished: a
    request about any other job id is an HTTP 404, a submission under a taken id an HTTP 400 carrying the server's
    traceback, both raised as RuntimeError (ray.dashboard.modules.dashboard_sdk._raise_error)."""

    taken = "flights-1"

    def __init__(self, address, headers=None):
        self.address = address

    def _unknown(self, job_id):
        raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")

    stop_job = get_job_logs = _unknown

    def get_job_info(self, job_id):
        if job_id != self.taken:
            self._unknown(job_id)
        from types import SimpleNamespace

        spec = {"inputs": ["/data/a.mp4"], "output": "s3://archive/out"}
        return SimpleNamespace(metadata={"fpn_job": "1", "spec": yaml.safe_dump(spec)}, status="SUCCEEDED")

    def submit_job(self, *, submission_id, **_):
        if submission_id != self.taken:
            return submission_id
        raise RuntimeError(
            "Request failed with status code 400: Traceback (most recent call last):\n"
            '  File "job_head.py", line 410, in submit_job\n    resp = await job_agent_client.submit_job_internal(req)\n'
            f"ValueError: Job with submission_id {submission_id} already exists. Please use a different "
            "submission_id.\n.")


@pytest.fixture
def fake_cluster(monkeypatch):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobsAPI)
    return "http://127.0.0.1:8265"


@pytest.mark.parametrize("command", [["logs"], ["logs", "--follow"], ["cancel"], ["status"], ["resume"]])
def test_every_command_about_an_unknown_job_id_says_so_in_one_line(fake_cluster, command):
    """`fpn logs` and `fpn cancel` of an id the cluster does not know printed Ray's RuntimeError (404) as a
    traceback, where status and resume said it in a line."""
    from click.testing import CliRunner

    from jobs.cli import cli

    r = CliRunner().invoke(cli, [command[0], "nosuchjob", *command[1:], "--address", fake_cluster])
    assert r.exit_code == 1 and r.output.startswith(f"Error: job nosuchjob: not found on {fake_cluster}"), r.output
    assert len(r.output.splitlines()) == 1 and not isinstance(r.exception, RuntimeError)


def test_submitting_under_a_job_id_the_cluster_has_already_is_one_line_saying_so(fake_cluster, tmp_path):
    """It printed the dashboard's answer, a server-side ValueError traceback inside a RuntimeError, as a traceback."""
    from click.testing import CliRunner

    from jobs.cli import cli

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"inputs": ["/data/a.mp4"], "output": str(tmp_path / "out")}))
    r = CliRunner().invoke(cli, ["submit", str(spec), "--job-id", "flights-1", "--address", fake_cluster])
    assert r.exit_code == 1 and r.output == (f"Error: {fake_cluster} refused job flights-1: Job with submission_id "
                                             "flights-1 already exists. Please use a different submission_id.\n")


@pytest.mark.parametrize("command", [["submit", "SPEC"], ["status", "job-1"], ["list"], ["logs", "job-1"]])
def test_a_dashboard_address_without_http_is_refused_at_once(tmp_path, command):
    """Ray took 127.0.0.1:PORT for a GCS address: fpn submit waited 41 s for a GCS there, then printed an RpcError
    traceback of 52 lines."""
    import socket
    import time

    from click.testing import CliRunner

    from jobs.cli import cli

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"inputs": ["/data/a.mp4"], "output": str(tmp_path / "out")}))
    with socket.socket() as listening:  # a port that accepts connections and never answers
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        t0 = time.monotonic()
        r = CliRunner().invoke(cli, [str(spec) if a == "SPEC" else a for a in command] + ["--address", address])
    assert time.monotonic() - t0 < 5
    assert r.exit_code == 1 and r.output == f"Error: Ray dashboard address {address}: it needs http:// (http://{address})\n"


@pytest.mark.parametrize("from_env", [False, True])
def test_the_next_steps_printed_name_the_address_unless_it_came_from_ray_address(fake_cluster, tmp_path, monkeypatch,
                                                                               from_env):
    """fpn resume JOB --address A printed "fpn status NEW" without it; fpn submit printed --address A also when A
    was RAY_ADDRESS's."""
    from click.testing import CliRunner

    from jobs.cli import cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"inputs": ["/data/a.mp4"], "output": str(tmp_path / "out")}))
    for command in (["submit", str(spec)], ["resume", "flights-1"]):
        r = CliRunner().invoke(cli, command + ([] if from_env else ["--address", fake_cluster]),
                               env={"RAY_ADDRESS": fake_cluster} if from_env else {})
        steps = [line.strip() for line in r.output.splitlines() if line.strip().startswith("fpn ")]
        assert r.exit_code == 0 and steps, r.output
        for step in steps:
            named = not from_env and not step.startswith("fpn query")
            assert step.endswith(f" --address {fake_cluster}") == named and step.count("--address") == named, step


def test_a_job_whose_output_a_later_job_writes_keeps_its_own_state(tmp_path):
    """`fpn list`/`fpn status` of a cancelled job read the output's record, which its resume (another job id) had
    made "succeeded": the cancelled job was listed as succeeded, with the resume's frames."""
    from jobs.manager import _with_output_state
    from pipeline.output import Output

    Output(str(tmp_path)).write_job({"job_id": "flights-2", "state": "succeeded", "planned_frames": 10})

    def row(job_id, status):
        return {"job_id": job_id, "status": status, "output": str(tmp_path), "_spec": None, "message": ""}

    first = _with_output_state(row("flights-1", "STOPPED"))
    assert first["state"] == "cancelled" and "frames_planned" not in first
    assert first["message"] == "its output is job flights-2's now (fpn status flights-2)"
    second = _with_output_state(row("flights-2", "SUCCEEDED"))
    assert (second["state"], second["frames_planned"]) == ("succeeded", 10)


def test_the_address_flag_wins_over_ray_address(monkeypatch):
    """Ray's JobSubmissionClient takes RAY_ADDRESS (or RAY_API_SERVER_ADDRESS) over the address it is given:
    `fpn status JOB --address http://a:8265` with RAY_ADDRESS=http://b:8265 asked b."""
    import ray.job_submission

    from jobs.manager import client

    seen = []

    class Client(FakeJobsAPI):
        def __init__(self, address, headers=None):
            from ray.dashboard.utils import get_address_for_submission_client

            seen.append(get_address_for_submission_client(address))

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:2")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:3")
    client("http://127.0.0.1:1")
    client(None)  # no flag: Ray's own choice, as before
    assert seen == ["http://127.0.0.1:1", "http://127.0.0.1:3"]
    assert (os.environ["RAY_ADDRESS"], os.environ["RAY_API_SERVER_ADDRESS"]) == ("http://127.0.0.1:2",
                                                                                 "http://127.0.0.1:3")


def test_a_relative_output_flag_of_submit_is_taken_from_here(fake_cluster, tmp_path, monkeypatch):
    """`fpn submit SPEC -o rel/out` sent rel/out to the cluster as it was, where the job's working directory (a
    temporary one) made it something else; the spec's own relative paths are taken from its file."""
    from jobs.manager import submit

    spec = tmp_path / "specs" / "job.yaml"
    spec.parent.mkdir()
    spec.write_text(yaml.safe_dump({"inputs": ["/data/a.mp4"], "output": "spec-out"}))
    monkeypatch.chdir(tmp_path)
    assert submit(str(spec), address=fake_cluster)[1]["output"] == str(tmp_path / "specs" / "spec-out")
    assert submit(str(spec), address=fake_cluster, overrides={"output": "rel/out"})[1]["output"] == str(
        tmp_path / "rel" / "out")
    assert submit(str(spec), address=fake_cluster, overrides={"output": "s3://b/out"})[1]["output"] == "s3://b/out"
