"""Environment -> jax.distributed.initialize arguments (pure resolution, no real init)."""

import pytest

from topd_jax.sharding.distributed import (
    DistributedArgs,
    DistributedConfigError,
    first_slurm_host,
    initialize_distributed,
    resolve_distributed,
)

SLURM = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_JOB_NODELIST": "gpu[007-010]"}


def test_plain_environment_is_a_single_process_run():
    assert resolve_distributed({"PATH": "/bin", "SLURM_NTASKS": "1"}) is None
    assert initialize_distributed(None) is False


def test_explicit_env_vars_become_the_arguments():
    env = {"TOPD_COORDINATOR": "10.0.0.1:1234", "TOPD_NUM_PROCESSES": "2", "TOPD_PROCESS_ID": "1"}
    assert resolve_distributed(env) == DistributedArgs("explicit", "10.0.0.1:1234", 2, 1)


def test_config_values_win_over_env_and_slurm():
    env = {"TOPD_COORDINATOR": "a:1", "TOPD_NUM_PROCESSES": "8", "TOPD_PROCESS_ID": "7", **SLURM}
    got = resolve_distributed(env, coordinator="head:99", num_processes=4, process_id=0)
    assert got == DistributedArgs("explicit", "head:99", 4, 0)


def test_one_explicit_process_is_a_no_op_even_under_slurm():
    assert resolve_distributed({**SLURM, "TOPD_COORDINATOR": "h:1", "TOPD_NUM_PROCESSES": "1",
                                "TOPD_PROCESS_ID": "0"}) is None


@pytest.mark.parametrize("env, needle", [
    ({"TOPD_COORDINATOR": "h:1"}, "missing num_processes, process_id"),
    ({"TOPD_COORDINATOR": "h:1", "TOPD_NUM_PROCESSES": "2", "TOPD_PROCESS_ID": "2"}, "process_id=2"),
    ({"TOPD_COORDINATOR": "h", "TOPD_NUM_PROCESSES": "2", "TOPD_PROCESS_ID": "0"}, "expected host:port"),
    ({"TOPD_NUM_PROCESSES": "two"}, "TOPD_NUM_PROCESSES='two'"),
    ({"SLURM_NTASKS": "2"}, "SLURM_PROCID"),
    ({"TOPD_DISTRIBUTED": "yes"}, "TOPD_DISTRIBUTED='yes'"),
])
def test_inconsistent_settings_fail_naming_the_value(env, needle):
    with pytest.raises(DistributedConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        resolve_distributed(env)


def test_slurm_uses_procid_ntasks_and_the_first_node_as_coordinator():
    assert resolve_distributed(SLURM) == DistributedArgs("slurm", "gpu007:12345", 4, 3)
    assert resolve_distributed({**SLURM, "TOPD_COORDINATOR_PORT": "7777"}).coordinator_address == "gpu007:7777"


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("node[3-5]", "node3"), ("gpu[03-05,9],cpu1", "gpu03"),
    ("a-b-[0001-0004]", "a-b-0001"), ("n[7,2]", "n7"), ("x1,x2", "x1"),
])
def test_first_slurm_host_expands_ranges_keeping_padding(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_tpu_pod_and_forced_auto_leave_detection_to_jax():
    assert resolve_distributed({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == DistributedArgs("auto")
    assert resolve_distributed({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # single-host TPU VM
    assert resolve_distributed({"TOPD_DISTRIBUTED": "auto"}).kwargs() == dict(
        coordinator_address=None, num_processes=None, process_id=None)
    assert resolve_distributed({**SLURM, "TOPD_DISTRIBUTED": "off"}) is None


def test_cli_rejects_a_half_given_explicit_setup_before_touching_devices(capsys, monkeypatch):
    from topd_jax.train.__main__ import main
    for var in ("TOPD_COORDINATOR", "TOPD_NUM_PROCESSES", "TOPD_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert main(["distributed.coordinator=head:1234", "distributed.process_id=0"]) == 2
    assert "missing num_processes" in capsys.readouterr().err
